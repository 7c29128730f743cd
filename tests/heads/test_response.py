"""Logit and localization KD heads against hand-written formulas."""
import math

import pytest
import torch
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from d2kd.config import get_d2kd_cfg
from d2kd.heads import LocKDHead, LogitKDHead, TeacherOutputs
from d2kd.heads.response import binary_kl
from d2kd.structures import StudentTaps


def _cfg(arch, **logit):
    cfg = get_d2kd_cfg()
    cfg.DISTILL.STUDENT_META_ARCHITECTURE = arch
    for key, value in logit.items():
        cfg.DISTILL.LOGIT[key] = value
    return cfg


def _softmax(row, temperature):
    exps = [math.exp(v / temperature) for v in row]
    return [e / sum(exps) for e in exps]


def test_binary_kl_is_the_bernoulli_kl():
    t, s = torch.tensor([0.3, -2.0, 4.0]), torch.tensor([-1.0, 0.5, 3.0])
    for got, a, b in zip(binary_kl(t, s).tolist(), t.tolist(), s.tolist()):
        p, q = 1 / (1 + math.exp(-a)), 1 / (1 + math.exp(-b))
        assert got == pytest.approx(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)),
                                    rel=1e-5)


def _rcnn_taps(seed, num_classes=3, rois=5):
    g = torch.Generator().manual_seed(seed)
    proposals = Instances((32, 32))
    proposals.proposal_boxes = Boxes(torch.tensor([[0, 0, 8, 8]] * rois, dtype=torch.float32))
    proposals.gt_classes = torch.tensor([0, 2, num_classes, 1, num_classes])[:rois]
    scores = torch.randn(rois, num_classes + 1, generator=g)
    deltas = torch.randn(rois, 4 * num_classes, generator=g)
    return proposals, scores, deltas


def test_rcnn_logit_kd_is_t_squared_mean_kl_of_softened_softmax():
    proposals, s_scores, s_deltas = _rcnn_taps(0)
    _, t_scores, t_deltas = _rcnn_taps(1)
    head = LogitKDHead(_cfg("GeneralizedRCNN", WEIGHT=0.7, TEMPERATURE=3.0), {}, {})
    loss = head(StudentTaps(sampled_proposals=[proposals], roi_predictions=(s_scores, s_deltas)),
                TeacherOutputs(roi_predictions=(t_scores, t_deltas)))["loss_kd_logit_cls"]
    expected = 0.0
    for s_row, t_row in zip(s_scores.tolist(), t_scores.tolist()):
        p, q = _softmax(t_row, 3.0), _softmax(s_row, 3.0)
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    expected = 0.7 * 9.0 * expected / len(s_scores)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rcnn_loc_kd_uses_the_gt_class_deltas_of_positive_rois():
    proposals, s_scores, s_deltas = _rcnn_taps(2)
    _, t_scores, t_deltas = _rcnn_taps(3)
    cfg = _cfg("GeneralizedRCNN")
    cfg.DISTILL.LOC.LOSS, cfg.DISTILL.LOC.WEIGHT = "l1", 2.0
    head = LocKDHead(cfg, {}, {})
    loss = head(StudentTaps(sampled_proposals=[proposals], roi_predictions=(s_scores, s_deltas)),
                TeacherOutputs(roi_predictions=(t_scores, t_deltas)))["loss_kd_loc_box"]
    diffs = []
    for r, c in enumerate(proposals.gt_classes.tolist()):
        if c < 3:  # background RoIs (class 3) are skipped
            diffs += [abs(s_deltas[r, 4 * c + k].item() - t_deltas[r, 4 * c + k].item())
                      for k in range(4)]
    assert loss.item() == pytest.approx(2.0 * sum(diffs) / len(diffs), rel=1e-5)


def _dense_taps(seed, labels, num_classes=2, anchors=3):
    """One level of 2x2 cells, ``anchors`` anchors each; labels (N, 2*2*anchors)."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(1, anchors * num_classes, 2, 2, generator=g)
    deltas = torch.randn(1, anchors * 4, 2, 2, generator=g)
    return [[logits], [deltas]], [torch.tensor(labels)]


def _anchor_values(level_map, dim, index, anchors=3):
    """Value vector of anchor ``index`` in detectron2's (H, W, A) order from (1, A*dim, H, W)."""
    cell, a = divmod(index, anchors)
    y, x = divmod(cell, 2)
    return [level_map[0, a * dim + k, y, x].item() for k in range(dim)]


def test_dense_logit_kd_at_positive_anchors():
    labels = [0, 2, -1, 1, 2, 2, 0, 2, 2, 2, 2, 1]  # 2 = background, -1 = ignored
    s_pred, anchor_labels = _dense_taps(4, labels)
    t_pred, _ = _dense_taps(5, labels)
    head = LogitKDHead(_cfg("RetinaNet", WEIGHT=1.0, TEMPERATURE=2.0), {}, {})
    with EventStorage():
        loss = head(StudentTaps(dense_predictions=s_pred, anchor_labels=anchor_labels),
                    TeacherOutputs(dense_predictions=t_pred))["loss_kd_logit_cls"]
    terms = []
    for i, label in enumerate(labels):
        if 0 <= label < 2:
            for sv, tv in zip(_anchor_values(s_pred[0][0], 2, i),
                              _anchor_values(t_pred[0][0], 2, i)):
                p, q = 1 / (1 + math.exp(-tv / 2)), 1 / (1 + math.exp(-sv / 2))
                terms.append(p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q)))
    assert loss.item() == pytest.approx(4.0 * sum(terms) / len(terms), rel=1e-5)


def test_dense_loc_kd_at_positive_anchors():
    labels = [1, 2, 2, 0, -1, 2, 2, 2, 0, 2, 2, 2]
    s_pred, anchor_labels = _dense_taps(6, labels)
    t_pred, _ = _dense_taps(7, labels)
    cfg = _cfg("RetinaNet")
    cfg.DISTILL.LOC.LOSS, cfg.DISTILL.LOC.BETA = "smooth_l1", 0.5
    head = LocKDHead(cfg, {}, {})
    loss = head(StudentTaps(dense_predictions=s_pred, anchor_labels=anchor_labels),
                TeacherOutputs(dense_predictions=t_pred))["loss_kd_loc_box"]
    terms = []
    for i, label in enumerate(labels):
        if 0 <= label < 2:
            for sv, tv in zip(_anchor_values(s_pred[1][0], 4, i),
                              _anchor_values(t_pred[1][0], 4, i)):
                d = abs(sv - tv)
                terms.append(0.5 * d * d / 0.5 if d < 0.5 else d - 0.25)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


@pytest.mark.parametrize("head_class", [LogitKDHead, LocKDHead])
def test_identical_responses_give_zero_loss(head_class):
    labels = [0, 1, 2, 1, 0, 2, 2, 2, 0, 2, 1, 2]
    pred, anchor_labels = _dense_taps(8, labels)
    head = head_class(_cfg("RetinaNet"), {}, {})
    with EventStorage():
        losses = head(StudentTaps(dense_predictions=pred, anchor_labels=anchor_labels),
                      TeacherOutputs(dense_predictions=pred))
    assert all(abs(v.item()) < 1e-7 for v in losses.values())
