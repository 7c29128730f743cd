"""FGD head against an independent transcription of the authors' released loss.

Reference: yzd-v/FGD, mmdet/distillation/losses/fgd.py (``FeatureLoss``), commit
c03a6cf3b3cb3cbfd5554dbf4766e7135747d22d; hyper-parameters from the same commit's
configs/distillers/fgd/fgd_retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco.py and
fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py. The transcription below
is written from the facts of that file (shapes, loops, reductions, constants), one level at a
time as the authors' module runs (one ``FeatureLoss`` per FPN level, summed by the distiller),
in float64 on random inputs, with the GcBlock and adapter weights of the d2kd head copied in.
"""
import math
from typing import Dict, List, Tuple

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils.events import EventStorage

from d2kd.config import ConfigError, get_d2kd_cfg
from d2kd.config.ranges import check_key_ranges
from d2kd.heads import FGDHead, TeacherOutputs
from d2kd.heads.fgd import GlobalContextBlock
from d2kd.heads.masks import focal_masks, grid_boxes
from d2kd.structures import StudentTaps

LEVELS = {"p3": 8, "p4": 16}
PADDED = (64, 96)  # the batch's padded input size: p3 8 x 12, p4 4 x 6
IMAGE_SIZES = [(60, 90), (50, 96), (64, 72)]  # before padding
RETINANET = dict(TEMPERATURE=0.5, ALPHA=1e-3, BETA=5e-4, GAMMA=5e-4, LAMBDA=5e-6)
FASTER_RCNN = dict(TEMPERATURE=0.5, ALPHA=5e-5, BETA=2.5e-5, GAMMA=5e-5, LAMBDA=5e-7)


