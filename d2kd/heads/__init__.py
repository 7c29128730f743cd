"""Distillation heads. Importing this package registers d2kd's heads."""
from .detkds import DetKDSHead
from .dfd import DFDHead
from .global_knowledge import GlobalKnowledgeHead
from .feature_imitation import FgBgHead, FGFIHead, FitNetHead, MGDHead
from .fgd import FGDHead
from .response import LocKDHead, LogitKDHead
from ..structures import StudentTaps, TeacherOutputs
from .registry import DISTILL_HEAD_REGISTRY, DistillHead, build_distill_heads

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
