"""Exporting detectors by tracing on every detectron2 build (used by d2kd/engine/tracing.py).

Two detectron2 v0.6 issues are worked around here and left alone where a newer detectron2
fixed them: ``detectron2.export`` imports caffe2 at import time, and the dense detectors'
decoding (RetinaNet, FCOS) bakes a level's candidate count into the trace when it is below
``test_topk_candidates``, so a traced model kept every candidate of an image that has more.
"""
import contextlib
import importlib
import importlib.util
import inspect
import sys
from typing import Iterator

import torch
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, Instances
from torch import Tensor


def import_export_flatten():
    """``detectron2.export.flatten``. detectron2 <= 0.6's ``detectron2.export`` imports caffe2;
    there the package is set up without its ``__init__``, exposing ``TracingAdapter`` as newer
    detectron2's does."""
    try:
        import detectron2.export  # noqa: F401
    except ImportError as e:
        if "caffe2" not in str(e):
            raise
        package = importlib.util.module_from_spec(importlib.util.find_spec("detectron2.export"))
        sys.modules["detectron2.export"] = package
        package.TracingAdapter = importlib.import_module("detectron2.export.flatten").TracingAdapter
    return importlib.import_module("detectron2.export.flatten")


def _decode_per_level_predictions(self, anchors, pred_scores, pred_deltas, score_thresh,
                                  topk_candidates, image_size):
    """detectron2 v0.6's ``DenseDetector._decode_per_level_predictions`` with the candidate
    count clamped as a tensor while tracing (detectron2's later fix), so that it stays
    ``min(count, topk_candidates)`` for every input."""
    keep_idxs = pred_scores > score_thresh
    pred_scores = pred_scores[keep_idxs]
    topk_idxs = torch.nonzero(keep_idxs)  # Kx2
    num_topk = topk_idxs.shape[0]
    if isinstance(num_topk, Tensor):  # a tensor while tracing
        num_topk = torch.clamp(num_topk, max=topk_candidates)
    else:
        num_topk = min(num_topk, topk_candidates)
    pred_scores, idxs = pred_scores.sort(descending=True)
    pred_scores = pred_scores[:num_topk]
    topk_idxs = topk_idxs[idxs[:num_topk]]
    anchor_idxs, classes_idxs = topk_idxs.unbind(dim=1)
    pred_boxes = self.box2box_transform.apply_deltas(
        pred_deltas[anchor_idxs], anchors.tensor[anchor_idxs])
    return Instances(image_size, pred_boxes=Boxes(pred_boxes), scores=pred_scores,
                     pred_classes=classes_idxs)


@contextlib.contextmanager
def trace_safe_dense_decode() -> Iterator[None]:
    """While inside, dense detectors decode with :func:`_decode_per_level_predictions` if the
    installed detectron2 has v0.6's untraceable ``min(topk_candidates, ...)``."""
    original = DenseDetector._decode_per_level_predictions
    try:
        source = inspect.getsource(original)
    except OSError:  # no source: assume a detectron2 with the fix
        source = ""
    if "min(topk_candidates, topk_idxs.size(0))" not in source:
        yield
        return
    DenseDetector._decode_per_level_predictions = _decode_per_level_predictions
    try:
        yield
    finally:
        DenseDetector._decode_per_level_predictions = original
