"""Pure-Python stand-in for ``detectron2._C``, the compiled extension of detectron2.

d2kd installs this file as ``detectron2/_C.py`` when it provisions detectron2 from the
PyPI source distribution (which ships no C++ sources, see ``d2kd.apps.provision.build``).
detectron2 imports ``_C`` at module level in ``layers/deform_conv.py``,
``layers/rotated_boxes.py``, ``layers/roi_align_rotated.py`` and
``evaluation/fast_eval_api.py``, so every name those modules use must exist.

None of the ops below is needed by axis-aligned detectors (RetinaNet, FCOS, Faster/Mask
R-CNN): torchvision provides ``nms`` and ``roi_align``. The ops that have no cheap exact
pure-PyTorch equivalent raise :class:`NotImplementedError` naming the feature that needs the
compiled build; the fast COCO evaluator is replaced by pycocotools' ``COCOeval``
(``COCOEvaluator(use_fast_impl=False)``), which d2kd selects through
``d2kd.compat.has_compiled_extension()``.
"""

__all__ = [
    "box_iou_rotated",
    "deform_conv_forward",
    "deform_conv_backward_input",
    "deform_conv_backward_filter",
    "modulated_deform_conv_forward",
    "modulated_deform_conv_backward",
    "roi_align_rotated_forward",
    "roi_align_rotated_backward",
    "InstanceAnnotation",
    "COCOevalEvaluateImages",
    "COCOevalAccumulate",
    "get_compiler_version",
    "get_cuda_version",
    "has_cuda",
]

_FIX = (
    "This detectron2 is the pure-Python build provisioned by d2kd (no compiled extension). "
    "Build detectron2 from source (see detectron2's INSTALL.md) into this environment to use "
    "it; d2kd will then use that build as is."
)


def _needs_compiled_build(feature: str):
    def unavailable(*args, **kwargs):
        raise NotImplementedError(f"{feature} needs detectron2's compiled extension. {_FIX}")

    unavailable.__doc__ = f"Unavailable without the compiled extension: {feature}."
    return unavailable


box_iou_rotated = _needs_compiled_build("Rotated-box IoU (detectron2.layers.pairwise_iou_rotated)")
deform_conv_forward = _needs_compiled_build("Deformable convolution (DeformConv)")
deform_conv_backward_input = deform_conv_forward
deform_conv_backward_filter = deform_conv_forward
modulated_deform_conv_forward = _needs_compiled_build(
    "Modulated deformable convolution (ModulatedDeformConv)"
)
modulated_deform_conv_backward = modulated_deform_conv_forward
roi_align_rotated_forward = _needs_compiled_build("Rotated RoIAlign (ROIAlignRotated)")
roi_align_rotated_backward = roi_align_rotated_forward
_fast_coco_eval = _needs_compiled_build(
    "The fast COCO evaluator (COCOEvaluator(use_fast_impl=True)); "
    "use COCOEvaluator(..., use_fast_impl=False)"
)
InstanceAnnotation = _fast_coco_eval
COCOevalEvaluateImages = _fast_coco_eval
COCOevalAccumulate = _fast_coco_eval


def get_compiler_version() -> str:
    """No compiler: this module is Python."""
    return "none (pure-Python stand-in for detectron2._C)"


def get_cuda_version() -> str:
    """No CUDA kernels are compiled into this stand-in."""
    return "none (pure-Python stand-in for detectron2._C)"


def has_cuda() -> bool:
    """The stand-in has no CUDA kernels (torch itself may still use a GPU)."""
    return False
