"""What kind of detector a student is, answered once and from its class.

Heads, taps and the build-time compatibility checks all ask the same questions — is the
student a dense detector (one prediction per anchor or cell on every head level) or an R-CNN,
which levels carry its anchors, how many classes does it predict — and they answer them here,
from the meta-architecture's class (``isinstance`` / ``issubclass``), never from its registry
name: a registered ``RetinaNet`` subclass is a RetinaNet.
"""
from dataclasses import dataclass
from typing import Tuple, Union

from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from torch import nn


def detector_class(detector: Union[nn.Module, type, str]) -> type:
    """The class of a detector, of a detector class, or of a registered meta-architecture."""
    if isinstance(detector, str):
        return META_ARCH_REGISTRY.get(detector)
    return detector if isinstance(detector, type) else type(detector)


def is_dense_detector(detector: Union[nn.Module, type, str]) -> bool:
    """A :class:`DenseDetector` (RetinaNet, FCOS and their subclasses)."""
    return issubclass(detector_class(detector), DenseDetector)


@dataclass(frozen=True)
class StudentKind:
    """The student of a distillation config (``DISTILL.STUDENT_META_ARCHITECTURE`` + ``MODEL``).

    Attributes:
        dense: a dense detector (see :func:`is_dense_detector`); else an R-CNN.
        anchored: its head levels carry anchors from ``MODEL.ANCHOR_GENERATOR`` (RetinaNet,
            and an R-CNN's RPN); FCOS predicts per cell.
        anchor_levels: the levels its anchors or dense-head cells live on (the dense head's
            ``IN_FEATURES``, or the RPN's).
        num_classes: foreground classes it predicts.
        has_rpn: an R-CNN whose proposals come from an RPN.
    """

    dense: bool
    anchored: bool
    anchor_levels: Tuple[str, ...]
    num_classes: int
    has_rpn: bool

    @classmethod
    def from_config(cls, cfg: CfgNode) -> "StudentKind":
        student = detector_class(cfg.DISTILL.STUDENT_META_ARCHITECTURE)
        if issubclass(student, RetinaNet):
            return cls(True, True, tuple(cfg.MODEL.RETINANET.IN_FEATURES),
                       cfg.MODEL.RETINANET.NUM_CLASSES, False)
        if issubclass(student, DenseDetector):  # FCOS (d2kd/modeling/fcos.py)
            return cls(True, False, tuple(cfg.MODEL.FCOS.IN_FEATURES),
                       cfg.MODEL.FCOS.NUM_CLASSES, False)
        has_rpn = cfg.MODEL.PROPOSAL_GENERATOR.NAME == "RPN"
        return cls(False, has_rpn, tuple(cfg.MODEL.RPN.IN_FEATURES) if has_rpn else (),
                   cfg.MODEL.ROI_HEADS.NUM_CLASSES, has_rpn)
