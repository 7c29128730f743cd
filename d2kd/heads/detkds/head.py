"""The searched-distiller head of DetKDS: a genome string turned into a loss
(d2kd/heads/detkds/genome.py; docs/methods/detkds.md).

Knowledge inputs, per distilled level, summed over levels:

- ``global``: the adapted student map and the teacher map (N, C, H, W);
- ``fgbg``: maps times a foreground mask (1 / box area in cells on the cells of each GT box,
  max over boxes) and times a background mask (uniform on the other cells, summing to 1 per
  image); the background term counts half;
- ``instance``: the cascade on the maps, then RoIAlign of every GT box at 14 x 14 on the level;
- ``logit``: sigmoid of the classification maps (dense students) or of the RPN objectness
  (R-CNN students); only slot 3 applies;
- ``loc``: the regression maps (dense deltas or RPN deltas) at positions where the teacher's
  top score exceeds ``LOC_SCORE_THRESH`` (our definition: the authors left it out).

GT boxes reach a level's grid as in the authors' release (lliai/DetKDS,
mmdet/distillation/losses/auto_detkd.py, commit a7d2127f) unless ``FGBG_MASK`` /
``INSTANCE_BOXES`` say otherwise.
"""
from typing import Dict, Sequence, Tuple

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torchvision.ops import roi_align

from ...config.defaults import register_config_extension
from ...config.ranges import UNIT_INTERVAL, one_of, register_key_rules
from ...structures import StudentKind, StudentTaps, TeacherOutputs
from ..alignment import FeatureAligner
from ..masks import box_area_masks, focal_masks, grid_boxes, gt_boxes_and_images
from ..registry import DISTILL_HEAD_REGISTRY, DistillHead
from .genome import GenomeError, distance, dry_run, parse_genome, transform

INSTANCE_SIZE = 14
#: the genome inputs computed from (adapted) feature maps
FEATURE_INPUTS = frozenset({"global", "fgbg", "instance"})
BACKGROUND_WEIGHT = 0.5
#: ``DISTILL.DETKDS.FGBG_MASK``: the release's snapped-box rule, or d2kd's centre rule
FGBG_MASKS = ("release", "centre")
#: ``DISTILL.DETKDS.INSTANCE_BOXES``: the release's snapped boxes, or the exact boxes
INSTANCE_BOXES = ("release", "exact")


