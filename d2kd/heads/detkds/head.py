"""The searched-distiller head of DetKDS: a genome string turned into a loss
(d2kd/heads/detkds/genome.py; docs/methods/detkds.md).

Knowledge inputs, per distilled level, summed over levels:

- ``global``: the adapted student map and the teacher map (N, C, H, W);
- ``fgbg``: maps times a foreground mask (1 / box area in cells on GT-box cells, max over
  boxes) and times a background mask (uniform on the other cells, summing to 1 per image);
  the background term counts half;
- ``instance``: the cascade on the maps, then RoIAlign of every GT box at 14 x 14 on the level;
- ``logit``: sigmoid of the classification maps (dense students) or of the RPN objectness
  (R-CNN students); only slot 3 applies;
- ``loc``: the regression maps (dense deltas or RPN deltas) at positions where the teacher's
  top score exceeds ``LOC_SCORE_THRESH`` (our definition: the authors left it out).
"""
from typing import Dict, Sequence

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torchvision.ops import roi_align

from ...config.defaults import register_config_extension
from ...config.ranges import UNIT_INTERVAL, register_key_rules
from ...structures import StudentKind, StudentTaps, TeacherOutputs
from ..alignment import FeatureAligner
from ..masks import box_area_masks
from ..registry import DISTILL_HEAD_REGISTRY, DistillHead
from .genome import GenomeError, distance, dry_run, parse_genome, transform

INSTANCE_SIZE = 14
#: the genome inputs computed from (adapted) feature maps
FEATURE_INPUTS = frozenset({"global", "fgbg", "instance"})
BACKGROUND_WEIGHT = 0.5


