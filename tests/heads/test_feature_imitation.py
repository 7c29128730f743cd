"""Feature-imitation heads against independent transcriptions of their formulas."""
import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import ImageList
from detectron2.utils.events import EventStorage
from torch import nn

from d2kd.config import get_d2kd_cfg
from d2kd.heads import FitNetHead, MGDHead, TeacherOutputs
from d2kd.modeling.teacher import FrozenTeacher
from d2kd.structures import StudentTaps

LEVELS = ["p3", "p4"]


def _cfg(**mgd):
    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = LEVELS
    for key, value in mgd.items():
        cfg.DISTILL.MGD[key] = value
    return cfg


def _shapes(channels):
    return {"p3": ShapeSpec(channels=channels, stride=8),
            "p4": ShapeSpec(channels=channels, stride=16)}


def _maps(channels, seed):
    g = torch.Generator().manual_seed(seed)
    return {"p3": torch.randn(2, channels, 6, 8, generator=g),
            "p4": torch.randn(2, channels, 3, 4, generator=g)}


def test_fitnet_is_mean_squared_error_summed_over_levels():
    s, t = _maps(4, 0), _maps(4, 1)
    head = FitNetHead(_cfg(), _shapes(4), _shapes(4))
    with EventStorage():
        loss = head(StudentTaps(features=s), TeacherOutputs(features=t))["loss_kd_fitnet_feat"]
    expected = 0.0
    for level in LEVELS:  # written out element by element
        diff = [(a - b) ** 2
                for a, b in zip(s[level].flatten().tolist(), t[level].flatten().tolist())]
        expected += sum(diff) / len(diff)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mgd_without_mask_and_identity_generator_is_alpha_sum_over_batch():
    s, t = _maps(4, 2), _maps(4, 3)
    head = MGDHead(_cfg(ALPHA=3e-3, MASK_RATIO=0.0), _shapes(4), _shapes(4))
    head.generators = nn.ModuleDict({level: nn.Identity() for level in LEVELS})
    with EventStorage():
        loss = head(StudentTaps(features=s), TeacherOutputs(features=t))["loss_kd_mgd_feat"]
    batch = 2
    expected = sum(3e-3 * ((s[l] - t[l]) ** 2).sum().item() / batch for l in LEVELS)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_mgd_masks_the_requested_fraction_of_cells():
    s = {"p3": torch.ones(4, 2, 50, 50), "p4": torch.ones(4, 2, 25, 25)}
    t = {level: torch.zeros_like(x) for level, x in s.items()}
    head = MGDHead(_cfg(ALPHA=1.0, MASK_RATIO=0.65), _shapes(2), _shapes(2))
    head.generators = nn.ModuleDict({level: nn.Identity() for level in LEVELS})
    torch.manual_seed(0)
    with EventStorage():
        loss = head(StudentTaps(features=s), TeacherOutputs(features=t))["loss_kd_mgd_feat"]
    kept = loss.item() * 4 / 2  # alpha=1, batch 4, 2 channels: loss = kept cells * 2 / 4
    total_cells = 4 * (50 * 50 + 25 * 25)
    assert kept / total_cells == pytest.approx(0.35, abs=0.02)


@pytest.mark.parametrize("head_class", [FitNetHead, MGDHead])
def test_identical_teacher_and_student_give_zero_loss(head_class):
    maps = _maps(4, 4)
    head = head_class(_cfg(MASK_RATIO=0.0), _shapes(4), _shapes(4))
    if head_class is MGDHead:
        head.generators = nn.ModuleDict({level: nn.Identity() for level in LEVELS})
    with EventStorage():
        losses = head(StudentTaps(features=maps), TeacherOutputs(features=maps))
    assert all(v.item() == 0 for v in losses.values())


