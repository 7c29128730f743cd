"""DetKDS as the authors' release computes it: every op and distance of the paper's space, the
knowledge inputs and every released distiller, against this file's transcription of the release.

Reference: github.com/lliai/DetKDS at commit a7d2127f360bfe243125025a94e3e843aa9741e8:

- mmdet/distillation/losses/operations.py: the transforms (_TRANS_FUNC1/2/3) and distances
  (_DIS_FUNC), each reduced by ``no_weight`` (a mean);
- mmdet/distillation/losses/auto_detkd.py: ``FeatureLoss`` (get_feat_loss, get_fg_and_bg_loss,
  get_instances_loss, get_logit_loss);
- mmdet/distillation/distillers/detection_distillation_{retinanet,fcos,gfl,reppoints,
  faster_rcnn}.py: which terms each distiller adds to the loss (a sum over levels);
- configs/distillers/detkds/*.py: the released distillers.

The ``release_*`` functions below transcribe those files' shapes, reductions, constants and
order of operations in plain torch (the RoIAlign call is torchvision's, as the release's). Both
sides get the same random float64 tensors, GT boxes, image sizes and random masks (each mask
drawn by the release's rule and handed out in the order the release draws them).
"""
import itertools
from typing import Callable, Iterator, List, Sequence

import pytest
import torch
from detectron2.layers import ShapeSpec
from detectron2.structures import Boxes, ImageList, Instances
from torchvision.ops import roi_align

from d2kd.heads import DetKDSHead, TeacherOutputs
from d2kd.heads.detkds import DISTANCES, SLOT_OPS, parse_genome
from d2kd.heads.detkds import ops as detkds_ops
from d2kd.heads.detkds.genome import transform
from d2kd.structures import StudentTaps

TAU = 0.5  # operations.py: T=0.5 of trans_satt / trans_natt / trans_catt
MASK_THRESHOLD = 0.65  # operations.py: trans_mask(f, threshold=0.65)
REL_TOL = 1e-12


