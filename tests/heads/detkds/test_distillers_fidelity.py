"""DetKDS as the authors' release computes it: the knowledge inputs and every released
distiller, against this file's transcription of the release's auto_detkd.py and conftest.py's of
its operations.py (every op and distance on its own: test_ops_fidelity.py).

Reference: github.com/lliai/DetKDS at commit a7d2127f360bfe243125025a94e3e843aa9741e8:

- mmdet/distillation/losses/operations.py: the transforms (_TRANS_FUNC1/2/3) and distances
  (_DIS_FUNC), each reduced by ``no_weight`` (a mean), transcribed in conftest.py;
- mmdet/distillation/losses/auto_detkd.py: ``FeatureLoss`` (get_feat_loss, get_fg_and_bg_loss,
  get_instances_loss, get_logit_loss);
- mmdet/distillation/distillers/detection_distillation_{retinanet,fcos,gfl,reppoints,
  faster_rcnn}.py: which terms each distiller adds to the loss (a sum over levels);
- configs/distillers/detkds/*.py: the released distillers.

The ``release_*`` functions (here and in conftest.py) transcribe those files' shapes,
reductions, constants and order of operations in plain torch (the RoIAlign call is
torchvision's, as the release's). Both sides get the same random float64 tensors, GT boxes,
image sizes and random masks (each mask drawn by the release's rule and handed out in the order
the release draws them).
"""
from typing import Callable, Iterator, List, Sequence

import pytest
import torch
from conftest import relative_error
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances
from helpers.detkds_release import (
    REL_TOL,
    RELEASE_TRANS1,
    RELEASE_TRANS2,
    RELEASE_TRANS3,
    release_as_loss,
    release_l1,
    release_token,
)
from torchvision.ops import roi_align

from d2kd.heads import DetKDSHead, TeacherOutputs
from d2kd.structures import StudentTaps


# ---- transcription of auto_detkd.py (FeatureLoss) --------------------------------------
def release_cascade(f, trans, masks):
    t1, t2, t3 = trans
    return RELEASE_TRANS3[t3](RELEASE_TRANS2[t2](RELEASE_TRANS1[t1](f, masks), masks), masks)


def release_feat_loss(s, t, trans, dis, gamma, masks):
    """get_feat_loss."""
    fs, ft = release_cascade(s, trans, masks), release_cascade(t, trans, masks)
    return gamma * release_as_loss(dis)(fs, ft)


def release_fg_bg_masks(shape, image_sizes, boxes):
    """get_fg_and_bg_loss's Mask_fg, Mask_bg (N, H, W), its loops written out."""
    n, _, h, w = shape
    fg = torch.zeros(n, h, w, dtype=torch.float64)
    bg = torch.ones(n, h, w, dtype=torch.float64)
    for i in range(n):
        img_h, img_w = image_sizes[i]
        for box in boxes[i]:
            x0 = int(torch.floor(box[0] / img_w * w))
            x1 = int(torch.ceil(box[2] / img_w * w))
            y0 = int(torch.floor(box[1] / img_h * h))
            y1 = int(torch.ceil(box[3] / img_h * h))
            area = 1.0 / (y1 + 1 - y0) / (x1 + 1 - x0)
            fg[i, y0:y1 + 1, x0:x1 + 1] = fg[i, y0:y1 + 1, x0:x1 + 1].clamp(min=area)
        bg[i] = torch.where(fg[i] > 0, 0.0, 1.0)
        if bg[i].sum():
            bg[i] /= bg[i].sum()
    return fg, bg


def release_fg_bg_loss(s, t, trans, gamma, image_sizes, boxes, masks):
    """get_fg_and_bg_loss: (fg term, bg term); the distance is l1 whatever fbg_dis says."""
    fg, bg = release_fg_bg_masks(s.shape, image_sizes, boxes)
    fg, bg = fg[:, None], bg[:, None]
    fg_s, fg_t = s * fg, t * fg
    bg_s, bg_t = s * bg, t * bg
    fg_s, fg_t = release_cascade(fg_s, trans, masks), release_cascade(fg_t, trans, masks)
    bg_s, bg_t = release_cascade(bg_s, trans, masks), release_cascade(bg_t, trans, masks)
    return gamma * release_l1(fg_s, fg_t), gamma / 2 * release_l1(bg_s, bg_t)


