from .backbone import (
    build_scalable_resnet_backbone,
    build_scalable_resnet_fpn_backbone,
    scalable_resnet,
)
from .distillation_detector import DistillationDetector, deployed_detector
from .fcos import FCOS
from .pretext import SegmentationPretext
from .swin_backbone import build_swin_fpn_backbone
from .teacher import FrozenTeacher, load_teacher
from .weights import load_for_evaluation, load_initialisation

__all__ = [
    "build_scalable_resnet_backbone",
    "build_scalable_resnet_fpn_backbone",
    "DistillationDetector",
    "FCOS",
    "FrozenTeacher",
    "SegmentationPretext",
    "build_swin_fpn_backbone",
    "deployed_detector",
    "load_for_evaluation",
    "load_initialisation",
    "load_teacher",
    "scalable_resnet",
]
