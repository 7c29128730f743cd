from .backbone import (build_scalable_resnet_backbone, build_scalable_resnet_fpn_backbone,
                       scalable_resnet)
from .distillation_detector import DistillationDetector
from .fcos import FCOS
from .pretext import SegmentationPretext
from .swin_backbone import build_swin_fpn_backbone
from .teacher import FrozenTeacher, load_teacher

__all__ = [
    "build_scalable_resnet_backbone",
    "build_scalable_resnet_fpn_backbone",
    "DistillationDetector",
    "FCOS",
    "FrozenTeacher",
    "SegmentationPretext",
    "build_swin_fpn_backbone",
    "load_teacher",
    "scalable_resnet",
]
