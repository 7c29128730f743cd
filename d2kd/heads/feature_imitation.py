"""Feature-imitation heads on FPN levels: FitNet and MGD."""
from typing import Dict

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from torch import nn

from ..modeling.taps import StudentTaps
from .alignment import FeatureAligner
from .registry import DISTILL_HEAD_REGISTRY, DistillHead, TeacherOutputs


class _FeatureHead(DistillHead):
    """Shared part: the distilled levels and their aligner."""

    def __init__(self, cfg: CfgNode, student_shapes: Dict[str, ShapeSpec],
                 teacher_shapes: Dict[str, ShapeSpec]):
        super().__init__()
        self.levels = list(cfg.DISTILL.IN_FEATURES)
        self.aligner = FeatureAligner(self.levels, student_shapes, teacher_shapes,
                                      cfg.DISTILL.ADAPTER)


@DISTILL_HEAD_REGISTRY.register()
class FitNetHead(_FeatureHead):
    """FitNet: ``weight * mean((A(S) - T)^2)`` per level over every cell, summed over levels."""

    name = "fitnet"

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        self.weight = cfg.DISTILL.FITNET.WEIGHT

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        per_level = {l: self.weight * (aligned[l] - teacher.features[l]).pow(2).mean()
                     for l in self.levels}
        self.log("loss", per_level)
        return {"loss_kd_fitnet_feat": sum(per_level.values())}


@DISTILL_HEAD_REGISTRY.register()
class MGDHead(_FeatureHead):
    """Masked generative distillation (Yang et al., ECCV 2022).

    Per level: a random spatial mask M (a cell is zeroed with probability ``MASK_RATIO``,
    shared over channels, resampled every step), a generator G = conv3x3 -> ReLU -> conv3x3,
    and ``(alpha / N) * sum_{n,c,h,w} (G(A(S) * M) - T)^2`` with N the batch size.
    """

    name = "mgd"

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__(cfg, student_shapes, teacher_shapes)
        self.alpha = cfg.DISTILL.MGD.ALPHA
        self.mask_ratio = cfg.DISTILL.MGD.MASK_RATIO
        self.generators = nn.ModuleDict()
        for level in self.levels:
            channels = teacher_shapes[level].channels
            self.generators[level] = nn.Sequential(
                nn.Conv2d(channels, channels, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(channels, channels, 3, padding=1),
            )

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        aligned = self.aligner(student.features, teacher.features)
        per_level = {}
        for level in self.levels:
            s, t = aligned[level], teacher.features[level]
            keep = (torch.rand_like(s[:, :1]) >= self.mask_ratio).to(s.dtype)  # (N, 1, H, W)
            generated = self.generators[level](s * keep)
            per_level[level] = self.alpha * (generated - t).pow(2).sum() / s.shape[0]
        self.log("loss", per_level)
        return {"loss_kd_mgd_feat": sum(per_level.values())}
