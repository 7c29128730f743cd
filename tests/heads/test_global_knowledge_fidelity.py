"""Global knowledge's losses and response weights against the authors' released code,
transcribed here (its prototype generation: tests/prototypes/test_pgm_fidelity.py).

Release: github.com/hikvision-research/DAVAR-Lab-ML, commit
545c886cf8162edb77ef7b517ecba6a1f8d56e2b, folder ECCV22_Distilling_Object_Detectors_with_Global_
Knowledge/ObjectPerceptron/ (``KD`` below: mmdetection/third_party/kd/mmdet/). Each ``release_*``
function restates, in plain float64 torch written for this test, what one piece of that code
computes; the file and function are named in its docstring. The release runs the prototype
selection in half precision on a GPU; the transcriptions compute the same formulas in float64.
docs/methods/global_knowledge.md ("Fidelity") lists these checks and their measured errors.
"""
import math
from typing import Dict, List, Sequence

import pytest
import torch
import torch.nn.functional as F
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2kd.heads.global_knowledge import GlobalKnowledgeHead, KDInstances, RoIAlignSpec
from d2kd.heads.global_knowledge_losses import local_feature_loss
from d2kd.prototypes import roi_align_mean
from d2kd.structures import StudentKind, StudentTaps, TeacherOutputs, level_id

RTOL = 1e-10  # float64 on both sides