def release_instance_loss(s, t, trans, dis, gamma, image_sizes, boxes, masks):
    """get_instances_loss: the cascade on the maps, RoIs snapped to the grid, RoIAlign
    ``roi_align(preds, rois, (14, 14), 1.0, False)``."""
    _, _, h, w = s.shape
    fs, ft = release_cascade(s, trans, masks), release_cascade(t, trans, masks)
    rois = []
    for i, image_boxes in enumerate(boxes):
        for box in image_boxes:
            img_h, img_w = image_sizes[i]
            rois.append([float(i), float(torch.floor(box[0] / img_w * w)),
                         float(torch.floor(box[1] / img_h * h)),
                         float(torch.ceil(box[2] / img_w * w)),
                         float(torch.ceil(box[3] / img_h * h))])
    rois = torch.tensor(rois, dtype=s.dtype)
    roi_s = roi_align(fs, rois, (14, 14), 1.0, False)
    roi_t = roi_align(ft, rois, (14, 14), 1.0, False)
    return gamma * release_as_loss(dis)(roi_s, roi_t)


def release_logit_loss(ls, lt, trans3, dis, gamma):
    """get_logit_loss."""
    fs, ft = RELEASE_TRANS3[trans3](ls.sigmoid()), RELEASE_TRANS3[trans3](lt.sigmoid())
    return gamma * release_as_loss(dis)(fs, ft)


# ---- inputs ----------------------------------------------------------------------------
LEVELS = {"p3": (8, 13, 11), "p4": (16, 7, 6), "p5": (32, 4, 3)}  # stride, H, W
IMAGE_SIZES = [(100, 84), (92, 80), (104, 70), (97, 88)]  # before padding to 104 x 88
CHANNELS = 6