def test_adapters_map_student_channels_and_resize_to_the_teacher():
    s, t = _maps(3, 5), _maps(6, 6)
    t = {level: torch.nn.functional.interpolate(x, scale_factor=2.0) for level, x in t.items()}
    head = FitNetHead(_cfg(), _shapes(3), {"p3": ShapeSpec(channels=6, stride=4),
                                            "p4": ShapeSpec(channels=6, stride=8)})
    aligned = head.aligner(s, t)
    assert {level: tuple(x.shape) for level, x in aligned.items()} == {
        "p3": (2, 6, 12, 16), "p4": (2, 6, 6, 8)}
    with EventStorage():
        loss = head(StudentTaps(features=s), TeacherOutputs(features=t))["loss_kd_fitnet_feat"]
    loss.backward()
    assert head.aligner.adapters["p3"].weight.grad.abs().sum() > 0


def test_teacher_sees_the_student_batch_in_its_own_normalisation():
    class Stub:  # the attributes FrozenTeacher.normalize reads
        pixel_mean = torch.tensor([10.0, 20.0, 30.0]).view(3, 1, 1)
        pixel_std = torch.tensor([2.0, 4.0, 8.0]).view(3, 1, 1)
        backbone = type("B", (), {"size_divisibility": 8})()

    teacher = FrozenTeacher.__new__(FrozenTeacher)
    teacher.model = Stub()
    teacher.input_format = "BGR"
    raw = torch.rand(2, 3, 5, 7) * 255
    s_mean, s_std = (torch.tensor([1.0, 2.0, 3.0]).view(3, 1, 1),
                     torch.tensor([5.0, 6.0, 7.0]).view(3, 1, 1))
    student_batch = ImageList.from_tensors([(raw[0] - s_mean) / s_std,
                                            ((raw[1] - s_mean) / s_std)[:, :4, :6]])
    out = teacher.normalize(student_batch, s_mean, s_std, "RGB")
    assert out.shape == (2, 3, 8, 8)
    expected0 = (raw[0].flip(0) - Stub.pixel_mean) / Stub.pixel_std
    assert torch.allclose(out[0, :, :5, :7], expected0, atol=1e-4)
    expected1 = ((raw[1].flip(0) - Stub.pixel_mean) / Stub.pixel_std)[:, :4, :6]
    assert torch.allclose(out[1, :, :4, :6], expected1, atol=1e-4)
    assert out[1, :, 4:, :].abs().sum() == 0 and out[1, :, :, 6:].abs().sum() == 0


def _gt(*boxes):
    from detectron2.structures import Boxes, Instances

    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).view(-1, 4))
    inst.gt_classes = torch.zeros(len(boxes), dtype=torch.long)
    return inst


def test_box_cell_masks_mark_cells_whose_centre_is_inside_a_box():
    from d2kd.heads.masks import box_cell_masks

    masks = box_cell_masks([_gt([8, 8, 24, 16]), _gt()], torch.Size((2, 1, 4, 4)), stride=8)
    expected = torch.zeros(2, 1, 4, 4)
    expected[0, 0, 1, 1:3] = 1  # centres 12 and 20 in x, 12 in y
    assert torch.equal(masks, expected)


def test_box_area_masks_hold_the_largest_inverse_box_area():
    from d2kd.heads.masks import box_area_masks

    # image 0: a 2-cell box inside a 4-cell box (overlap keeps 1/2), a box covering no centre;
    # image 1: no boxes
    gt = [_gt([8, 8, 24, 16], [0, 0, 24, 24], [1, 1, 2, 2]), _gt()]
    masks = box_area_masks(gt, torch.Size((2, 1, 4, 4)), stride=8)
    expected = torch.zeros(2, 1, 4, 4)
    expected[0, 0, :2, :2] = 1 / 9  # centres 4..20 inside [0, 24]: 3 x 3 cells
    expected[0, 0, 2, :3] = 1 / 9
    expected[0, 0, :2, 2] = 1 / 9
    expected[0, 0, 1, 1:3] = 1 / 2
    assert torch.allclose(masks, expected)


