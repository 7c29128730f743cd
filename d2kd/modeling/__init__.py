from .backbone import build_scalable_resnet_backbone, build_scalable_resnet_fpn_backbone
from .fcos import FCOS
from .pretext import SegmentationPretext

__all__ = [
    "build_scalable_resnet_backbone",
    "build_scalable_resnet_fpn_backbone",
    "FCOS",
    "SegmentationPretext",
]