def random_boxes(g: torch.Generator) -> List[torch.Tensor]:
    """1 to 3 float32 XYXY boxes inside each image; the third image has none."""
    boxes = []
    for i, (h, w) in enumerate(IMAGE_SIZES):
        k = 0 if i == 2 else int(torch.randint(1, 4, (), generator=g))
        xy = torch.rand(k, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 4 + torch.rand(k, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        boxes.append(torch.cat([xy, (xy + wh).minimum(torch.tensor([w, h]))], dim=1))
    return boxes


def random_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    feats = [{l: torch.randn(len(IMAGE_SIZES), CHANNELS, h, w, generator=g, dtype=torch.float64)
              for l, (_, h, w) in LEVELS.items()} for _ in range(2)]
    boxes = random_boxes(g)
    instances = []
    for (h, w), b in zip(IMAGE_SIZES, boxes):
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(b)
        instances.append(inst)
    images = ImageList(torch.zeros(len(IMAGE_SIZES), 3, 104, 88), IMAGE_SIZES)
    student = StudentTaps(images=images, gt_instances=instances, features=feats[0])
    return student, TeacherOutputs(features=feats[1]), boxes


def build_head(genome: str, levels: Sequence[str], **kwargs) -> DetKDSHead:
    shapes = {l: ShapeSpec(channels=CHANNELS, stride=LEVELS[l][0]) for l in LEVELS}
    return DetKDSHead(genome=genome, levels=list(levels), student_shapes=shapes,
                      teacher_shapes=shapes, dense=False, dry_run_batch_size=len(IMAGE_SIZES),
                      **kwargs)


# ---- the knowledge inputs and the released distillers ----------------------------------
ReleaseTerm = Callable[[StudentTaps, TeacherOutputs, List[torch.Tensor], Iterator], torch.Tensor]


def feature_terms(global_=None, fbg=None, ins=None) -> ReleaseTerm:
    """The terms a distiller adds per level, FeatureLoss's arguments as in the config:
    ``global_`` = (trans1, trans2, trans3, dis, gamma); ``fbg`` = (trans1, trans2, trans3,
    gamma) (fg + bg); ``ins`` = (trans1, trans2, trans3, dis, gamma)."""
    def loss(student, teacher, boxes, masks):
        total = 0.0
        for level in LEVELS:
            s, t = student.features[level], teacher.features[level]
            sizes = student.images.image_sizes
            if global_:
                total = total + release_feat_loss(s, t, global_[:3], global_[3], global_[4],
                                                  masks)
            if fbg:
                total = total + sum(release_fg_bg_loss(s, t, fbg[:3], fbg[3], sizes, boxes,
                                                       masks))
            if ins:
                total = total + release_instance_loss(s, t, ins[:3], ins[3], ins[4], sizes,
                                                      boxes, masks)
        return total
    return loss


CATT_R2_NORMN = ("catt", "scale_r2", "norm_N", "l1")
#: (released config or term, d2kd genome, the release's computation); configs/distillers/detkds/
RELEASED = {
    "retina_r101_distill_retina_r50_fpn_2x_coco": (
        "global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2",
        feature_terms(global_=CATT_R2_NORMN + (6,), fbg=("no", "local_s4", "norm_HW", 2))),
    "fcos_r101_distill_fcos_r50_2x_coco": (
        "global:catt|scale_r2|norm_N|l1|w=5;fgbg:mask|scale_r1|norm_C|l1|w=2",
        feature_terms(global_=CATT_R2_NORMN + (5,), fbg=("mask", "scale_r1", "norm_C", 2))),
    "gfl_r101_distill_gfl_r50_fpn_2x_coco": (
        "global:catt|scale_r2|norm_N|l1|w=10", feature_terms(global_=CATT_R2_NORMN + (10,))),
    "reppoints_rx101_64x4d_distill_reppoints_r50_fpn_2x_coco": (
        "global:catt|scale_r2|norm_N|l1|w=10", feature_terms(global_=CATT_R2_NORMN + (10,))),
    "faster_rcnn_r101_distill_faster_rcnn_r50_fpn_2x_coco": (
        "global:catt|scale_r2|norm_N|l1|w=2", feature_terms(global_=CATT_R2_NORMN + (2,))),
    "retina_rx101_64x4d_distill_retina_r50_fpn_2x_coco": (
        "instance:catt|scale_r1|norm_C|l1|w=50",
        feature_terms(ins=("catt", "scale_r1", "norm_C", "l1", 50))),
    # computed by the released Faster R-CNN FeatureLoss, not added by its distiller; fbg_dis
    # 'l2' is ignored (get_fg_and_bg_loss uses l1); gamma_ins is not a FeatureLoss argument,
    # the intended 0.1 is used
    "faster_rcnn_r101_distill_faster_rcnn_r50_fpn_2x_coco fbg": (
        "fgbg:mask|no|norm_C|l1|w=2", feature_terms(fbg=("mask", "no", "norm_C", 2))),
    "faster_rcnn_r101_distill_faster_rcnn_r50_fpn_2x_coco ins": (
        "instance:mask|scale_r1|norm_C|pearson|w=0.1",
        feature_terms(ins=("mask", "scale_r1", "norm_C", "pear", 0.1))),
}


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("config", sorted(RELEASED))
def test_released_distiller_computes_the_releases_value(config, seed, release_masks):
    genome, release_loss = RELEASED[config]
    student, teacher, boxes = random_inputs(seed)
    head = build_head(genome, LEVELS)
    release_masks.drawn.clear()  # the build's dry run draws masks too
    ours = sum(head(student, teacher).values())
    reference = release_loss(student, teacher, boxes, release_masks.replay())
    assert relative_error(ours, reference) < REL_TOL, (float(ours), float(reference))


def test_released_faster_rcnn_logit_term_computes_the_releases_value():
    """Its logits term (computed, not added): softmax_C of the sigmoid RPN objectness,
    pearson, gamma_logits 0.1, on the four levels the distiller pairs with its config."""
    g = torch.Generator().manual_seed(5)
    shapes = [(13, 11), (7, 6), (4, 3), (2, 2)]
    logits = [[torch.randn(4, 3, h, w, generator=g, dtype=torch.float64) for h, w in shapes]
              for _ in range(2)]
    head = build_head("logit:no|no|softmax_C|pearson|w=0.1", LEVELS)
    ours = head(StudentTaps(rpn_predictions=(logits[0], [])),
                TeacherOutputs(rpn_predictions=(logits[1], [])))["loss_kd_detkds_logit"]
    reference = sum(release_logit_loss(s, t, "softmax_C", "pear", 0.1)
                    for s, t in zip(*logits))
    assert relative_error(ours, reference) < REL_TOL


#: the feature inputs under the ops whose meaning changed (the release's fg/bg term always
#: measures l1, whatever its configured distance: only l1 is compared there; the release's
#: instance term cannot take softmax_HW / logsoftmax_HW, which return (N, C, H*W))
INPUT_FORMULAS = [
    "global:natt|local_s2|softmax_HW|cos|w=2",
    "global:mask|scale_r1|min_max|pearson|w=2",
    "global:satt|affine|batchnorm|correlation|w=2",
    "global:no|local_s1|norm_HW|smooth_l1|w=2",
    "fgbg:natt|local_s2|softmax_HW|l1|w=2",
    "fgbg:mask|scale_r1|min_max|l1|w=2",
    "fgbg:satt|affine|batchnorm|l1|w=2",
    "fgbg:no|local_s1|norm_HW|l1|w=2",
    "instance:natt|no|softmax_C|cos|w=2",
    "instance:mask|scale_r1|min_max|pearson|w=2",
    "instance:satt|affine|batchnorm|correlation|w=2",
]


@pytest.mark.parametrize("formula", INPUT_FORMULAS)
def test_feature_input_computes_the_releases_value(formula, release_masks):
    name, body = formula.split(":")
    s1, s2, s3, dis = body.split("|")[:4]
    student, teacher, boxes = random_inputs(2)
    head = build_head(formula, LEVELS)
    release_masks.drawn.clear()  # the build's dry run draws masks too
    ours = sum(head(student, teacher).values())
    trans = (s1, release_token(s2), release_token(s3))
    release = {"global": feature_terms(global_=trans + (release_token(dis), 2)),
               "fgbg": feature_terms(fbg=trans + (2,)),
               "instance": feature_terms(ins=trans + (release_token(dis), 2))}[name]
    reference = release(student, teacher, boxes, release_masks.replay())
    assert relative_error(ours, reference) < REL_TOL, (float(ours), float(reference))


# ---- d2kd's rules behind the switches --------------------------------------------------
def test_fgbg_mask_rules_on_one_box():
    """Image 64 x 64 on an 8 x 8 map (stride 8), box (10, 10, 30, 20): the release covers
    columns floor(1.25)..ceil(3.75) = 1..4 and rows 1..ceil(2.5) = 3 (12 cells, 1/12 each);
    the centre rule the cells whose centre (4 + 8k) lies in the box: columns 1..3, rows 1..2
    (6 cells, 1/6 each)."""
    inst = Instances((64, 64))
    inst.gt_boxes = Boxes(torch.tensor([[10.0, 10.0, 30.0, 20.0]]))
    student = StudentTaps(images=ImageList(torch.zeros(1, 3, 64, 64), [(64, 64)]),
                          gt_instances=[inst])
    shape = torch.Size((1, CHANNELS, 8, 8))
    expected = {"release": (slice(1, 4), slice(1, 5), 12), "centre": (slice(1, 3), slice(1, 4), 6)}
    for rule, (rows, cols, cells) in expected.items():
        head = build_head("fgbg:no|no|no|l1|w=1", ["p3"], fgbg_mask=rule)
        fg, bg = head._fgbg_masks(student, "p3", shape, torch.float64)
        want = torch.zeros(8, 8, dtype=torch.float64)
        want[rows, cols] = 1.0 / cells
        assert torch.allclose(fg[0, 0], want)
        assert torch.allclose(bg[0, 0], (want == 0).double() / (64 - cells))


def test_instance_boxes_exact_pools_the_exact_boxes_aligned():
    student, teacher, boxes = random_inputs(3)
    head = build_head("instance:no|no|no|l1|w=1", ["p4"], instance_boxes="exact")
    ours = head(student, teacher)["loss_kd_detkds_instance"]
    rois = [b.double() for b in boxes]
    s_roi = roi_align(student.features["p4"], rois, 14, spatial_scale=1 / 16, aligned=True)
    t_roi = roi_align(teacher.features["p4"], rois, 14, spatial_scale=1 / 16, aligned=True)
    assert relative_error(ours, (s_roi - t_roi).abs().mean()) < REL_TOL


def test_config_defaults_are_the_releases():
    from d2kd.config import get_d2kd_cfg

    cfg = get_d2kd_cfg()
    assert (cfg.DISTILL.DETKDS.FGBG_MASK, cfg.DISTILL.DETKDS.INSTANCE_BOXES) == ("release",
                                                                                  "release")
    with pytest.raises(ValueError, match="FGBG_MASK='center' is not one of"):
        build_head("fgbg:no|no|no|l1|w=1", ["p3"], fgbg_mask="center")