def test_valid_cell_masks_exclude_padding():
    from d2kd.heads.masks import valid_cell_masks

    masks = valid_cell_masks([(16, 32), (32, 8)], torch.Size((2, 1, 4, 4)), stride=8)
    expected = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    expected[0, 0, :2, :] = True  # rows at 0, 8 < 16
    expected[1, 0, :, :1] = True  # columns at 0 < 8
    assert torch.equal(masks, expected)


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def test_near_object_masks_match_a_brute_force_iou_threshold():
    from detectron2.structures import Boxes

    from d2kd.heads.masks import near_object_masks

    g = torch.Generator().manual_seed(0)
    shapes = [torch.Size((1, 1, 4, 5)), torch.Size((1, 1, 2, 3))]
    anchors, anchor_lists = [], []
    for shape, stride in zip(shapes, (8, 16)):  # 2 anchors per cell, (H, W, A) order
        boxes = []
        for y in range(shape[2]):
            for x in range(shape[3]):
                for size in (stride * 1.5, stride * 3.0):
                    cx, cy = (x + 0.5) * stride, (y + 0.5) * stride
                    boxes.append([cx - size / 2, cy - size / 2, cx + size / 2, cy + size / 2])
        anchor_lists.append(boxes)
        anchors.append(Boxes(torch.tensor(boxes)))
    gt = [[float(v) for v in torch.rand(4, generator=g) * 20] for _ in range(2)]
    gt = [[min(b[0], b[2]), min(b[1], b[3]), max(b[0], b[2]) + 8, max(b[1], b[3]) + 8] for b in gt]
    masks = near_object_masks([_gt(*gt)], anchors, shapes, num_anchors=2, psi=0.5)
    for box in gt:
        best = max(_iou(box, a) for boxes in anchor_lists for a in boxes)
        for mask, boxes, shape in zip(masks, anchor_lists, shapes):
            for k, a in enumerate(boxes):
                if _iou(box, a) > 0.5 * best:
                    cell = k // 2
                    assert mask[0, 0, cell // shape[3], cell % shape[3]] == 1
    expected_on = set()
    for level, (boxes, shape) in enumerate(zip(anchor_lists, shapes)):
        for k, a in enumerate(boxes):
            for box in gt:
                best = max(_iou(box, b) for bs in anchor_lists for b in bs)
                if _iou(box, a) > 0.5 * best:
                    expected_on.add((level, k // 2))
    got_on = {(level, int(i)) for level, m in enumerate(masks) for i in m.flatten().nonzero()}
    assert got_on == expected_on


def test_fgbg_loss_matches_hand_computation():
    from d2kd.heads import FgBgHead

    cfg = _cfg()
    cfg.DISTILL.IN_FEATURES = ["p3"]
    cfg.DISTILL.FGBG.FG_WEIGHT, cfg.DISTILL.FGBG.BG_WEIGHT = 1.5, 3.0
    shapes = {"p3": ShapeSpec(channels=2, stride=8)}
    s = {"p3": torch.arange(32, dtype=torch.float32).view(1, 2, 4, 4) / 10}
    t = {"p3": torch.zeros(1, 2, 4, 4)}
    head = FgBgHead(cfg, shapes, shapes)
    with EventStorage():
        losses = head(StudentTaps(features=s, gt_instances=[_gt([8, 8, 24, 16])]),
                      TeacherOutputs(features=t))
    sq = (s["p3"] ** 2)[0]  # (2, 4, 4)
    fg_cells = [(1, 1), (1, 2)]
    fg_sum = sum(sq[c, y, x].item() for c in range(2) for y, x in fg_cells)
    bg_sum = sq.sum().item() - fg_sum
    assert losses["loss_kd_fgbg_fg"].item() == pytest.approx(1.5 * fg_sum / (2 * 2), rel=1e-5)
    assert losses["loss_kd_fgbg_bg"].item() == pytest.approx(3.0 * bg_sum / (14 * 2), rel=1e-5)
