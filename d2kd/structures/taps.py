"""Capture a student's intermediate outputs while it computes its own losses; what the
teacher computed for the same step (:class:`TeacherOutputs`).

Distillation must not run the student twice. :class:`StudentTapper` installs forward hooks and
per-instance method wrappers for the duration of one student forward and records what the
distillation heads read:

- every detector: the normalised padded batch (``images``), its ground truth
  (``gt_instances``, boxes in the same pixels: the student's own device copy where its
  training code passes it through a tapped method — dense detectors, R-CNN — so that the step
  copies the ground truth to the device once) and the backbone outputs (``features``,
  name -> (N, C, H/s, W/s));
- dense detectors (RetinaNet, FCOS): the head outputs per kind and level
  (``dense_predictions``: [logits, deltas, ...], each a list of (N, A*K, H/s, W/s)), the anchors
  and their assigned labels/boxes (``anchors``, ``anchor_labels``, ``anchor_gt_boxes``);
- R-CNN: the RPN head's outputs (``rpn_predictions``: objectness logits (N, A, H/s, W/s) and
  deltas (N, A*4, H/s, W/s) per level), the RPN proposals, the RoI head's sampled proposals
  with ``gt_classes``
  (``sampled_proposals``) and the box predictor's outputs on them (``roi_predictions``).
"""
import contextlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.structures import Boxes, ImageList, Instances
from torch import nn

from .student_kind import is_dense_detector


@dataclass
class StudentTaps:
    """What one student forward exposed (fields stay ``None`` when not applicable)."""

    images: Optional[ImageList] = None
    gt_instances: Optional[List[Instances]] = None
    features: Optional[Dict[str, torch.Tensor]] = None
    dense_predictions: Optional[List[List[torch.Tensor]]] = None
    anchors: Optional[List[Boxes]] = None
    anchor_labels: Optional[List[torch.Tensor]] = None
    anchor_gt_boxes: Optional[List[torch.Tensor]] = None
    rpn_predictions: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None
    proposals: Optional[List[Instances]] = None
    sampled_proposals: Optional[List[Instances]] = None
    roi_predictions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    backbone_calls: int = field(default=0)


@dataclass
class TeacherOutputs:
    """What the active teacher computed for one step (only what some head declared)."""

    features: Optional[Dict[str, torch.Tensor]] = None
    dense_predictions: Optional[List[List[torch.Tensor]]] = None
    roi_predictions: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
    rpn_predictions: Optional[Tuple[List[torch.Tensor], List[torch.Tensor]]] = None


def _wrap_method(obj: object, name: str, on_result: Callable) -> Callable[[], None]:
    """Make ``obj.name(...)`` report ``(args, result)`` to ``on_result``; returns the undo."""
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        result = original(*args, **kwargs)
        on_result(args, result)
        return result

    setattr(obj, name, wrapper)
    return lambda: delattr(obj, name)  # the class attribute shows through again


class StudentTapper(contextlib.AbstractContextManager):
    """``with StudentTapper(student) as taps: losses = student(batched_inputs)``."""

    def __init__(self, student: nn.Module):
        self.student = student
        self.taps = StudentTaps()
        self._undo: List[Callable[[], None]] = []

    def __enter__(self) -> StudentTaps:
        taps, student = self.taps, self.student
        self._undo.append(_wrap_method(student, "preprocess_image",
                                       lambda args, out: setattr(taps, "images", out)))
        self._undo.append(student.backbone.register_forward_hook(self._on_backbone).remove)
        if is_dense_detector(student):
            self._undo.append(_wrap_method(student, "forward_training", self._on_dense_training))
            self._undo.append(_wrap_method(student, "label_anchors", self._on_label_anchors))
        if getattr(student, "proposal_generator", None) is not None:
            generator = student.proposal_generator
            hook = generator.register_forward_hook(
                lambda module, args, out: setattr(taps, "proposals", out[0]))
            self._undo.append(hook.remove)
            hook = generator.rpn_head.register_forward_hook(
                lambda module, args, out: setattr(taps, "rpn_predictions", out))
            self._undo.append(hook.remove)
        if getattr(student, "roi_heads", None) is not None:
            roi_heads = student.roi_heads
            self._undo.append(_wrap_method(
                roi_heads, "label_and_sample_proposals", self._on_label_and_sample))
            hook = roi_heads.box_predictor.register_forward_hook(
                lambda module, args, out: setattr(taps, "roi_predictions", out))
            self._undo.append(hook.remove)
        return taps

    def __exit__(self, *exc_info) -> None:
        while self._undo:
            self._undo.pop()()

    def _on_backbone(self, module, args, output) -> None:
        self.taps.features = output
        self.taps.backbone_calls += 1

    def _on_dense_training(self, args, result) -> None:
        _, _, predictions, gt_instances = args
        self.taps.dense_predictions = list(predictions)
        self.taps.gt_instances = gt_instances

    def _on_label_and_sample(self, args, result) -> None:
        self.taps.sampled_proposals = result
        if len(args) > 1 and args[1] is not None:  # (proposals, targets)
            self.taps.gt_instances = args[1]

    def _on_label_anchors(self, args, result) -> None:
        anchors, _ = args
        self.taps.anchors = anchors
        self.taps.anchor_labels, self.taps.anchor_gt_boxes = result
