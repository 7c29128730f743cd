"""``box_pool``: exact average of a feature map over the cells a box covers (integral image)."""
import torch
import torch.nn.functional as F


def box_cells(boxes: torch.Tensor, stride: int, height: int, width: int):
    """Inclusive cell ranges ``(x0, y0, x1, y1)`` (each (M,) long) covered by XYXY ``boxes``.

    Cells ``floor(x1/s)..floor(x2/s)`` and ``floor(y1/s)..floor(y2/s)``, clamped to the map; a
    box smaller than a cell covers the one cell its corner falls in.
    """
    cells = torch.div(boxes, stride, rounding_mode="floor").long()
    x0 = cells[:, 0].clamp(0, width - 1)
    y0 = cells[:, 1].clamp(0, height - 1)
    x1 = torch.maximum(cells[:, 2].clamp(0, width - 1), x0)
    y1 = torch.maximum(cells[:, 3].clamp(0, height - 1), y0)
    return x0, y0, x1, y1


def box_pool(feature: torch.Tensor, boxes: torch.Tensor, stride: int) -> torch.Tensor:
    """Mean of ``feature`` over the cells covered by each box, differentiable.

    Args:
        feature: (C, H, W) one image's map on a level of stride ``stride``.
        boxes: (M, 4) XYXY in input-image pixels.
    Returns:
        (M, C). O(1) per box after one (C, H+1, W+1) integral image (float64 for exactness).
    """
    channels, height, width = feature.shape
    if len(boxes) == 0:
        return feature.new_zeros(0, channels)
    integral = F.pad(feature.double().cumsum(1).cumsum(2), (1, 0, 1, 0))  # (C, H+1, W+1)
    x0, y0, x1, y1 = box_cells(boxes, stride, height, width)
    sums = (integral[:, y1 + 1, x1 + 1] - integral[:, y0, x1 + 1]
            - integral[:, y1 + 1, x0] + integral[:, y0, x0])  # (C, M)
    areas = ((y1 - y0 + 1) * (x1 - x0 + 1)).to(sums.dtype)
    return (sums / areas).t().to(feature.dtype)