# ---- transcription of operations.py ----------------------------------------------------
class Masks:
    """The random masks of ``trans_mask``: ``torch.rand((N, 1, H, W))``, 0 where the draw
    exceeds 1 - 0.65, else 1. ``draw`` hands a new one to d2kd (it replaces
    d2kd.heads.masks.random_keep_mask) and records it; ``replay`` gives the release the same
    masks in the same order."""

    def __init__(self, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.drawn: List[torch.Tensor] = []

    def draw(self, x: torch.Tensor, drop_ratio: float) -> torch.Tensor:
        assert drop_ratio == MASK_THRESHOLD
        n, _, h, w = x.shape
        u = torch.rand((n, 1, h, w), generator=self.generator, dtype=torch.float64)
        mask = torch.where(u > 1 - MASK_THRESHOLD, 0.0, 1.0).to(x.dtype)
        self.drawn.append(mask)
        return mask

    def replay(self) -> Iterator[torch.Tensor]:
        return iter(self.drawn)


def release_satt(f, masks=None):
    n, _, h, w = f.shape
    channel_mean = f.abs().mean(dim=1, keepdim=True)
    weights = h * w * torch.softmax((channel_mean / TAU).view(n, -1), dim=1)
    return f * torch.sqrt(weights.view(n, h, w)[:, None])


def release_catt(f, masks=None):
    c = f.shape[1]
    spatial_mean = f.abs().mean(dim=2).mean(dim=2)
    weights = c * torch.softmax(spatial_mean / TAU, dim=1)
    return f * torch.sqrt(weights[:, :, None, None])


def release_natt(f, masks=None):
    return f.shape[0] * torch.softmax(f / TAU, dim=0)


def release_mask(f, masks):
    mask = next(masks)
    assert mask.shape == (f.shape[0], 1) + tuple(f.shape[2:])
    return f * mask


def _pad(f, p):
    """Zeros appended at the right and bottom up to a multiple of p."""
    n, c, h, w = f.shape
    out = f.new_zeros(n, c, h + (p - h % p) % p, w + (p - w % p) % p)
    out[:, :, :h, :w] = f
    return out


def release_scale(p):
    """trans_multi_scale_r<p>: 'b c (h1 h2) (w1 w2) -> b c h1 w1', max, h2 = w2 = p."""
    def op(f, masks=None):
        f = _pad(f, p)
        n, c, h, w = f.shape
        return f.reshape(n, c, h // p, p, w // p, p).amax(dim=(3, 5))
    return op


def release_local(p):
    """trans_local_s<p>: 'b c (h hp) (w wp) -> b (c h w) hp wp', hp = wp = p."""
    def op(f, masks=None):
        f = _pad(f, p)
        n, c, h, w = f.shape
        rows, cols = h // p, w // p
        out = f.new_empty(n, c * rows * cols, p, p)
        for ci, i, j in itertools.product(range(c), range(rows), range(cols)):
            out[:, (ci * rows + i) * cols + j] = f[:, ci, i * p:(i + 1) * p, j * p:(j + 1) * p]
        return out
    return op


def release_normalize(dims):
    """F.normalize(f, p=2, dim=dims): f / max(||f||_2 over dims, 1e-12)."""
    def op(f, masks=None):
        return f / f.pow(2).sum(dim=dims, keepdim=True).sqrt().clamp(min=1e-12)
    return op


def release_softmax(dim, log=False):
    """trans_(log)softmax_N / _C / _HW; HW: (N, C, H, W) -> (N, C, H*W) first."""
    def op(f, masks=None):
        if dim == "HW":
            f, d = f.reshape(f.shape[0], f.shape[1], -1), 2
        else:
            d = dim
        return torch.log_softmax(f, dim=d) if log else torch.softmax(f, dim=d)
    return op


def release_min_max(f, masks=None):
    return (f - f.min()) / (f.max() - f.min() + 1e-9)


def release_batchnorm(f, masks=None):
    """A new nn.BatchNorm2d in training mode: batch statistics (biased variance), eps 1e-5,
    weight 1, bias 0."""
    mean = f.mean(dim=(0, 2, 3), keepdim=True)
    var = (f - mean).pow(2).mean(dim=(0, 2, 3), keepdim=True)
    return (f - mean) / torch.sqrt(var + 1e-5)


def identity(f, masks=None):
    return f


RELEASE_TRANS1 = {"no": identity, "satt": release_satt, "natt": release_natt,
                  "catt": release_catt, "mask": release_mask}
RELEASE_TRANS2 = {"no": identity, "scale_r1": release_scale(1), "scale_r2": release_scale(2),
                  "multi_scale_r4": release_scale(4), "local_s1": release_local(1),
                  "local_s2": release_local(2), "local_s4": release_local(4),
                  "scale": lambda f, masks=None: (f + 1.0) / 2.0}
RELEASE_TRANS3 = {"no": identity,
                  "batch": lambda f, masks=None: f.reshape(f.shape[0], -1),
                  "channel": lambda f, masks=None: f.reshape(f.shape[0], f.shape[1], -1),
                  "norm_HW": release_normalize((2, 3)), "norm_C": release_normalize(1),
                  "norm_N": release_normalize(0),
                  "softmax_N": release_softmax(0), "softmax_C": release_softmax(1),
                  "softmax_HW": release_softmax("HW"),
                  "logsoftmax_N": release_softmax(0, log=True),
                  "logsoftmax_C": release_softmax(1, log=True),
                  "logsoftmax_HW": release_softmax("HW", log=True),
                  "min_max_normalize": release_min_max, "batchnorm": release_batchnorm}


def release_l1(s, t):
    return (s - t).abs().mean()


def release_l2(s, t):
    return (s - t).pow(2).mean()


def release_smooth_l1(s, t):
    d = (s - t).abs()
    return torch.where(d < 1.0, 0.5 * d * d, d - 0.5).mean()


def release_cos(s, t):
    """F.cosine_similarity(f_s, f_t, eps=1e-8) (dim 1), averaged: the similarity itself."""
    dot = (s * t).sum(dim=1)
    return (dot / (s.norm(dim=1).clamp(min=1e-8) * t.norm(dim=1).clamp(min=1e-8))).mean()


def release_pear(s, t):
    s = s - s.mean(1).unsqueeze(1)
    t = t - t.mean(1).unsqueeze(1)
    return (1 - (s * t).sum(1) / (s.norm(dim=1) * t.norm(dim=1) + 1e-8)).mean()


def release_cor(s, t):
    n = s.shape[0]
    s = ((s - s.mean(0)) / s.std(0)).reshape(n, -1)
    t = ((t - t.mean(0)) / t.std(0)).reshape(n, -1)
    c = (s * t).sum(dim=0) / n
    return torch.log2(((c - 1).abs().pow(2.0).pow(1.01)).sum())


def release_kl(s, t):
    """F.kl_div(f_s, f_t, reduction='none'), averaged: t * (log t - s) (0 where t = 0)."""
    return torch.where(t > 0, t * (t.clamp(min=1e-300).log() - s), torch.zeros_like(t)).mean()


RELEASE_DIS = {"l1": release_l1, "l2": release_l2, "kl": release_kl,
               "smooth_l1": release_smooth_l1, "cos": release_cos, "pear": release_pear,
               "cor": release_cor}

def release_as_loss(dis: str):
    """The release's distance as d2kd's loss: ``cos`` turned into 1 - cosine (the release
    returns the similarity; d2kd's decision, docs/methods/detkds.md), the others as they are."""
    if dis == "cos":
        return lambda s, t: 1 - release_cos(s, t)
    return RELEASE_DIS[dis]


#: d2kd's token -> the release's, where they differ
RELEASE_TOKEN = {"scale_r4": "multi_scale_r4", "affine": "scale", "min_max": "min_max_normalize",
                 "pearson": "pear", "correlation": "cor"}


def release_token(name: str) -> str:
    return RELEASE_TOKEN.get(name, name)


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


@pytest.fixture
def masks(monkeypatch) -> Masks:
    source = Masks(seed=11)
    monkeypatch.setattr(detkds_ops, "random_keep_mask", source.draw)
    return source


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).abs().max() / reference.abs().max())