def _rel(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return float((ours - ref).abs().max() / ref.abs().max().clamp(min=1e-300))


# ---- transcriptions of the release ---------------------------------------------------------
def release_box_feature(fmap: torch.Tensor, box: Sequence[float], stride: int) -> torch.Tensor:
    """KD/strategy/kd_one_stage_strategy.py, ``r2i_om_loss``: the (C,) mean of a (C, H, W) map
    over rows int(|y1| / s) .. int(|y2| / s) and columns int(|x1| / s) .. int(|x2| / s)
    (slices, so clipped to the map)."""
    x1, y1, x2, y2 = box
    rows = slice(int(abs(y1) / stride), int(abs(y2) / stride) + 1)
    cols = slice(int(abs(x1) / stride), int(abs(x2) / stride) + 1)
    return fmap[:, rows, cols].mean(dim=(1, 2))


def release_cosines(f: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """``template_box_distance``: cosines of the rows of f (M, D) to prototypes (P, D)."""
    return F.normalize(f, dim=1) @ F.normalize(prototypes, dim=1).t()


def release_weight(f_s: torch.Tensor, f_t: torch.Tensor, protos_s: torch.Tensor,
                   protos_t: torch.Tensor) -> torch.Tensor:
    """Eq. 8 as ``r2i_om_loss`` / ``r2i_soft_weight`` compute it for one instance (D,) against
    its class's prototypes (K, D) of one level."""
    best_s = release_cosines(f_s[None], protos_s).max()
    best_t = release_cosines(f_t[None], protos_t).max()
    return 1 - (best_s - best_t).abs()


def release_smooth_l1_mean(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    d = (a - b).abs()
    return torch.where(d < 1, 0.5 * d * d, d - 0.5).mean()


def release_global_loss(boxes: List[torch.Tensor], labels: List[torch.Tensor],
                        s_maps: Dict[int, torch.Tensor], t_maps: Dict[int, torch.Tensor],
                        protos_s: Dict[int, torch.Tensor], protos_t: Dict[int, torch.Tensor],
                        k: int, factor: float) -> torch.Tensor:
    """``r2i_om_loss`` run by ``forward_single`` on every level (stride -> maps (N, C, H, W),
    prototypes (n_cls * K, D), class c in rows c K .. (c + 1) K) with every box of every
    image (``boxes``/``labels`` per image), times ``pair_wise_factor``; mmdet's
    ``_parse_losses`` sums the per-level list (mmdetection/mmdet/models/detectors/base.py)."""
    total = 0.0
    for stride in s_maps:
        f_s, f_t, w = [], [], []
        for image, (image_boxes, image_labels) in enumerate(zip(boxes, labels)):
            for box, label in zip(image_boxes.tolist(), image_labels.tolist()):
                f_s.append(release_box_feature(s_maps[stride][image], box, stride))
                f_t.append(release_box_feature(t_maps[stride][image], box, stride))
                rows = slice(label * k, (label + 1) * k)
                w.append(release_weight(f_s[-1], f_t[-1], protos_s[stride][rows],
                                        protos_t[stride][rows]))
        w = torch.stack(w)[:, None]
        total = total + factor * release_smooth_l1_mean(
            release_cosines(torch.stack(f_s), protos_s[stride]) * w,
            release_cosines(torch.stack(f_t), protos_t[stride]) * w)
    return total


def _bilinear(fmap: torch.Tensor, y: float, x: float) -> torch.Tensor:
    """mmcv2/mmcv/ops/csrc/common_cuda_helper.hpp, ``bilinear_interpolate``, for all
    channels of a (C, H, W) map."""
    _, height, width = fmap.shape
    if y < -1.0 or y > height or x < -1.0 or x > width:
        return fmap.new_zeros(fmap.shape[0])
    y, x = max(y, 0.0), max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (hy * hx * fmap[:, y_low, x_low] + hy * lx * fmap[:, y_low, x_high]
            + ly * hx * fmap[:, y_high, x_low] + ly * lx * fmap[:, y_high, x_high])


def release_roi_align(fmap: torch.Tensor, box: Sequence[float], scale: float, size: int = 7,
                      sampling_ratio: int = 0, aligned: bool = True) -> torch.Tensor:
    """mmcv2/mmcv/ops/csrc/roi_align_cuda_kernel.cuh, ``roi_align_forward_cuda_kernel``,
    average mode (mmcv2/mmcv/ops/roi_align.py: ``RoIAlign`` defaults aligned=True; the
    release's configs/faster_rcnn_coco_kd_config.py sets output_size=7, sampling_ratio=0):
    (C, size, size) of a (C, H, W) map."""
    offset = 0.5 if aligned else 0.0
    x0, y0, x1, y1 = (v * scale - offset for v in box)
    height, width = y1 - y0, x1 - x0
    if not aligned:
        height, width = max(height, 1.0), max(width, 1.0)
    bin_h, bin_w = height / size, width / size
    grid_h = sampling_ratio if sampling_ratio > 0 else math.ceil(height / size)
    grid_w = sampling_ratio if sampling_ratio > 0 else math.ceil(width / size)
    count = max(grid_h * grid_w, 1)
    out = fmap.new_zeros(fmap.shape[0], size, size)
    for ph in range(size):
        for pw in range(size):
            for iy in range(grid_h):
                y = y0 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    x = x0 + pw * bin_w + (ix + 0.5) * bin_w / grid_w
                    out[:, ph, pw] += _bilinear(fmap, y, x)
            out[:, ph, pw] /= count
    return out


def release_roi_level(box: Sequence[float], num_levels: int = 4) -> int:
    """mmdetection/mmdet/models/roi_heads/roi_extractors/single_level_roi_extractor.py,
    ``map_roi_levels`` (finest_scale 56): the RoI's level index among p2 .. p5."""
    x1, y1, x2, y2 = box
    level = math.floor(math.log2(math.sqrt((x2 - x1) * (y2 - y1)) / 56 + 1e-6))
    return min(max(level, 0), num_levels - 1)


def release_response_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, w: torch.Tensor,
                          temperature: float) -> torch.Tensor:
    """KD/models/losses/kd_loss.py, ``knowledge_distillation_kl_div_loss``: per RoI
    KL(softmax(t / T) || softmax(s / T)) averaged over the classes, times T^2 and the RoI's
    weight, averaged over the RoIs."""
    p_t = torch.softmax(t_logits / temperature, dim=1)
    log_p_s = torch.log_softmax(s_logits / temperature, dim=1)
    kl = (p_t * (p_t.log() - log_p_s)).mean(dim=1) * temperature ** 2
    return (kl * w).mean()


def release_rcnn_response(proposals: List[Instances], num_classes: int, s_maps, t_maps,
                          protos_s, protos_t, k: int, s_logits, t_logits,
                          temperature: float, roi_features: bool = True) -> torch.Tensor:
    """KD/strategy/kd_two_stage_strategy.py, ``r2i_soft_weight`` then ``KDLoss``: each positive
    RoI's weight from the AdaptiveAvgPool2d(1) of its RoIAlign features (``roi_feats`` of
    KD/models/detectors/kd_two_stage_detector.py: each model's RoI extractor on its own FPN)
    on its ``map_roi_levels`` level. ``roi_features=False`` pools the box instead
    (:func:`release_box_feature`: d2kd's RESPONSE_POOLING 'box', for the measured effect).
    Levels are strides 4, 8, 16, 32; logits (R, n_cls + 1) cover every sampled proposal."""
    rows, w, start = [], [], 0
    for image, p in enumerate(proposals):
        for j, (box, label) in enumerate(zip(p.proposal_boxes.tensor.tolist(),
                                             p.gt_classes.tolist())):
            if label < num_classes:  # positives; their classes index the prototypes
                stride = 4 * 2 ** release_roi_level(box)
                if roi_features:
                    f_s = release_roi_align(s_maps[stride][image], box, 1 / stride).mean((1, 2))
                    f_t = release_roi_align(t_maps[stride][image], box, 1 / stride).mean((1, 2))
                else:
                    f_s = release_box_feature(s_maps[stride][image], box, stride)
                    f_t = release_box_feature(t_maps[stride][image], box, stride)
                cls_rows = slice(label * k, (label + 1) * k)
                w.append(release_weight(f_s, f_t, protos_s[stride][cls_rows],
                                        protos_t[stride][cls_rows]))
                rows.append(start + j)
        start += len(p)
    return release_response_loss(s_logits[rows], t_logits[rows], torch.stack(w), temperature)


# ---- d2kd's side -----------------------------------------------------------------------------
def _head(levels: Sequence[str], c_s: int, c_t: int, num_classes: int, k: int,
          response_weight: float = 0.0, **kwargs) -> GlobalKnowledgeHead:
    shapes = {l: ShapeSpec(channels=c_s, stride=2 ** level_id(l)) for l in levels}
    t_shapes = {l: ShapeSpec(channels=c_t, stride=2 ** level_id(l)) for l in levels}
    kind = StudentKind(dense=False, anchored=True, anchor_levels=tuple(levels),
                       num_classes=num_classes, has_rpn=True)
    return GlobalKnowledgeHead(
        levels=levels, student_shapes=shapes, teacher_shapes=t_shapes, student_kind=kind,
        num_prototypes=k, global_weight=5.0, feature_weight=1.0,
        response_weight=response_weight, temperature=2.0, fg_lambda=1.0, bg_lambda=4.0,
        **kwargs).double()


def _fill_bank(head: GlobalKnowledgeHead, g: torch.Generator):
    """Random prototypes for every level and class; returns them per stride as the release
    stores them: (n_cls * K, D), class-major."""
    bank = head.bank
    k = bank.teacher.shape[2]
    protos_s, protos_t = {}, {}
    for index, level in enumerate(bank.levels):
        for cls in range(bank.num_classes):
            bank.set_prototypes(index, cls,
                                torch.randn(k, bank.teacher.shape[3], generator=g).double(),
                                torch.randn(k, bank.student.shape[3], generator=g).double())
        stride = 2 ** level_id(level)
        protos_s[stride] = bank.student[index].flatten(0, 1)
        protos_t[stride] = bank.teacher[index].flatten(0, 1)
    return protos_s, protos_t


def _maps(levels, n, c, size, g):
    """Random maps of an input of ``size`` pixels per level: stride -> (N, C, H, W)."""
    return {2 ** level_id(l): torch.randn(n, c, size[0] // 2 ** level_id(l),
                                         size[1] // 2 ** level_id(l), generator=g).double()
            for l in levels}


def _by_level(maps, levels):
    return {l: maps[2 ** level_id(l)] for l in levels}



# ---- (c) the global loss -----------------------------------------------------------------
def _global_case(seed: int):
    """Three levels, two images, KD instances assigned to levels at random."""
    g = torch.Generator().manual_seed(seed)
    levels, size, n_cls, k = ["p3", "p4", "p5"], (96, 128), 3, 2
    s_maps, t_maps = _maps(levels, 2, 5, size, g), _maps(levels, 2, 7, size, g)
    instances, boxes, labels = {}, [[], []], [[], []]
    for level in levels:
        m = 3
        xy = torch.rand(m, 2, generator=g) * torch.tensor([100.0, 70.0])
        wh = 4 + torch.rand(m, 2, generator=g) * 40
        box = torch.cat([xy, (xy + wh).minimum(torch.tensor([127.9, 95.9]))], 1).double()
        cls = torch.randint(0, n_cls, (m,), generator=g)
        img = torch.randint(0, 2, (m,), generator=g)
        instances[level] = KDInstances(box, cls, img, torch.zeros(m, dtype=torch.long))
        for b, c, i in zip(box, cls, img.tolist()):
            boxes[i].append(b)
            labels[i].append(c)
    boxes = [torch.stack(b) for b in boxes]
    labels = [torch.stack(c) for c in labels]
    return levels, s_maps, t_maps, instances, boxes, labels, n_cls, k, g


def _global_losses(head, levels, s_maps, t_maps, instances):
    taps = StudentTaps(features=_by_level(s_maps, levels))
    outputs = TeacherOutputs(features=_by_level(t_maps, levels))
    with EventStorage(0):
        return head.instance_losses(taps, outputs, instances)


@pytest.mark.parametrize("seed", [0, 1])
def test_global_loss_uses_every_instance_on_every_level_as_released(seed):
    levels, s_maps, t_maps, instances, boxes, labels, n_cls, k, g = _global_case(seed)
    head = _head(levels, 5, 7, n_cls, k)
    protos_s, protos_t = _fill_bank(head, g)
    ours = _global_losses(head, levels, s_maps, t_maps,
                          instances)["loss_kd_global_knowledge_global"]
    reference = release_global_loss(boxes, labels, s_maps, t_maps, protos_s, protos_t, k, 5.0)
    assert _rel(ours, reference) < RTOL

    # The switch: each level's own instances only (the release's computation restricted so).
    assigned = _head(levels, 5, 7, n_cls, k, global_instances="assigned")
    assigned.bank.load_state_dict(head.bank.state_dict())
    ours = _global_losses(assigned, levels, s_maps, t_maps,
                          instances)["loss_kd_global_knowledge_global"]
    reference = sum(
        release_global_loss([instances[l].boxes[instances[l].images == i] for i in range(2)],
                            [instances[l].classes[instances[l].images == i] for i in range(2)],
                            {s: s_maps[s]}, {s: t_maps[s]}, protos_s, protos_t, k, 5.0)
        for l, s in zip(levels, (8, 16, 32)))
    assert _rel(ours, reference) < RTOL


def test_feature_loss_matches_the_released_decoupled_loss_with_the_same_mask():
    """KD/models/losses/kd_loss.py, ``KDLoss.forward`` with p_str 'decouple': the mask
    repeated over the channels, its foreground normalised by max(1, 2 sum mask), the
    background (mask = 0) by max(1, 2 sum(1 - onehot)), times kd_param[2] = [4, 1]."""
    g = torch.Generator().manual_seed(3)
    s = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 4, 6, 5, generator=g, dtype=torch.float64)
    mask = torch.zeros(2, 1, 6, 5).double()
    mask[0, 0, 1:4, 2:5], mask[1, 0, 0:2, 0:3], mask[1, 0, 4, 4] = 0.7, 0.95, 0.3
    repeated = mask.expand_as(s)
    onehot = (repeated > 0).double()
    reference = ((s - t) ** 2 * repeated).sum() / max(1.0, float(repeated.sum()) * 2) * 1.0 \
        + ((s - t) ** 2 * (1 - onehot)).sum() / max(1.0, float((1 - onehot).sum()) * 2) * 4.0
    assert _rel(local_feature_loss(s, t, mask, 1.0, 4.0), reference) < RTOL


# ---- (b) the R-CNN response weights ----------------------------------------------------------
@pytest.mark.parametrize("sampling_ratio, aligned", [(0, True), (2, True), (0, False)])
def test_roi_align_mean_is_the_mean_of_the_released_roi_align(sampling_ratio, aligned):
    g = torch.Generator().manual_seed(4)
    maps = torch.randn(2, 3, 12, 10, generator=g).double()
    boxes = torch.tensor([[3.0, 5.0, 60.0, 41.0], [0.0, 0.0, 79.5, 95.0], [30.2, 11.7, 33.0, 14.1],
                          [-6.0, 40.0, 20.0, 99.0]]).double()
    images = torch.tensor([0, 1, 1, 0])
    ours = roi_align_mean(maps, boxes, images, 8, 7, sampling_ratio, aligned)
    reference = torch.stack([
        release_roi_align(maps[i], b.tolist(), 1 / 8, 7, sampling_ratio, aligned).mean((1, 2))
        for b, i in zip(boxes, images.tolist())])
    assert _rel(ours, reference) < RTOL


def _rcnn_case(seed: int):
    """Faster R-CNN levels p2-p5 on 256 x 256 inputs; positive RoIs on p2, p3 and p4."""
    g = torch.Generator().manual_seed(seed)
    levels, n_cls, k = ["p2", "p3", "p4", "p5"], 3, 2
    s_maps, t_maps = _maps(levels, 2, 4, (256, 256), g), _maps(levels, 2, 6, (256, 256), g)
    proposals = []
    for image in range(2):
        sides = torch.tensor([30.0, 60.0, 95.0, 130.0, 190.0, 232.0, 50.0])  # sqrt(area)
        aspect = 0.9 + 0.2 * torch.rand(len(sides), generator=g)  # every box inside the image
        w, h = sides * aspect.sqrt(), sides / aspect.sqrt()
        x0 = torch.rand(len(sides), generator=g) * (255.0 - w)
        y0 = torch.rand(len(sides), generator=g) * (255.0 - h)
        p = Instances((256, 256))
        p.proposal_boxes = Boxes(torch.stack([x0, y0, x0 + w, y0 + h], 1).double())
        p.gt_classes = torch.tensor([0, 2, 1, 1, 0, 2, n_cls])  # the last one: background
        proposals.append(p)
    rois = sum(len(p) for p in proposals)
    s_logits = torch.randn(rois, n_cls + 1, generator=g).double()
    t_logits = torch.randn(rois, n_cls + 1, generator=g).double()
    taps = StudentTaps(features=_by_level(s_maps, levels), sampled_proposals=proposals,
                       roi_predictions=(s_logits, None))
    outputs = TeacherOutputs(features=_by_level(t_maps, levels), roi_predictions=(t_logits, None))
    return levels, n_cls, k, g, s_maps, t_maps, proposals, s_logits, t_logits, taps, outputs


def _response(head, taps, outputs):
    with EventStorage(0):
        return head(taps, outputs)["loss_kd_global_knowledge_resp"]


@pytest.mark.parametrize("seed", [0, 1])
def test_rcnn_response_weights_come_from_roi_align_as_released(seed):
    (levels, n_cls, k, g, s_maps, t_maps, proposals, s_logits, t_logits, taps,
     outputs) = _rcnn_case(seed)
    spec = RoIAlignSpec(tuple(levels), resolution=7, sampling_ratio=0, aligned=True)
    head = _head(levels, 4, 6, n_cls, k, response_weight=1.0, response_pooler=spec)
    protos_s, protos_t = _fill_bank(head, g)
    reference = release_rcnn_response(proposals, n_cls, s_maps, t_maps, protos_s, protos_t, k,
                                      s_logits, t_logits, 2.0)
    assert _rel(_response(head, taps, outputs), reference) < RTOL

    # The switch: the box-pooled weights of the feature and global terms.
    box = _head(levels, 4, 6, n_cls, k, response_weight=1.0)
    box.bank.load_state_dict(head.bank.state_dict())
    reference = release_rcnn_response(proposals, n_cls, s_maps, t_maps, protos_s, protos_t, k,
                                      s_logits, t_logits, 2.0, roi_features=False)
    assert _rel(_response(box, taps, outputs), reference) < RTOL


def test_roi_response_weights_need_prototypes_on_some_box_pooler_level():
    spec = RoIAlignSpec(("p2", "p3", "p4", "p5"), 7, 0, True)
    with pytest.raises(ValueError, match="RESPONSE_POOLING"):
        _head(["p6", "p7"], 4, 4, 2, 2, response_weight=1.0, response_pooler=spec)
    # distilled levels narrower than the pooler's: p2's RoIs are assigned to p3 and stay there
    _head(["p3", "p4", "p5"], 4, 4, 2, 2, response_weight=1.0, response_pooler=spec)
    assert [spec.level_of(l) for l in ("p2", "p3", "p6")] == ["p2", "p3", "p5"]
