"""Distillation heads. Importing this package registers d2kd's heads."""
from .feature_imitation import FitNetHead, MGDHead
from .registry import DISTILL_HEAD_REGISTRY, DistillHead, TeacherOutputs, build_distill_heads

__all__ = [
    "DISTILL_HEAD_REGISTRY",
    "DistillHead",
    "FitNetHead",
    "MGDHead",
    "TeacherOutputs",
    "build_distill_heads",
]
