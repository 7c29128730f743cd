"""TorchScript and ONNX exports of a detector, traced with detectron2's ``TracingAdapter``.

As detectron2's ``tools/deploy/export_model.py`` (tracing path): the exported model takes one
image, a ``3 x H x W`` float tensor in ``INPUT.FORMAT`` channel order already resized as
``DefaultPredictor`` resizes it (:func:`read_test_image`), and returns the flattened fields of
its ``Instances`` in sorted key order followed by the image size, e.g. ``pred_boxes`` (in the
coordinates of the resized image), ``pred_classes``, ``scores``, ``image_size``
(:func:`output_names`; Mask R-CNN adds ``pred_masks``, 28 x 28 per box, not pasted into the
image). :func:`detections` turns them back into the eager model's ``Instances`` at the
original resolution.

Two detectron2 v0.6 issues are worked around (d2kd/compat/export_tracing.py) and left alone where a
newer detectron2 fixed them: ``detectron2.export`` imports caffe2 at import time, and the dense
detectors' decoding (RetinaNet, FCOS) bakes a level's candidate count into the trace.
"""
import logging
from typing import List, Sequence, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import transforms as T
from detectron2.data.detection_utils import read_image
from detectron2.modeling import GeneralizedRCNN
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from torch import Tensor, nn

from ..compat.export_tracing import import_export_flatten, trace_safe_dense_decode
from ..utils.io import atomic_path

logger = logging.getLogger(__name__)

# RoIAlign with aligned=True (detectron2's ROIAlignV2) needs opset 16.
ONNX_OPSET = 17


def read_test_image(cfg: CfgNode, path: str) -> Tuple[Tensor, Tuple[int, int]]:
    """The model input for the image at ``path`` as ``DefaultPredictor`` prepares it (channel
    order ``INPUT.FORMAT``, resized to ``INPUT.MIN_SIZE_TEST`` / ``MAX_SIZE_TEST``) and the
    original ``(height, width)``."""
    image = read_image(path, format=cfg.INPUT.FORMAT)
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), image.shape[:2]


def _rcnn_inference(model: GeneralizedRCNN, inputs):
    # without the final rescaling, as detectron2's export_model.py
    return [{"instances": model.inference(inputs, do_postprocess=False)[0]}]


def tracing_adapter(model: nn.Module, image: Tensor) -> nn.Module:
    """detectron2's ``TracingAdapter`` of ``model`` (eval mode) for one image, its output
    schema recorded by one eager forward."""
    flatten = import_export_flatten()
    inference = _rcnn_inference if isinstance(model, GeneralizedRCNN) else None
    adapter = flatten.TracingAdapter(model, [{"image": image}], inference).eval()
    with torch.no_grad():
        adapter(image)
    return adapter


def output_names(adapter: nn.Module) -> List[str]:
    """Names of the flat outputs of ``adapter``: the keys of its dicts and ``Instances`` (which
    end with ``image_size``), in order."""
    flatten = import_export_flatten()

    def names(schema) -> List[str]:
        if isinstance(schema, flatten.DictSchema):  # Instances too
            out = [n for s, key in zip(schema.schemas, schema.keys) for n in names(s) or [key]]
            return out + ["image_size"] if isinstance(schema, flatten.InstancesSchema) else out
        if isinstance(schema, flatten.ListSchema):
            return [n for s in schema.schemas for n in names(s)]
        return []

    return names(adapter.outputs_schema)


def export_torchscript(model: nn.Module, image: Tensor, path: str) -> List[str]:
    """Trace ``model`` on ``image`` and save the TorchScript module to ``path`` (atomically);
    returns its :func:`output_names`."""
    adapter = tracing_adapter(model, image)
    with trace_safe_dense_decode(), torch.no_grad():
        traced = torch.jit.trace(adapter, (image,))
    with atomic_path(path) as tmp:
        torch.jit.save(traced, tmp)
    names = output_names(adapter)
    logger.info("Wrote TorchScript to %s; outputs: %s", path, ", ".join(names))
    return names


def export_onnx(model: nn.Module, image: Tensor, path: str) -> List[str]:
    """Export ``model`` traced on ``image`` to ONNX (opset :data:`ONNX_OPSET`) at ``path``
    (atomically), with input ``image`` and outputs named by :func:`output_names`; returns
    those names."""
    adapter = tracing_adapter(model, image)
    names = output_names(adapter)
    with trace_safe_dense_decode(), atomic_path(path) as tmp:
        torch.onnx.export(adapter, (image,), tmp, dynamo=False, opset_version=ONNX_OPSET,
                          input_names=["image"], output_names=names,
                          dynamic_axes={"image": {1: "height", 2: "width"}})
    logger.info("Wrote ONNX (opset %d) to %s; outputs: %s", ONNX_OPSET, path, ", ".join(names))
    return names


def detections(outputs: Sequence, names: Sequence[str], height: int, width: int) -> Instances:
    """The ``Instances`` that the eager model returns for an image of ``height`` x ``width``,
    from an exported model's flat ``outputs`` (tensors or arrays) named ``names``."""
    fields = {name: torch.as_tensor(value) for name, value in zip(names, outputs)}
    image_size = tuple(int(v) for v in fields.pop("image_size"))
    if "pred_boxes" in fields:
        fields["pred_boxes"] = Boxes(fields["pred_boxes"])
    return detector_postprocess(Instances(image_size, **fields), height, width)
