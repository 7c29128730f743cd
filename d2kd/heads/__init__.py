"""Distillation heads. Importing this package registers d2kd's heads."""
from ..structures import StudentTaps, TeacherOutputs
from .detkds import DetKDSHead
from .dfd import DFDHead
from .feature_imitation import FgBgHead, FGFIHead, FitNetHead, MGDHead
from .fgd import FGDHead
from .global_knowledge import GlobalKnowledgeHead
from .registry import DISTILL_HEAD_REGISTRY, DistillHead, build_distill_heads
from .response import LocKDHead, LogitKDHead

__all__ = [
    "DetKDSHead",
    "DFDHead",
    "DISTILL_HEAD_REGISTRY",
    "DistillHead",
    "FgBgHead",
    "FGDHead",
    "FGFIHead",
    "FitNetHead",
    "GlobalKnowledgeHead",
    "LocKDHead",
    "LogitKDHead",
    "MGDHead",
    "StudentTaps",
    "TeacherOutputs",
    "build_distill_heads",
]
