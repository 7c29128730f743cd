"""How a backbone wants its input padded, on every detectron2 build.

detectron2 v0.6 backbones state ``size_divisibility``; upstream ``main`` adds
``padding_constraints`` (``size_divisibility`` and ``square_size``: ViTDet and LSJ-trained
models pad every batch to a fixed square).
"""
from typing import Tuple

from torch import nn


def padded_size(backbone: nn.Module, height: int, width: int) -> Tuple[int, int]:
    """The (H, W) a batch whose largest image is ``height`` x ``width`` is padded to, as
    ``ImageList.from_tensors(..., backbone.size_divisibility, padding_constraints=...)``
    pads it."""
    constraints = getattr(backbone, "padding_constraints", None) or {}
    square = constraints.get("square_size", 0)
    if square > 0:
        height, width = max(height, square), max(width, square)
    divisibility = max(constraints.get("size_divisibility", backbone.size_divisibility), 1)
    return -(-height // divisibility) * divisibility, -(-width // divisibility) * divisibility