# ---- every op and distance of the paper's space ----------------------------------------
RELEASE_SLOTS = {1: RELEASE_TRANS1, 2: RELEASE_TRANS2, 3: RELEASE_TRANS3}
PAPER_OPS = [(slot, name) for slot in (1, 2, 3) for name in SLOT_OPS[slot].names(paper_only=True)]


def test_the_paper_space_is_the_releases():
    for slot, release in RELEASE_SLOTS.items():
        assert sorted(map(release_token, SLOT_OPS[slot].names(paper_only=True))) == sorted(release)
    assert sorted(map(release_token, DISTANCES.names(paper_only=True))) == sorted(RELEASE_DIS)


@pytest.mark.parametrize("slot, name", PAPER_OPS, ids=[f"{s}-{n}" for s, n in PAPER_OPS])
def test_op_is_the_releases(slot, name, masks):
    """Same values and the same layout, on a map whose sides are not multiples of 4; d2kd's
    softmax_HW / logsoftmax_HW keep (N, C, H, W) where the release returns (N, C, H*W)."""
    x = torch.randn(4, 3, 7, 5, generator=torch.Generator().manual_seed(slot), dtype=torch.float64)
    ours = SLOT_OPS[slot].get(name)(x)
    reference = RELEASE_SLOTS[slot][release_token(name)](x, masks.replay())
    if name.endswith("softmax_HW"):
        ours = ours.flatten(2)
    assert ours.shape == reference.shape
    assert relative_error(ours, reference) < REL_TOL


DISTANCE_INPUTS = {"map": (4, 6, 5, 7), "channel": (4, 6, 35), "batch": (4, 210)}
PAPER_DISTANCES = [d for d in DISTANCES.names(paper_only=True) if d != "kl"]


@pytest.mark.parametrize("layout", sorted(DISTANCE_INPUTS))
@pytest.mark.parametrize("name", PAPER_DISTANCES)
def test_distance_is_the_releases(name, layout):
    """``cos`` is 1 - the release's value (the release returns the similarity)."""
    g = torch.Generator().manual_seed(3)
    s, t = (torch.randn(DISTANCE_INPUTS[layout], generator=g, dtype=torch.float64)
            for _ in range(2))
    ours = DISTANCES.get(name)(s, t)
    reference = release_as_loss(release_token(name))(s, t)
    assert relative_error(ours, reference) < REL_TOL


def test_the_releases_kl_is_no_kl_and_ours_is():
    """Why ``kl`` departs: on equal distributions the release's value is not 0 (it reads the
    student side as log-probabilities); on log-probabilities it is NaN-prone (log of < 0)."""
    p = torch.softmax(torch.randn(4, 6, 3, 3, dtype=torch.float64), dim=1)
    assert abs(float(release_kl(p, p))) > 1e-3
    assert float(DISTANCES.get("kl")(p, p, axis="C")) == pytest.approx(0.0, abs=1e-12)


# ---- the random mask: one per tensor ---------------------------------------------------
@pytest.mark.parametrize("op, draws", [("mask", 2), ("mask_shared", 1)])
def test_mask_draws_one_mask_per_tensor(op, draws, masks):
    formula = parse_genome(f"global:{op}|no|no|l1|w=1").formulas[0]
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    s, t = transform(formula, x, x.clone())
    assert len(masks.drawn) == draws
    assert torch.equal(s, x * masks.drawn[0]) and torch.equal(t, x * masks.drawn[-1])


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
def test_released_distiller_computes_the_releases_value(config, seed, masks):
    genome, release_loss = RELEASED[config]
    student, teacher, boxes = random_inputs(seed)
    head = build_head(genome, LEVELS)
    masks.drawn.clear()  # the build's dry run draws masks too
    ours = sum(head(student, teacher).values())
    reference = release_loss(student, teacher, boxes, masks.replay())
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
def test_feature_input_computes_the_releases_value(formula, masks):
    name, body = formula.split(":")
    s1, s2, s3, dis = body.split("|")[:4]
    student, teacher, boxes = random_inputs(2)
    head = build_head(formula, LEVELS)
    masks.drawn.clear()  # the build's dry run draws masks too
    ours = sum(head(student, teacher).values())
    trans = (s1, release_token(s2), release_token(s3))
    release = {"global": feature_terms(global_=trans + (release_token(dis), 2)),
               "fgbg": feature_terms(fbg=trans + (2,)),
               "instance": feature_terms(ins=trans + (release_token(dis), 2))}[name]
    reference = release(student, teacher, boxes, masks.replay())
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