@DISTILL_HEAD_REGISTRY.register()
class DetKDSHead(DistillHead):
    """A DetKDS distiller (Li et al., ICML 2024) given as a genome, ``DISTILL.DETKDS.GENOME``
    (docs/methods/detkds.md).

    Each formula ``<input>:<t1>|<t2>|<t3>|<dist>|w=<gamma>`` of the genome gives one loss

        ``L_input = sum_levels gamma * dist(t3(t2(t1(X^s))), t3(t2(t1(X^t))))``

    with the slot ops t1, t2, t3 applied identically and independently to both tensors (one
    random mask shared by both for t1 = ``mask``) and ``dist`` a mean over elements
    (d2kd/heads/detkds/ops.py). X^s, X^t per input:

    - ``global``: S~ = A(S) (N, C_t, H, W) (1x1 adapter and bilinear resize of the student map
      (N, C_s, H_s, W_s)) and T (N, C_t, H, W), per level of ``DISTILL.IN_FEATURES``;
    - ``fgbg``: S~ * m_fg, T * m_fg and, at weight 0.5, S~ * m_bg, T * m_bg, with m_fg
      (N, 1, H, W) = 1 / (box area in cells) on GT-box cells (max over boxes) and m_bg
      (N, 1, H, W) uniform on the other cells, summing to 1 per image;
    - ``instance``: the cascade on S~ and T, then RoIAlign of every GT box: (M, C_t, 14, 14),
      M the GT boxes of the batch (the cascade must keep the layout);
    - ``logit``: sigmoid of the classification maps (N, A*K, H, W) of both dense heads, or of
      both RPN objectness maps (N, A, H, W), per head level; slot 3 only;
    - ``loc``: the regression maps (N, A*4, H, W) (dense deltas or RPN deltas) times a mask
      (N, 1, H, W) of the positions where the teacher's top sigmoid score exceeds
      ``LOC_SCORE_THRESH``; slot 3 only.

    Returns one 0-dim loss per input of the genome, ``loss_kd_detkds_<input>`` (weight
    included). The genome is parsed and dry-run at build time (invalid: ValueError).
    """

    name = "detkds"

    @configurable
    def __init__(self, *, genome: str, levels: Sequence[str],
                 student_shapes: Dict[str, ShapeSpec], teacher_shapes: Dict[str, ShapeSpec],
                 dense: bool, adapters: bool = True, loc_score_thresh: float = 0.5,
                 dry_run_batch_size: int = 2):
        """
        Args:
            genome: the distiller, a genome string (``DISTILL.DETKDS.GENOME``); parsed and
                dry-run on ``dry_run_batch_size`` images here.
            levels, student_shapes, teacher_shapes, adapters: as for the feature heads.
            dense: the student is a dense detector (``StudentKind``).
            loc_score_thresh: ``DISTILL.DETKDS.LOC_SCORE_THRESH``.
        """
        super().__init__()
        try:
            self.genome = parse_genome(genome)
            dry_run(self.genome, batch_size=dry_run_batch_size)
        except GenomeError as e:
            raise ValueError(f"DISTILL.DETKDS.GENOME: {e}") from None
        self.levels = list(levels)
        self.strides = {level: student_shapes[level].stride for level in self.levels
                        if level in student_shapes}
        inputs = {f.input for f in self.genome.formulas}
        # adapters only when a formula reads feature maps: a parameter no loss uses would stop
        # DDP (every parameter must receive a gradient)
        self.aligner = (FeatureAligner(self.levels, student_shapes, teacher_shapes, adapters)
                        if inputs & FEATURE_INPUTS else None)
        self.dense = dense
        self.loc_score_thresh = loc_score_thresh
        needs = {"features"} if inputs & FEATURE_INPUTS else set()
        if inputs & {"logit", "loc"}:
            needs.add("dense_predictions" if self.dense else "rpn_predictions")
        self.teacher_needs = frozenset(needs)

    @classmethod
    def from_config(cls, cfg, student_shapes, teacher_shapes):
        return {"genome": cfg.DISTILL.DETKDS.GENOME, "levels": list(cfg.DISTILL.IN_FEATURES),
                "student_shapes": student_shapes, "teacher_shapes": teacher_shapes,
                "dense": StudentKind.from_config(cfg).dense, "adapters": cfg.DISTILL.ADAPTER,
                "loc_score_thresh": cfg.DISTILL.DETKDS.LOC_SCORE_THRESH,
                "dry_run_batch_size": max(cfg.SOLVER.IMS_PER_BATCH, 1)}

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features) if self.aligner else {}
        losses = {}
        for formula in self.genome.formulas:
            term = getattr(self, f"_{formula.input}")
            losses[f"loss_kd_detkds_{formula.input}"] = term(formula, student, teacher, aligned)
        return losses

    def _global(self, formula, student, teacher, aligned) -> torch.Tensor:
        return sum(distance(formula, *transform(formula, aligned[l], teacher.features[l]))
                   for l in self.levels)

    def _fgbg(self, formula, student, teacher, aligned) -> torch.Tensor:
        total = 0.0
        for level in self.levels:
            s, t = aligned[level], teacher.features[level]
            fg = box_area_masks(student.gt_instances, t.shape, self.strides[level])
            bg = (fg == 0).to(t.dtype)
            bg = bg / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)
            total = total + distance(formula, *transform(formula, s * fg, t * fg))
            total = total + BACKGROUND_WEIGHT * distance(formula, *transform(formula, s * bg, t * bg))
        return total

    def _instance(self, formula, student, teacher, aligned) -> torch.Tensor:
        boxes = [inst.gt_boxes.tensor for inst in student.gt_instances]
        if sum(len(b) for b in boxes) == 0:
            return aligned[self.levels[0]].sum() * 0.0
        total = 0.0
        for level in self.levels:
            s, t = transform(formula, aligned[level], teacher.features[level])
            scale = 1.0 / self.strides[level]
            s_roi = roi_align(s, boxes, INSTANCE_SIZE, spatial_scale=scale, aligned=True)
            t_roi = roi_align(t, boxes, INSTANCE_SIZE, spatial_scale=scale, aligned=True)
            total = total + distance(formula, s_roi, t_roi)
        return total

    def _response_maps(self, student: StudentTaps, teacher: TeacherOutputs, kind: int):
        """Per-level (student, teacher) maps: kind 0 = scores, 1 = box regression."""
        if self.dense:
            return list(zip(student.dense_predictions[kind], teacher.dense_predictions[kind]))
        return list(zip(student.rpn_predictions[kind], teacher.rpn_predictions[kind]))

    def _logit(self, formula, student, teacher, aligned) -> torch.Tensor:
        return sum(distance(formula, *transform(formula, s.sigmoid(), t.sigmoid(), slots=(3,)))
                   for s, t in self._response_maps(student, teacher, 0))

    def _loc(self, formula, student, teacher, aligned) -> torch.Tensor:
        total = 0.0
        scores = self._response_maps(student, teacher, 0)
        for (_, t_scores), (s, t) in zip(scores, self._response_maps(student, teacher, 1)):
            keep = (t_scores.sigmoid().amax(dim=1, keepdim=True) > self.loc_score_thresh)
            keep = keep.to(s.dtype)
            total = total + distance(formula, *transform(formula, s * keep, t * keep, slots=(3,)))
        return total


@register_config_extension
def add_detkds_config(cfg: CfgNode) -> None:
    """``DISTILL.DETKDS``: :class:`DetKDSHead` (the search's keys, ``DISTILL.DETKDS.SEARCH``, belong
    to the search application, d2kd/search/config.py)."""
    if "DETKDS" in cfg.DISTILL:
        return
    # DetKDS: a searched distiller given as a genome string (d2kd/heads/detkds/genome.py).
    cfg.DISTILL.DETKDS = CfgNode()
    # e.g. "global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2".
    cfg.DISTILL.DETKDS.GENOME = "global:catt|scale_r2|norm_N|l1|w=6"
    # "loc" input: positions where the teacher's top (sigmoid) score exceeds this.
    cfg.DISTILL.DETKDS.LOC_SCORE_THRESH = 0.05


register_key_rules({"DISTILL.DETKDS.LOC_SCORE_THRESH": UNIT_INTERVAL})
