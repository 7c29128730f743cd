"""Prototype weighting for other heads: the RDM robustness weight as a per-cell weight map.

The global-knowledge paper's Table 4 applies its robustness weight to baseline feature
distillers. A head built with ``PROTOTYPE_WEIGHTED = True`` owns a :class:`PrototypeWeighting`:
its :class:`PrototypeBank` is refreshed like the global-knowledge head's (by
``PrototypeRefreshHook``), every GT box of the batch is an instance, its weight (Eq. 8, from
box-pooled raw FPN features of both models) fills the cells it covers (max over overlapping
boxes), and every other cell weighs 1.
"""
from typing import Dict, Sequence

import torch
from detectron2.config import CfgNode, configurable
from detectron2.layers import ShapeSpec
from torch import nn

from ..config.defaults import register_config_extension
from ..config.ranges import INTEGER, NON_NEGATIVE, at_least, one_of, register_key_rules
from ..prototypes import PrototypeBank, batched_box_pool
from ..prototypes.selection import DENSITY_THRESHOLDS
from ..structures import StudentKind, StudentTaps, TeacherOutputs
from .masks import box_weight_maps, gt_boxes_and_images


class PrototypeWeighting(nn.Module):
    """RDM robustness weights of GT instances (global-knowledge Eq. 8) as per-cell weights of a
    feature head's squared error, from a prototype bank refreshed like GlobalKnowledgeHead's."""

    @configurable
    def __init__(self, *, levels: Sequence[str], student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec], num_classes: int, num_prototypes: int):
        super().__init__()
        self.levels = list(levels)
        self.student_strides = {l: student_shapes[l].stride for l in self.levels}
        self.teacher_strides = {l: teacher_shapes[l].stride for l in self.levels}
        self.bank = PrototypeBank(self.levels, num_classes, num_prototypes,
                                  teacher_shapes[self.levels[0]].channels,
                                  student_shapes[self.levels[0]].channels)

    @classmethod
    def from_config(cls, cfg: CfgNode, levels: Sequence[str],
                    student_shapes: Dict[str, ShapeSpec], teacher_shapes: Dict[str, ShapeSpec]):
        return {"levels": levels, "student_shapes": student_shapes,
                "teacher_shapes": teacher_shapes,
                "num_classes": StudentKind.from_config(cfg).num_classes,
                "num_prototypes": cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES}

    def cell_weights(self, student: StudentTaps, teacher: TeacherOutputs,
                     level: str) -> torch.Tensor:
        """(N, 1, H, W) on the teacher's grid of ``level``: GT cells carry their box's
        robustness weight, the other cells 1. Detached."""
        boxes, images = gt_boxes_and_images(student.gt_instances)
        classes = torch.cat([x.gt_classes for x in student.gt_instances])
        s_map, t_map = student.features[level].detach(), teacher.features[level]
        f_s = batched_box_pool(s_map, boxes, images, self.student_strides[level])
        f_t = batched_box_pool(t_map, boxes, images, self.teacher_strides[level])
        w = self.bank.robustness_weight(f_s, f_t, classes, self.levels.index(level))
        covered = box_weight_maps(boxes, torch.ones_like(w), images, t_map.shape,
                                  self.teacher_strides[level])
        weights = box_weight_maps(boxes, w, images, t_map.shape, self.teacher_strides[level])
        return torch.where(covered > 0, weights, torch.ones_like(weights))


@register_config_extension
def add_prototypes_config(cfg: CfgNode) -> None:
    """``DISTILL.PROTOTYPES``: the prototype banks of every head that owns one."""
    if "PROTOTYPES" in cfg.DISTILL:
        return
    # Prototypes (PGM) shared by every head that owns a PrototypeBank (GlobalKnowledgeHead,
    # prototype-weighted FitNet / fg-bg heads), refreshed by d2kd/engine/prototype_hook.py.
    cfg.DISTILL.PROTOTYPES = CfgNode()
    # K: prototypes per class and level.
    cfg.DISTILL.PROTOTYPES.NUM_PROTOTYPES = 10
    # "pgm" (Tang et al.'s selection of real instances) or "kmeans" (ablation: scikit-learn
    # K-means centres of both normalised spaces).
    cfg.DISTILL.PROTOTYPES.SELECTION = "pgm"
    # alpha: coupling of the teacher- and student-space coefficients in PGM.
    cfg.DISTILL.PROTOTYPES.ALPHA = 10.0
    # PGM's density pre-filter (candidates dense in both spaces), from the released code.
    cfg.DISTILL.PROTOTYPES.DENSITY_FILTER = True
    # Its threshold: "rank" keeps densities above sorted(rho)[int(0.4 n)] (as released);
    # "quantile" above torch.quantile(rho, 0.4) (d2kd's earlier rule; can keep one more).
    cfg.DISTILL.PROTOTYPES.DENSITY_THRESHOLD = "rank"
    # PGM may pick an instance twice (as released); False excludes repeats.
    cfg.DISTILL.PROTOTYPES.ALLOW_DUPLICATES = True
    # Instance index: GT boxes wider and taller than this (pixels, original resolution) ...
    cfg.DISTILL.PROTOTYPES.MIN_BOX_SIZE = 30.0
    # ... from at most this many images per class (<= 0: all), drawn with INDEX_SEED.
    cfg.DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS = 800
    cfg.DISTILL.PROTOTYPES.INDEX_SEED = 0
    # Rebuild the bank from the live student every this many iterations (0: one epoch of
    # DATASETS.TRAIN at SOLVER.IMS_PER_BATCH); the bank is always built before the first step.
    cfg.DISTILL.PROTOTYPES.REFRESH_PERIOD = 0
    # False: build the bank once before the first step and never refresh it (ablation).
    cfg.DISTILL.PROTOTYPES.REFRESH = True
    # Images per forward during extraction (images of equal size only).
    cfg.DISTILL.PROTOTYPES.EXTRACT_BATCH_SIZE = 16


register_key_rules({
    "DISTILL.PROTOTYPES.NUM_PROTOTYPES": at_least(1),
    "DISTILL.PROTOTYPES.SELECTION": one_of("pgm", "kmeans"),
    "DISTILL.PROTOTYPES.DENSITY_THRESHOLD": one_of(*DENSITY_THRESHOLDS),
    "DISTILL.PROTOTYPES.ALPHA": NON_NEGATIVE,
    "DISTILL.PROTOTYPES.MIN_BOX_SIZE": NON_NEGATIVE,
    "DISTILL.PROTOTYPES.MAX_IMAGES_PER_CLASS": INTEGER,
    "DISTILL.PROTOTYPES.INDEX_SEED": at_least(0),
    "DISTILL.PROTOTYPES.REFRESH_PERIOD": at_least(0),
    "DISTILL.PROTOTYPES.EXTRACT_BATCH_SIZE": at_least(1),
})