@DISTILL_HEAD_REGISTRY.register()
class DetKDSHead(DistillHead):
    """A DetKDS distiller (Li et al., ICML 2024) given as a genome, ``DISTILL.DETKDS.GENOME``
    (docs/methods/detkds.md).

    Each formula ``<input>:<t1>|<t2>|<t3>|<dist>|w=<gamma>`` of the genome gives one loss

        ``L_input = sum_levels gamma * dist(t3(t2(t1(X^s))), t3(t2(t1(X^t))))``

    with the slot ops t1, t2, t3 applied identically and independently to both tensors (t1 =
    ``mask`` draws a random mask for each, ``mask_shared`` one for both) and ``dist`` a mean
    over elements (d2kd/heads/detkds/ops.py). X^s, X^t per input:

    - ``global``: S~ = A(S) (N, C_t, H, W) (1x1 adapter and bilinear resize of the student map
      (N, C_s, H_s, W_s)) and T (N, C_t, H, W), per level of ``DISTILL.IN_FEATURES``;
    - ``fgbg``: S~ * m_fg, T * m_fg and, at weight 0.5, S~ * m_bg, T * m_bg, with m_fg
      (N, 1, H, W) = 1 / (box area in cells) on each GT box's cells (max over boxes) and m_bg
      (N, 1, H, W) uniform on the other cells, summing to 1 per image. A box's cells: with
      ``fgbg_mask="release"`` rows floor(y0')..ceil(y1') and columns floor(x0')..ceil(x1')
      (ends included, cut to the map; the area counts them before the cut), (x', y') the
      box scaled by the map's size over the image's size before padding; with ``"centre"``
      the cells whose centre lies in the box;
    - ``instance``: the cascade on S~ and T, then RoIAlign of every GT box: (M, C_t, 14, 14),
      M the GT boxes of the batch (the cascade must keep the layout). With
      ``instance_boxes="release"`` the box is (floor(x0'), floor(y0'), ceil(x1'), ceil(y1'))
      in cells, pooled unaligned (no half-cell shift); with ``"exact"`` the box in pixels at
      scale 1 / stride, aligned;
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
                 fgbg_mask: str = "release", instance_boxes: str = "release",
                 dry_run_batch_size: int = 2):
        """
        Args:
            genome: the distiller, a genome string (``DISTILL.DETKDS.GENOME``); parsed and
                dry-run on ``dry_run_batch_size`` images here.
            levels: as for the feature heads.
            student_shapes: as for the feature heads.
            teacher_shapes: as for the feature heads.
            adapters: as for the feature heads.
            dense: the student is a dense detector (``StudentKind``).
            loc_score_thresh: ``DISTILL.DETKDS.LOC_SCORE_THRESH``.
            fgbg_mask: ``DISTILL.DETKDS.FGBG_MASK`` (one of :data:`FGBG_MASKS`).
            instance_boxes: ``DISTILL.DETKDS.INSTANCE_BOXES`` (one of :data:`INSTANCE_BOXES`).
        """
        super().__init__()
        try:
            self.genome = parse_genome(genome)
            dry_run(self.genome, batch_size=dry_run_batch_size)
        except GenomeError as e:
            raise ValueError(f"DISTILL.DETKDS.GENOME: {e}") from None
        for key, value, choices in (("FGBG_MASK", fgbg_mask, FGBG_MASKS),
                                    ("INSTANCE_BOXES", instance_boxes, INSTANCE_BOXES)):
            if value not in choices:
                raise ValueError(f"DISTILL.DETKDS.{key}={value!r} is not one of {choices}.")
        self.fgbg_mask = fgbg_mask
        self.instance_boxes = instance_boxes
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
                "fgbg_mask": cfg.DISTILL.DETKDS.FGBG_MASK,
                "instance_boxes": cfg.DISTILL.DETKDS.INSTANCE_BOXES,
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

    def _fgbg_masks(self, student: StudentTaps, level: str, shape: torch.Size,
                    dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        """The foreground and background masks (N, 1, H, W) of ``level`` (map ``shape``)."""
        if self.fgbg_mask == "release":
            boxes, images = grid_boxes(student.gt_instances, student.images.image_sizes,
                                       shape[-2:], self.strides[level], "image_size")
            return focal_masks(boxes, images, shape, dtype)
        fg = box_area_masks(student.gt_instances, shape, self.strides[level]).to(dtype)
        bg = (fg == 0).to(dtype)
        return fg, bg / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1.0)

    def _fgbg(self, formula, student, teacher, aligned) -> torch.Tensor:
        total = 0.0
        for level in self.levels:
            s, t = aligned[level], teacher.features[level]
            fg, bg = self._fgbg_masks(student, level, t.shape, t.dtype)
            total = total + distance(formula, *transform(formula, s * fg, t * fg))
            background = distance(formula, *transform(formula, s * bg, t * bg))
            total = total + BACKGROUND_WEIGHT * background
        return total

    def _rois(self, student: StudentTaps, level: str, shape: torch.Size,
              dtype: torch.dtype) -> Tuple[torch.Tensor, float, bool]:
        """RoIAlign's (rois (M, 5) = (image, x0, y0, x1, y1), spatial scale, aligned) for the
        GT boxes on ``level`` (map ``shape``)."""
        if self.instance_boxes == "release":
            boxes, images = grid_boxes(student.gt_instances, student.images.image_sizes,
                                       shape[-2:], self.strides[level], "image_size")
            boxes = torch.cat([boxes[:, :2].floor(), boxes[:, 2:].ceil()], dim=1)
            scale, aligned = 1.0, False
        else:
            boxes, images = gt_boxes_and_images(student.gt_instances)
            scale, aligned = 1.0 / self.strides[level], True
        return torch.cat([images[:, None].to(dtype), boxes.to(dtype)], dim=1), scale, aligned

    def _instance(self, formula, student, teacher, aligned) -> torch.Tensor:
        if sum(len(inst) for inst in student.gt_instances) == 0:
            return aligned[self.levels[0]].sum() * 0.0
        total = 0.0
        for level in self.levels:
            s, t = transform(formula, aligned[level], teacher.features[level])
            rois, scale, roi_aligned = self._rois(student, level, teacher.features[level].shape,
                                                  s.dtype)
            s_roi = roi_align(s, rois, INSTANCE_SIZE, spatial_scale=scale, aligned=roi_aligned)
            t_roi = roi_align(t, rois, INSTANCE_SIZE, spatial_scale=scale, aligned=roi_aligned)
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
    to the search application, d2kd/apps/search/config.py)."""
    if "DETKDS" in cfg.DISTILL:
        return
    # DetKDS: a searched distiller given as a genome string (d2kd/heads/detkds/genome.py).
    cfg.DISTILL.DETKDS = CfgNode()
    # e.g. "global:catt|scale_r2|norm_N|l1|w=6;fgbg:no|local_s4|norm_HW|l1|w=2".
    cfg.DISTILL.DETKDS.GENOME = "global:catt|scale_r2|norm_N|l1|w=6"
    # "loc" input: positions where the teacher's top (sigmoid) score exceeds this.
    cfg.DISTILL.DETKDS.LOC_SCORE_THRESH = 0.05
    # "fgbg" input's masks: "release" (the authors': each GT box scaled by map size / image
    # size before padding, cells floor(y0)..ceil(y1) x floor(x0)..ceil(x1)) or "centre" (the
    # cells whose centre lies in the box, at the level's stride: exact on a padded batch).
    cfg.DISTILL.DETKDS.FGBG_MASK = "release"
    # "instance" input's RoIs: "release" (the authors': the box scaled as for FGBG_MASK,
    # snapped outwards to whole cells, RoIAlign unaligned) or "exact" (the box in pixels at
    # 1 / stride, RoIAlign aligned: no snapping, no half-cell shift).
    cfg.DISTILL.DETKDS.INSTANCE_BOXES = "release"


register_key_rules({"DISTILL.DETKDS.LOC_SCORE_THRESH": UNIT_INTERVAL,
                    "DISTILL.DETKDS.FGBG_MASK": one_of(*FGBG_MASKS),
                    "DISTILL.DETKDS.INSTANCE_BOXES": one_of(*INSTANCE_BOXES)})