# ---- the authors' forward, transcribed ---------------------------------------------------
def ref_attention(x: torch.Tensor, temp: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Spatial (N, H, W) and channel (N, C) attention, as ``get_attention``."""
    n, c, h, w = x.shape
    magnitude = torch.abs(x)
    spatial_logits = magnitude.mean(dim=1).reshape(n, h * w) / temp
    spatial = (h * w * torch.softmax(spatial_logits, dim=1)).reshape(n, h, w)
    channel_logits = magnitude.mean(dim=2).mean(dim=2) / temp
    return spatial, c * torch.softmax(channel_logits, dim=1)


def ref_masks(boxes: List[torch.Tensor], image_sizes, n: int, h: int, w: int):
    """Fg / bg masks (N, H, W) as the authors' per-image, per-box loop: boxes scaled by the
    grid over the unpadded image size, floor / ceil, inclusive slices, 1 / (unclipped cell
    count) kept by maximum; bg normalised per image when not empty. (The authors' area is a
    float32 tensor, being computed from int tensors; here it is float64.)"""
    fg = torch.zeros(n, h, w, dtype=torch.float64)
    bg = torch.ones(n, h, w, dtype=torch.float64)
    for i in range(n):
        image_h, image_w = image_sizes[i]
        b = boxes[i]
        left = torch.floor(b[:, 0] / image_w * w).int()
        right = torch.ceil(b[:, 2] / image_w * w).int()
        top = torch.floor(b[:, 1] / image_h * h).int()
        bottom = torch.ceil(b[:, 3] / image_h * h).int()
        for j in range(len(b)):
            area = 1.0 / (float(bottom[j] + 1 - top[j]) * float(right[j] + 1 - left[j]))
            region = fg[i, top[j]:bottom[j] + 1, left[j]:right[j] + 1]
            fg[i, top[j]:bottom[j] + 1, left[j]:right[j] + 1] = torch.clamp(region, min=area)
        bg[i] = (fg[i] <= 0).double()
        if bg[i].sum() > 0:
            bg[i] = bg[i] / bg[i].sum()
    return fg, bg


def ref_gcblock(x: torch.Tensor, p: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``x + channel_add_conv(spatial_pool(x))`` with the weights ``p``."""
    n, c, h, w = x.shape
    logits = F.conv2d(x, p["mask_w"], p["mask_b"]).reshape(n, 1, h * w)
    weights = torch.softmax(logits, dim=2).unsqueeze(-1)  # (N, 1, HW, 1)
    context = torch.matmul(x.reshape(n, c, h * w).unsqueeze(1), weights).reshape(n, c, 1, 1)
    y = F.conv2d(context, p["w1"], p["b1"])
    y = F.layer_norm(y, [c // 2, 1, 1], p["ln_w"], p["ln_b"])
    y = F.conv2d(torch.relu(y), p["w2"], p["b2"])
    return x + y


def ref_level_terms(s, t, boxes, image_sizes, hp, align, gc_s, gc_t) -> Dict[str, torch.Tensor]:
    """One authors' ``FeatureLoss.forward`` (which returns the sum of these four terms),
    each term already weighted."""
    if align is not None:
        s = F.conv2d(s, *align)
    n, c, h, w = s.shape
    spatial_t, channel_t = ref_attention(t, hp["TEMPERATURE"])
    spatial_s, channel_s = ref_attention(s, hp["TEMPERATURE"])
    fg, bg = ref_masks(boxes, image_sizes, n, h, w)
    weight = torch.sqrt(spatial_t[:, None]) * torch.sqrt(channel_t[:, :, None, None])
    fea_s, fea_t = s * weight, t * weight
    terms = {
        "fg": ((fea_s - fea_t) ** 2 * fg[:, None]).sum() / n,
        "bg": ((fea_s - fea_t) ** 2 * bg[:, None]).sum() / n,
        "attention": (channel_s - channel_t).abs().sum() / n
        + (spatial_s - spatial_t).abs().sum() / n,
        "global": ((ref_gcblock(s, gc_s) - ref_gcblock(t, gc_t)) ** 2).sum() / n,
    }
    weights = {"fg": hp["ALPHA"], "bg": hp["BETA"], "attention": hp["GAMMA"],
               "global": hp["LAMBDA"]}
    return {k: weights[k] * v for k, v in terms.items()}


# ---- d2kd side ---------------------------------------------------------------------------
def _cfg(**fgd):
    cfg = get_d2kd_cfg()
    cfg.DISTILL.IN_FEATURES = list(LEVELS)
    for key, value in fgd.items():
        cfg.DISTILL.FGD[key] = value
    return cfg


def _shapes(channels: int) -> Dict[str, ShapeSpec]:
    return {level: ShapeSpec(channels=channels, stride=stride) for level, stride in LEVELS.items()}


def _randomise(block: GlobalContextBlock, g: torch.Generator) -> None:
    """Non-trivial GcBlock weights (the authors' init makes the block the identity)."""
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5)


def _gc_tensors(block: GlobalContextBlock) -> Dict[str, torch.Tensor]:
    """The block's parameters by the transcription's names."""
    conv1, norm, _, conv2 = block.transform
    return {"mask_w": block.context_mask.weight, "mask_b": block.context_mask.bias,
            "w1": conv1.weight, "b1": conv1.bias, "ln_w": norm.weight, "ln_b": norm.bias,
            "w2": conv2.weight, "b2": conv2.bias}


def _gc_params(block: GlobalContextBlock) -> Dict[str, torch.Tensor]:
    """The block's weights, copied into leaf tensors of the transcription."""
    return {k: v.detach().clone().requires_grad_(True) for k, v in _gc_tensors(block).items()}


def _boxes(g: torch.Generator) -> List[torch.Tensor]:
    """Random boxes plus edge cases: an exact-grid box, a box on the image border, overlaps,
    an image without boxes."""
    out = []
    for height, width in IMAGE_SIZES[:2]:
        size = torch.tensor([width, height], dtype=torch.float64)
        xy = torch.rand(5, 2, generator=g, dtype=torch.float64) * size * 0.7
        wh = 4 + torch.rand(5, 2, generator=g, dtype=torch.float64) * 30
        b = torch.cat([xy, torch.minimum(xy + wh, size)], dim=1)
        out.append(b)
    out[0] = torch.cat([out[0], torch.tensor([[15.0, 15.0, 45.0, 30.0], [0.0, 0.0, 90.0, 60.0]],
                                             dtype=torch.float64)])
    out.append(torch.zeros(0, 4, dtype=torch.float64))
    return out


def _inputs(seed: int, student_channels: int, teacher_channels: int):
    g = torch.Generator().manual_seed(seed)
    n = len(IMAGE_SIZES)
    s, t = {}, {}
    for level, stride in LEVELS.items():
        grid = (PADDED[0] // stride, PADDED[1] // stride)
        s[level] = torch.randn(n, student_channels, *grid, generator=g, dtype=torch.float64)
        t[level] = 2 * torch.randn(n, teacher_channels, *grid, generator=g, dtype=torch.float64)
    return s, t, _boxes(g), g


def _taps(s, boxes) -> StudentTaps:
    gt = []
    for b, size in zip(boxes, IMAGE_SIZES):
        instances = Instances(size)
        instances.gt_boxes = Boxes(b)
        gt.append(instances)
    images = ImageList(torch.zeros(len(IMAGE_SIZES), 3, *PADDED, dtype=torch.float64),
                       IMAGE_SIZES)
    return StudentTaps(images=images, gt_instances=gt, features=s)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-300)).item()


def compare_with_authors(hp, student_channels, teacher_channels, seed=0):
    """Loss terms and gradients of the d2kd head and of the transcription on the same
    inputs and weights: the largest relative error of each."""
    s, t, boxes, g = _inputs(seed, student_channels, teacher_channels)
    torch.manual_seed(seed)  # the adapters' initialisation
    head = FGDHead(_cfg(**hp), _shapes(student_channels), _shapes(teacher_channels)).double()
    for level in LEVELS:
        _randomise(head.student_context[level], g)
        _randomise(head.teacher_context[level], g)
    s = {k: v.requires_grad_(True) for k, v in s.items()}
    with EventStorage():
        losses = head(_taps(s, boxes), TeacherOutputs(features=t))
    total = sum(losses.values())
    total.backward()

    s_ref = {k: v.detach().clone().requires_grad_(True) for k, v in s.items()}
    expected, params, aligns = {}, [], {}
    for level in LEVELS:
        align = None
        if level in head.aligner.adapters:
            conv = head.aligner.adapters[level]
            align = aligns[level] = (conv.weight.detach().clone().requires_grad_(True),
                                     conv.bias.detach().clone().requires_grad_(True))
        gc_s = _gc_params(head.student_context[level])
        gc_t = _gc_params(head.teacher_context[level])
        params.append((level, gc_s, gc_t))
        terms = ref_level_terms(s_ref[level], t[level], boxes, IMAGE_SIZES, hp, align, gc_s, gc_t)
        for k, v in terms.items():
            expected[k] = expected.get(k, 0) + v
    sum(expected.values()).backward()

    errors = {k: _relative_error(losses[f"loss_kd_fgd_{k}"].detach(), expected[k].detach())
              for k in expected}
    errors["grad_student"] = max(_relative_error(s[l].grad, s_ref[l].grad) for l in LEVELS)
    # one vector of every GcBlock gradient: the context conv's bias has gradient 0 in exact
    # arithmetic (a softmax ignores a shift), so it is compared at the scale of the others
    live, ref = [], []
    for level, gc_s, gc_t in params:
        for block, copied in ((head.student_context[level], gc_s),
                              (head.teacher_context[level], gc_t)):
            live += [p.grad.flatten() for p in _gc_tensors(block).values()]
            ref += [copied[k].grad.flatten() for k in _gc_tensors(block)]
    errors["grad_gcblocks"] = _relative_error(torch.cat(live), torch.cat(ref))
    for level, (weight, bias) in aligns.items():
        conv = head.aligner.adapters[level]
        errors[f"grad_adapter_{level}"] = max(_relative_error(conv.weight.grad, weight.grad),
                                              _relative_error(conv.bias.grad, bias.grad))
    return errors


# ---- tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("hp", [RETINANET, FASTER_RCNN], ids=["retinanet", "faster_rcnn"])
@pytest.mark.parametrize("channels", [(8, 8), (6, 8)], ids=["same_width", "adapter"])
def test_loss_and_gradients_match_the_authors_forward(hp, channels):
    errors = compare_with_authors(hp, *channels)
    assert all(e < 1e-12 for e in errors.values()), errors


def test_masks_match_the_authors_loop_on_every_level():
    _, _, boxes, _ = _inputs(1, 4, 4)
    taps = _taps({}, boxes)
    for stride in LEVELS.values():
        h, w = PADDED[0] // stride, PADDED[1] // stride
        grid, images = grid_boxes(taps.gt_instances, IMAGE_SIZES, (h, w), stride, "image_size")
        fg, bg = focal_masks(grid, images, (len(IMAGE_SIZES), 1, h, w), torch.float64)
        fg_ref, bg_ref = ref_masks(boxes, IMAGE_SIZES, len(IMAGE_SIZES), h, w)
        assert torch.equal(fg[:, 0], fg_ref)
        assert torch.allclose(bg[:, 0], bg_ref, rtol=0, atol=1e-15)


def test_a_box_covers_floor_to_ceil_inclusive_and_weighs_its_unclipped_cell_count():
    # grid 4 x 6 over an unpadded 32 x 48 image (image_size = padded: no stretch)
    boxes = torch.tensor([[9.0, 4.0, 24.0, 15.0], [40.0, 20.0, 48.0, 32.0]])
    fg, bg = focal_masks(*grid_boxes([_instances(boxes, (32, 48))], [(32, 48)], (4, 6), 8,
                                     "image_size"), (1, 1, 4, 6), torch.float64)
    first = torch.zeros(4, 6, dtype=torch.float64)
    first[0:3, 1:4] = 1.0 / (3 * 3)  # rows floor(0.5)..ceil(1.875), columns floor(1.125)..ceil(3)
    second = torch.zeros(4, 6, dtype=torch.float64)
    second[2:4, 5:6] = 1.0 / (3 * 2)  # rows 2..4 and columns 5..6, cut to the map
    assert torch.equal(fg[0, 0], torch.maximum(first, second))
    assert bg[0, 0].sum().item() == pytest.approx(1.0)
    assert torch.equal(bg[0, 0] > 0, fg[0, 0] == 0)


def _instances(boxes: torch.Tensor, size: Tuple[int, int]) -> Instances:
    instances = Instances(size)
    instances.gt_boxes = Boxes(boxes)
    return instances


def test_image_size_mapping_stretches_a_padded_image_and_stride_does_not():
    box = torch.tensor([[16.0, 16.0, 32.0, 32.0]])
    unpadded = [_instances(box, (32, 48))]
    # the image fills 32 x 48 pixels of a 64 x 48 padded batch: grid 8 x 6 at stride 8
    stretched, _ = grid_boxes(unpadded, [(32, 48)], (8, 6), 8, "image_size")
    by_stride, _ = grid_boxes(unpadded, [(32, 48)], (8, 6), 8, "stride")
    assert stretched.tolist() == [[2.0, 4.0, 4.0, 8.0]]
    assert by_stride.tolist() == [[2.0, 2.0, 4.0, 4.0]]
    same, _ = grid_boxes([_instances(box, (64, 48))], [(64, 48)], (8, 6), 8, "image_size")
    assert same.tolist() == by_stride.tolist()  # no padding: the two rules agree


def test_attention_loss_reaches_the_student_and_the_gcblocks_start_as_identity():
    s, t, boxes, _ = _inputs(2, 8, 8)
    head = FGDHead(_cfg(), _shapes(8), _shapes(8)).double()
    s = {k: v.requires_grad_(True) for k, v in s.items()}
    with EventStorage():
        losses = head(_taps(s, boxes), TeacherOutputs(features=t))
    n = len(IMAGE_SIZES)
    plain = sum(((s[l] - t[l]) ** 2).sum() / n for l in LEVELS) * RETINANET["LAMBDA"]
    assert losses["loss_kd_fgd_global"].item() == pytest.approx(plain.item(), rel=1e-12)
    losses["loss_kd_fgd_attention"].backward()
    assert all(s[l].grad.abs().sum() > 0 for l in LEVELS)


def test_identical_maps_give_zero_focal_and_attention_terms():
    s, _, boxes, _ = _inputs(3, 8, 8)
    head = FGDHead(_cfg(), _shapes(8), _shapes(8)).double()
    with EventStorage():
        losses = head(_taps(s, boxes), TeacherOutputs(features=s))
    assert all(losses[f"loss_kd_fgd_{k}"].item() == 0 for k in ("fg", "bg", "attention", "global"))


def test_defaults_are_the_authors_retinanet_values_and_ranges_are_checked():
    fgd = get_d2kd_cfg().DISTILL.FGD
    assert {k: fgd[k] for k in RETINANET} == RETINANET
    assert fgd.BOX_MAPPING == "image_size"
    for key, value in (("TEMPERATURE", 0.0), ("ALPHA", -1.0), ("LAMBDA", math.inf),
                       ("BOX_MAPPING", "centre")):
        cfg = get_d2kd_cfg()
        cfg.DISTILL.FGD[key] = value
        with pytest.raises(ConfigError, match=f"DISTILL.FGD.{key}"):
            check_key_ranges(cfg)
