"""How a backbone wants its input padded, on every detectron2 build.

detectron2 v0.6 backbones state ``size_divisibility``; upstream ``main`` adds
``padding_constraints`` (``size_divisibility`` and ``square_size``: ViTDet and LSJ-trained
models pad every batch to a fixed square).
"""
from typing import Tuple

from torch import nn

# Upstream's SimpleFeaturePyramid (ViTDet) spells the key "size_divisiblity", so
# ImageList.from_tensors never reads it; its batches are the fixed square, which is divisible.
_MISSPELLED_DIVISIBILITY = "size_divisiblity"


def padded_size(backbone: nn.Module, height: int, width: int) -> Tuple[int, int]:
    """The (H, W) a batch whose largest image is ``height`` x ``width`` is padded to, as
    ``ImageList.from_tensors(..., backbone.size_divisibility, padding_constraints=...)``
    pads it.

    Two generalisations, where detectron2 itself would fail: an image larger than a fixed
    ``square_size`` is padded to its own size, not cropped (``from_tensors`` pads with a
    negative amount); and it is then rounded up to the divisibility that ViTDet's
    ``SimpleFeaturePyramid`` states under its misspelled key (its coarsest stride), so its
    pyramid levels keep exact strides."""
    constraints = getattr(backbone, "padding_constraints", None) or {}
    square = constraints.get("square_size", 0)
    divisibility = constraints.get("size_divisibility", backbone.size_divisibility)
    if square > 0:
        if (height > square or width > square) and not divisibility:
            divisibility = constraints.get(_MISSPELLED_DIVISIBILITY, 0)
        height, width = max(height, square), max(width, square)
    divisibility = max(divisibility, 1)
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility
