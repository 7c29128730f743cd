"""Feature-imitation heads on FPN levels: FitNet, MGD, FGFI and decoupled fg/bg."""
from typing import Dict, Optional, Sequence

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from torch import nn

from ..config.defaults import register_config_extension
from ..config.ranges import FRACTION_BELOW_ONE, UNIT_INTERVAL, register_key_rules
from ..structures import StudentKind, StudentTaps, TeacherOutputs
from .alignment import FeatureAligner, check_levels
from .masks import box_cell_masks, near_object_masks, random_keep_mask
from .prototype_weighting import PrototypeWeighting
from .registry import DISTILL_HEAD_REGISTRY, DistillHead


def generation_block(channels: int) -> nn.Sequential:
    """MGD's generator: conv3x3 -> ReLU -> conv3x3, channels -> channels."""
    return nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(channels, channels, 3, padding=1))


class FeatureHead(DistillHead):
    """Shared part: the distilled levels, their aligner and, when ``prototype_weighted``, the
    RDM robustness weights of GT instances as per-cell weights (global-knowledge Table 4)."""

    def __init__(self, *, levels: Sequence[str], student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec], adapters: bool = True,
                 weighting: Optional[PrototypeWeighting] = None):
        """
        Args:
            levels: the distilled levels (student names; ``DISTILL.IN_FEATURES``).
            student_shapes, teacher_shapes: both backbones' output shapes, the teacher's under
                the student's level names.
            adapters: 1x1 adapters where channels differ (``DISTILL.ADAPTER``).
            weighting: RDM cell weights (``PROTOTYPE_WEIGHTED``), or None.
        """
        super().__init__()
        self.levels = list(levels)
        self.aligner = FeatureAligner(self.levels, student_shapes, teacher_shapes, adapters)
        self.strides = {level: teacher_shapes[level].stride for level in self.levels}
        self.weighting = weighting

    @staticmethod
    def feature_args(cfg: CfgNode, student_shapes: Dict[str, ShapeSpec],
                     teacher_shapes: Dict[str, ShapeSpec], prototype_weighted: bool = False
                     ) -> Dict:
        """The base's arguments from ``cfg`` (for the heads' ``from_config``)."""
        levels = list(cfg.DISTILL.IN_FEATURES)
        check_levels(levels, student_shapes, teacher_shapes)
        weighting = (PrototypeWeighting(cfg, levels, student_shapes, teacher_shapes)
                     if prototype_weighted else None)
        return {"levels": levels, "student_shapes": student_shapes,
                "teacher_shapes": teacher_shapes, "adapters": cfg.DISTILL.ADAPTER,
                "weighting": weighting}

    def squared_error(self, aligned: torch.Tensor, student: StudentTaps, teacher: TeacherOutputs,
                      level: str) -> torch.Tensor:
        """(N, C, H, W) ``(A(S) - T)^2`` on ``level``, times the prototype cell weights if any."""
        squared = (aligned - teacher.features[level]).pow(2)
        if self.weighting is not None:
            squared = squared * self.weighting.cell_weights(student, teacher, level)
        return squared


@DISTILL_HEAD_REGISTRY.register()
class FitNetHead(FeatureHead):
    """FitNet: ``weight * mean((A(S) - T)^2)`` per level over every cell, summed over levels."""

    name = "fitnet"

    @configurable
    def __init__(self, *, weight: float = 1.0, **feature_head):
        super().__init__(**feature_head)
        self.weight = weight

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        return {**cls.feature_args(cfg, student_shapes, teacher_shapes,
                                   cfg.DISTILL.FITNET.PROTOTYPE_WEIGHTED),
                "weight": cfg.DISTILL.FITNET.WEIGHT}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        per_level = {l: self.weight * self.squared_error(aligned[l], student, teacher, l).mean()
                     for l in self.levels}
        self.log("loss", per_level)
        return {"loss_kd_fitnet_feat": sum(per_level.values())}


@DISTILL_HEAD_REGISTRY.register()
class MGDHead(FeatureHead):
    """Masked generative distillation (Yang et al., ECCV 2022).

    Per level: a random spatial mask M (a cell is zeroed with probability ``MASK_RATIO``,
    shared over channels, resampled every step), a generator G = conv3x3 -> ReLU -> conv3x3,
    and ``(alpha / N) * sum_{n,c,h,w} (G(A(S) * M) - T)^2`` with N the batch size.

    Shapes per distilled level: student map S (N, C_s, H_s, W_s), teacher map T
    (N, C_t, H_t, W_t); A(S) (N, C_t, H_t, W_t) after the 1x1 adapter (channels differ) and
    bilinear resize (strides differ); M (N, 1, H_t, W_t); G_l maps C_t -> C_t channels (one
    generator per level). alpha = ``DISTILL.MGD.ALPHA``, the mask ratio lambda =
    ``DISTILL.MGD.MASK_RATIO``. Returns ``loss_kd_mgd_feat`` (0-dim, the sum over levels);
    logs ``kd/mgd/loss/<level>``. Reference: docs/methods/baselines.md (MGD), and
    docs/methods/mtpd.md, where it is the per-stage loss.
    """

    name = "mgd"

    @configurable
    def __init__(self, *, alpha: float = 2e-5, mask_ratio: float = 0.65, **feature_head):
        super().__init__(**feature_head)
        self.alpha = alpha
        self.mask_ratio = mask_ratio
        teacher_shapes = feature_head["teacher_shapes"]
        self.generators = nn.ModuleDict(
            {level: generation_block(teacher_shapes[level].channels) for level in self.levels})

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        return {**cls.feature_args(cfg, student_shapes, teacher_shapes),
                "alpha": cfg.DISTILL.MGD.ALPHA, "mask_ratio": cfg.DISTILL.MGD.MASK_RATIO}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        per_level = {}
        for level in self.levels:
            s, t = aligned[level], teacher.features[level]
            generated = self.generators[level](s * random_keep_mask(s, self.mask_ratio))
            per_level[level] = self.alpha * (generated - t).pow(2).sum() / s.shape[0]
        self.log("loss", per_level)
        return {"loss_kd_mgd_feat": sum(per_level.values())}


def _anchor_generator_for_levels(cfg: CfgNode, levels, student_shapes) -> DefaultAnchorGenerator:
    """The student's anchors (MODEL.ANCHOR_GENERATOR) on the distilled levels."""
    kind = StudentKind.from_config(cfg)
    if not kind.anchored:
        raise ValueError("FGFIHead needs anchors; this student has none (FCOS, or an R-CNN "
                         "without an RPN). Use FgBgHead for such students.")
    anchor_levels = list(kind.anchor_levels)
    sizes = cfg.MODEL.ANCHOR_GENERATOR.SIZES
    missing = [level for level in levels if level not in anchor_levels]
    if missing:
        raise ValueError(f"FGFIHead: levels {missing} carry no anchors (anchor levels: "
                         f"{anchor_levels}); restrict DISTILL.IN_FEATURES to those.")
    if len(sizes) > 1:
        sizes = [sizes[anchor_levels.index(level)] for level in levels]
    return DefaultAnchorGenerator(
        sizes=sizes, aspect_ratios=cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS,
        strides=[student_shapes[level].stride for level in levels],
        offset=cfg.MODEL.ANCHOR_GENERATOR.OFFSET)


@DISTILL_HEAD_REGISTRY.register()
class FGFIHead(FeatureHead):
    """Fine-grained feature imitation (Wang et al., CVPR 2019): imitation near objects only.

    Mask: cells with an anchor whose IoU with a GT box exceeds ``PSI`` times that box's best
    anchor IoU over all distilled levels. Loss:
    ``weight * sum_l sum_{cells, channels} m (A(S) - T)^2 / (2 * Np)``, Np = masked cells.
    """

    name = "fgfi"

    @configurable
    def __init__(self, *, anchor_generator: DefaultAnchorGenerator, weight: float = 0.01,
                 psi: float = 0.5, **feature_head):
        """``anchor_generator``: the student's anchors on the distilled levels, in order."""
        super().__init__(**feature_head)
        self.weight = weight
        self.psi = psi
        self.anchor_generator = anchor_generator

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        feature_head = cls.feature_args(cfg, student_shapes, teacher_shapes)
        return {**feature_head, "weight": cfg.DISTILL.FGFI.WEIGHT, "psi": cfg.DISTILL.FGFI.PSI,
                "anchor_generator": _anchor_generator_for_levels(
                    cfg, feature_head["levels"], student_shapes)}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        anchors = self.anchor_generator([student.features[l] for l in self.levels])
        shapes = [student.features[l].shape for l in self.levels]
        masks = near_object_masks(student.gt_instances, anchors, shapes,
                                  self.anchor_generator.num_anchors[0], self.psi)
        sums = {l: (m * (aligned[l] - teacher.features[l]).pow(2)).sum()
                for l, m in zip(self.levels, masks)}
        num_masked = torch.stack([m.sum() for m in masks]).sum().clamp(min=1.0)
        per_level = {l: self.weight * v / (2 * num_masked) for l, v in sums.items()}
        self.log("loss", per_level)
        self.log("masked_fraction", {l: m.mean() for l, m in zip(self.levels, masks)})
        return {"loss_kd_fgfi_feat": sum(per_level.values())}


@DISTILL_HEAD_REGISTRY.register()
class FgBgHead(FeatureHead):
    """Decoupled foreground/background imitation (DeFeat-style).

    Per level, with F = cells whose centre lies in a GT box and B the rest:
    ``FG_WEIGHT * sum_F (A(S) - T)^2 / (|F| C) + BG_WEIGHT * sum_B (A(S) - T)^2 / (|B| C)``,
    summed over levels.
    """

    name = "fgbg"

    @configurable
    def __init__(self, *, fg_weight: float = 1.0, bg_weight: float = 2.0, **feature_head):
        super().__init__(**feature_head)
        self.fg_weight = fg_weight
        self.bg_weight = bg_weight

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        return {**cls.feature_args(cfg, student_shapes, teacher_shapes,
                                   cfg.DISTILL.FGBG.PROTOTYPE_WEIGHTED),
                "fg_weight": cfg.DISTILL.FGBG.FG_WEIGHT, "bg_weight": cfg.DISTILL.FGBG.BG_WEIGHT}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        fg_terms, bg_terms = {}, {}
        for level in self.levels:
            t = teacher.features[level]
            squared = self.squared_error(aligned[level], student, teacher, level)
            fg = box_cell_masks(student.gt_instances, t.shape, self.strides[level])
            bg = 1.0 - fg
            channels = t.shape[1]
            fg_terms[level] = (self.fg_weight * (squared * fg).sum()
                               / (fg.sum() * channels).clamp(min=1))
            bg_terms[level] = (self.bg_weight * (squared * bg).sum()
                               / (bg.sum() * channels).clamp(min=1))
        self.log("fg", fg_terms)
        self.log("bg", bg_terms)
        return {"loss_kd_fgbg_fg": sum(fg_terms.values()),
                "loss_kd_fgbg_bg": sum(bg_terms.values())}


@register_config_extension
def add_feature_imitation_config(cfg: CfgNode) -> None:
    """``DISTILL.{FITNET,MGD,FGFI,FGBG}``: the feature-imitation heads of this module."""
    if "FITNET" in cfg.DISTILL:
        return
    # FitNet: MSE between adapted student and teacher maps on every cell.
    cfg.DISTILL.FITNET = CfgNode()
    # Loss weight (the loss is a mean over cells and channels, summed over levels).
    cfg.DISTILL.FITNET.WEIGHT = 1.0
    # Multiply each GT box's cells by its RDM robustness weight (prototype bank refreshed as
    # for GlobalKnowledgeHead, options in DISTILL.PROTOTYPES); global-knowledge Table 4.
    cfg.DISTILL.FITNET.PROTOTYPE_WEIGHTED = False

    # MGD (masked generative distillation), see docs/methods/baselines.md.
    cfg.DISTILL.MGD = CfgNode()
    # alpha: the loss is (alpha / N) * sum over (n, c, h, w) of (G(S * M) - T)^2.
    cfg.DISTILL.MGD.ALPHA = 2e-5
    # lambda: probability that a spatial cell of the student map is masked (resampled per step).
    cfg.DISTILL.MGD.MASK_RATIO = 0.65

    # FGFI (fine-grained feature imitation): imitation on cells near objects only.
    cfg.DISTILL.FGFI = CfgNode()
    # Loss weight; the loss is sum(mask * (A(S) - T)^2) / (2 * masked cells).
    cfg.DISTILL.FGFI.WEIGHT = 0.01
    # psi: an anchor counts as near a GT box when IoU > psi * (best anchor IoU of that box).
    cfg.DISTILL.FGFI.PSI = 0.5

    # Decoupled foreground / background imitation (DeFeat-style).
    cfg.DISTILL.FGBG = CfgNode()
    # Weight of the foreground term (cells inside GT boxes; mean over those cells x channels).
    cfg.DISTILL.FGBG.FG_WEIGHT = 1.0
    # Weight of the background term (the other cells); larger than the foreground's.
    cfg.DISTILL.FGBG.BG_WEIGHT = 2.0
    # As DISTILL.FITNET.PROTOTYPE_WEIGHTED, for this head.
    cfg.DISTILL.FGBG.PROTOTYPE_WEIGHTED = False


register_key_rules({
    "DISTILL.MGD.MASK_RATIO": FRACTION_BELOW_ONE,
    "DISTILL.FGFI.PSI": UNIT_INTERVAL,
})
