"""Attention-transfer distillation (Zagoruyko & Komodakis, ICLR 2017) as a d2kd head.

A worked example of extending d2kd from outside the package: this file registers a head in
``DISTILL_HEAD_REGISTRY``; the config lists the file in ``D2KD.IMPORTS`` and names the head in
``DISTILL.HEADS``, and ``tools/train_net.py`` runs it unchanged.

Per level, the spatial attention map of a feature map F (N, C, H, W) is
``a = normalize(mean_c F^2)`` flattened to (N, H*W) and L2-normalised per image; the loss is
``WEIGHT * mean_n ||a_s - a_t||_2`` summed over levels. Attention maps are channel-free, so no
adapter is needed; a student map of another resolution is resized to the teacher's.
"""
from typing import Dict

import torch
import torch.nn.functional as F
from detectron2.config import CfgNode as CN

from d2kd.config.defaults import register_config_extension
from d2kd.heads import DISTILL_HEAD_REGISTRY, DistillHead, TeacherOutputs
from d2kd.heads.alignment import check_levels
from d2kd.structures import StudentTaps


@register_config_extension
def add_attention_config(cfg: CN) -> None:
    """This project's keys; d2kd adds them to every config once this file is imported."""
    if "ATTENTION" not in cfg.DISTILL:
        cfg.DISTILL.ATTENTION = CN()
        # Loss weight of the attention-map distance.
        cfg.DISTILL.ATTENTION.WEIGHT = 1.0


def attention_map(feature: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H*W): L2-normalised mean of squared activations over channels."""
    return F.normalize(feature.pow(2).mean(dim=1).flatten(1), dim=1)


@DISTILL_HEAD_REGISTRY.register()
class AttentionTransferHead(DistillHead):
    name = "attention"

    def __init__(self, cfg, student_shapes, teacher_shapes):
        super().__init__()
        self.levels = list(cfg.DISTILL.IN_FEATURES)
        check_levels(self.levels, student_shapes, teacher_shapes)
        self.weight = cfg.DISTILL.ATTENTION.WEIGHT

    def forward(self, student: StudentTaps, teacher: TeacherOutputs) -> Dict[str, torch.Tensor]:
        per_level = {}
        for level in self.levels:
            s, t = student.features[level], teacher.features[level]
            if s.shape[-2:] != t.shape[-2:]:
                s = F.interpolate(s, size=t.shape[-2:], mode="bilinear", align_corners=False)
            diff = attention_map(s) - attention_map(t)
            per_level[level] = self.weight * diff.norm(dim=1).mean()
        self.log("loss", per_level)
        return {"loss_kd_attention_map": sum(per_level.values())}
