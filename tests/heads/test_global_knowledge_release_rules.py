"""Global knowledge's switchable release rules: the foreground weight map
(``DISTILL.GLOBAL_KNOWLEDGE.WEIGHT_MAP``) and the per-epoch attenuation
(``ATTENUATION_STEP_ITERS``).

Release: github.com/hikvision-research/DAVAR-Lab-ML, commit
545c886cf8162edb77ef7b517ecba6a1f8d56e2b, ECCV22_Distilling_Object_Detectors_with_Global_
Knowledge/ObjectPerceptron/mmdetection/third_party/kd/mmdet/ (``KD`` below). The ``release_*``
functions restate, in plain Python loops written for this test, what the named code computes.
"""
from typing import List

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.utils.events import EventStorage

from d2kd.heads.global_knowledge import GlobalKnowledgeHead
from d2kd.heads.global_knowledge_losses import local_feature_loss
from d2kd.heads.masks import box_weight_maps, released_box_weight_maps
from d2kd.structures import StudentKind


def release_gt_mask(boxes: List[torch.Tensor], weights: List[torch.Tensor], h: int, w: int,
                    stride: int) -> torch.Tensor:
    """KD/strategy/kd_one_stage_strategy.py, ``get_gt_mask`` with weights and imit_range 0,
    for the boxes one level received: per image, in the boxes' order,
    lx = max(int(x1 / s), 0), rx = min(int(x2 / s), w) (ly, ry alike); a box with lx == rx or
    ly == ry sets mask[ly, lx] = max(mask[ly, lx], weight), any other box assigns
    mask[ly:ry, lx:rx] = weight. Returns (N, 1, H, W)."""
    masks = []
    for image_boxes, image_weights in zip(boxes, weights):
        mask = torch.zeros(h, w, dtype=torch.float64)
        for box, weight in zip(image_boxes.tolist(), image_weights.tolist()):
            x1, y1, x2, y2 = (v / stride for v in box)
            lx, rx = max(int(x1), 0), min(int(x2), w)
            ly, ry = max(int(y1), 0), min(int(y2), h)
            if lx == rx or ly == ry:
                mask[ly, lx] = max(float(mask[ly, lx]), weight)
            else:
                mask[ly:ry, lx:rx] = weight
        masks.append(mask)
    return torch.stack(masks)[:, None]


def _boxes(seed: int, n: int, h: int, w: int, stride: int):
    """Boxes inside an (h, w)-cell map of one image per row of ``n``: some thinner than a cell
    (one-cell marks), overlapping, crossing the right and bottom edges; weights in
    [-0.3, 1.2] (Eq. 8 is not clipped)."""
    g = torch.Generator().manual_seed(seed)
    boxes, images, weights = [], [], []
    for i in range(n):
        m = int(torch.randint(1, 9, (1,), generator=g))
        x1 = torch.rand(m, generator=g, dtype=torch.float64) * w * stride
        y1 = torch.rand(m, generator=g, dtype=torch.float64) * h * stride
        size = torch.rand(m, 2, generator=g, dtype=torch.float64) * 5 * stride
        size[torch.rand(m, generator=g) < 0.3, 0] *= 0.1  # thinner than a cell
        boxes.append(torch.stack([x1, y1, x1 + size[:, 0], y1 + size[:, 1]], dim=1))
        images.append(torch.full((m,), i, dtype=torch.long))
        weights.append(torch.rand(m, generator=g, dtype=torch.float64) * 1.5 - 0.3)
    return boxes, weights, torch.cat(boxes), torch.cat(weights), torch.cat(images)


@pytest.mark.parametrize("seed", range(6))
def test_released_weight_map_is_the_releases_get_gt_mask(seed):
    h, w, stride = 7, 9, 8
    per_image, per_weight, boxes, weights, images = _boxes(seed, 3, h, w, stride)
    ours = released_box_weight_maps(boxes, weights, images, torch.Size((3, 4, h, w)), stride)
    assert torch.equal(ours, release_gt_mask(per_image, per_weight, h, w, stride))


def test_released_and_max_rules_differ_only_by_the_end_cell_for_disjoint_positive_boxes():
    """Disjoint boxes, positive weights: the release's exclusive end is the max rule's
    inclusive end on the box shrunk by one cell."""
    stride = 4
    boxes = torch.tensor([[0.0, 0.0, 13.0, 9.0], [17.0, 1.0, 31.0, 30.0], [2.0, 14.0, 15.0, 27.0]],
                         dtype=torch.float64)
    weights = torch.tensor([0.5, 0.9, 0.25], dtype=torch.float64)
    images = torch.zeros(3, dtype=torch.long)
    shape = torch.Size((1, 2, 8, 8))
    shrunk = boxes - torch.tensor([0.0, 0.0, stride, stride], dtype=torch.float64)
    assert torch.equal(released_box_weight_maps(boxes, weights, images, shape, stride),
                       box_weight_maps(shrunk, weights, images, shape, stride))


def test_feature_loss_background_is_where_the_mask_is_not_positive_as_released():
    """KD/models/losses/kd_loss.py, ``KDLoss.forward`` ('decouple'): the background is
    1 - (mask > 0), so a cell holding a negative weight enters both terms."""
    g = torch.Generator().manual_seed(5)
    s = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    t = torch.randn(1, 3, 4, 4, generator=g, dtype=torch.float64)
    mask = torch.zeros(1, 1, 4, 4, dtype=torch.float64)
    mask[0, 0, :2, :2], mask[0, 0, 3, 3] = 0.8, -0.2
    d2 = ((s - t) ** 2).sum(dim=1, keepdim=True)
    fg = (d2 * mask).sum() / max(1.0, 2 * 3 * float(mask.sum()))
    background = (mask <= 0).double()
    bg = (d2 * background).sum() / max(1.0, 2 * 3 * float(background.sum()))
    assert torch.allclose(local_feature_loss(s, t, mask, 1.0, 4.0), fg + 4.0 * bg,
                          rtol=1e-12, atol=0)


def _head(**kwargs) -> GlobalKnowledgeHead:
    shapes = {"p3": ShapeSpec(channels=4, stride=8)}
    kind = StudentKind(dense=False, anchored=True, anchor_levels=("p3",), num_classes=2,
                       has_rpn=True)
    return GlobalKnowledgeHead(levels=["p3"], student_shapes=shapes, teacher_shapes=shapes,
                               student_kind=kind, num_prototypes=1, global_weight=5.0,
                               feature_weight=1.0, response_weight=0.0, temperature=2.0,
                               fg_lambda=1.0, bg_lambda=4.0, **kwargs)


@pytest.mark.parametrize("iteration, expected", [
    (0, 1.0), (124, 1.0), (125, 1 - 1 / 4.8), (300, 1 - 2 / 4.8), (599, 1 - 4 / 4.8)])
def test_per_epoch_attenuation_is_the_releases(iteration, expected):
    """KD/strategy/kd_two_stage_strategy.py, ``__call__``: kd_att_val = 1 - epoch / max_epochs
    (here epochs of 125 iterations, 600 iterations = 4.8 epochs; hand-computed)."""
    head = _head(attenuation_iters=600, attenuation_step_iters=125)
    with EventStorage(iteration):
        assert head._attenuation() == pytest.approx(expected, rel=1e-12)


def test_attenuation_decays_every_iteration_without_steps():
    head = _head(attenuation_iters=600)
    with EventStorage(599):
        assert head._attenuation() == pytest.approx(1 / 600, rel=1e-12)
