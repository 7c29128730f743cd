"""Cascade R-CNN teachers for CNN students (docs/transformer_teachers.md): they answer on the
student's RoIs with every stage on the same boxes, checked against the stages run by hand and
detectron2's own box decoding / encoding; they train the R-CNN response heads; a Cascade student
and a bad stage choice are one-line errors."""
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import CONFIGS, tiny_training_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.structures import Boxes

from d2kd.config import ConfigError, load_config
from d2kd.engine import DistillTrainer
from d2kd.engine.preflight import check_model
from d2kd.modeling.teacher import FrozenTeacher

RCNN_STUDENT = "DigitsDet/faster_rcnn_R18_from_R50_mgd.yaml"
RESPONSE_HEADS = ["LogitKDHead", "LocKDHead"]

CASCADE_OPTS = ["MODEL.ROI_HEADS.NAME", "CascadeROIHeads",
                "MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG", "True"]


def _cascade_teacher(cascade_stage: str):
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet/faster_rcnn_R50_teacher.yaml"),
                      CASCADE_OPTS + ["MODEL.WEIGHTS", ""])
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # non-trivial predictors: random weights of a realistic scale
        for p in model.roi_heads.box_predictor.parameters():
            p.normal_(0, 0.02)
    return FrozenTeacher(model, "RGB", "random", "cascade", cascade_stage=cascade_stage)


@pytest.mark.parametrize("cascade_stage", ["mean", "last"])
def test_cascade_teacher_roi_predictions_against_the_stages_run_by_hand(cascade_stage):
    teacher = _cascade_teacher(cascade_stage)
    roi_heads = teacher.model.roi_heads
    assert len(roi_heads.box_predictor) == 3
    images = torch.randn(2, 3, 160, 192)
    features = teacher.backbone_features(images)
    torch.manual_seed(1)
    xy = torch.rand(2, 7, 2) * torch.tensor([150.0, 120.0])
    wh = 4 + torch.rand(2, 7, 2) * 40
    boxes = [Boxes(torch.cat([xy[i], xy[i] + wh[i]], dim=1)) for i in range(2)]
    student_coder = Box2BoxTransform(weights=(10.0, 10.0, 5.0, 5.0))

    scores, deltas = teacher.roi_predictions(features, boxes, student_coder)

    # by hand: pool once, each stage's head and linear layers, softmax, mean over stages
    pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features], boxes)
    logits, raw_deltas = [], []
    for head, predictor in zip(roi_heads.box_head, roi_heads.box_predictor):
        x = head(pooled).flatten(1)
        logits.append(predictor.cls_score(x))
        raw_deltas.append(predictor.bbox_pred(x))
    if cascade_stage == "mean":
        mean_probs = sum(F.softmax(x, dim=1) for x in logits) / 3
        assert torch.allclose(F.softmax(scores, dim=1), mean_probs, atol=1e-6)
        assert torch.allclose(scores.exp().sum(dim=1), torch.ones(14))  # log-probabilities
    else:
        assert torch.allclose(scores, logits[-1])
    # the last stage's deltas (its coding 30, 30, 15, 15): its boxes, in the student's coding
    rois = torch.cat([b.tensor for b in boxes])
    last_coder = roi_heads.box_predictor[-1].box2box_transform
    assert tuple(last_coder.weights) == (30.0, 30.0, 15.0, 15.0)
    decoded = last_coder.apply_deltas(raw_deltas[-1], rois)
    assert deltas.shape == (14, 4)  # class-agnostic cascade regression
    assert torch.allclose(deltas, student_coder.get_deltas(rois, decoded), atol=1e-4)
    assert torch.allclose(student_coder.apply_deltas(deltas, rois), decoded, atol=1e-3)
    # the teacher's own coding: its raw deltas
    assert torch.allclose(teacher.roi_predictions(features, boxes, last_coder)[1],
                          raw_deltas[-1])


@pytest.fixture(scope="module")
def cascade_weights(module_tmp_path_factory):
    cfg = load_config(os.path.join(CONFIGS, "DigitsDet/faster_rcnn_R50_teacher.yaml"),
                      CASCADE_OPTS + ["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu"])
    torch.manual_seed(0)
    directory = module_tmp_path_factory.mktemp("cascade")
    DetectionCheckpointer(build_model(cfg), save_dir=str(directory)).save("teacher")
    return str(directory / "teacher.pth")


@pytest.mark.slow
@pytest.mark.parametrize("cascade_stage", ["mean", "last"])
def test_cascade_teacher_trains_rcnn_response_heads(cascade_stage, cascade_weights,
                                                    tiny_digitsdet, tmp_path):
    cfg = tiny_training_cfg(RCNN_STUDENT, str(tmp_path))
    cfg.DISTILL.TEACHER.WEIGHTS = [cascade_weights]
    cfg.DISTILL.TEACHER.OPTS = CASCADE_OPTS
    cfg.DISTILL.TEACHER.CASCADE_STAGE = cascade_stage
    cfg.DISTILL.HEADS = ["LogitKDHead", "LocKDHead", "GlobalKnowledgeHead"]
    cfg.DISTILL.IN_FEATURES = ["p3", "p4", "p5"]
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS = 2
    cfg.DISTILL.PROTOTYPES.NUM_PER_CLASS = 2
    trainer = DistillTrainer(cfg)
    assert trainer.model.teachers[0].cascade_stage == cascade_stage
    trainer.train()
    losses = trainer.storage.latest()
    for key in ("loss_kd_logit_cls", "loss_kd_loc_box", "loss_kd_global_knowledge_resp"):
        assert torch.isfinite(torch.tensor(losses[key][0])), key


def test_cascade_student_and_bad_stage_choice_are_one_line_errors(cascade_weights,
                                                                  tiny_digitsdet, tmp_path):
    cfg = tiny_training_cfg(RCNN_STUDENT, str(tmp_path))
    cfg.DISTILL.TEACHER.WEIGHTS = [cascade_weights]
    cfg.DISTILL.TEACHER.OPTS = CASCADE_OPTS
    cfg.DISTILL.HEADS = ["LogitKDHead"]
    cfg.DISTILL.TEACHER.CASCADE_STAGE = "first"
    with pytest.raises(ConfigError, match=r"^DISTILL.TEACHER.CASCADE_STAGE='first' is not one "
                                          r"of 'mean', 'last'.$"):
        check_model(cfg)
    cfg.DISTILL.TEACHER.CASCADE_STAGE = "mean"
    cfg.MODEL.ROI_HEADS.NAME = "CascadeROIHeads"  # the student
    cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG = True
    with pytest.raises(ConfigError, match=r"^LogitKDHead: the student's RoI heads "
                                          r"\(CascadeROIHeads\) have 3 box predictors; .*may be "
                                          r"the teacher, not the student\)\.$"):
        check_model(cfg)
