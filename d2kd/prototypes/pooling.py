"""Instance features of FPN maps: ``box_pool``, the exact average over the cells a box covers
(integral image), and ``roi_align_mean``, the average of a box's RoIAlign bins."""
import torch
from torchvision.ops import roi_align


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
    """Mean of one image's ``feature`` (C, H, W) over the cells covered by each box (M, 4):
    (M, C). See :func:`batched_box_pool`."""
    return batched_box_pool(feature[None], boxes, boxes.new_zeros(len(boxes), dtype=torch.long),
                            stride)


def batched_box_pool(features: torch.Tensor, boxes: torch.Tensor, images: torch.Tensor,
                     stride: int) -> torch.Tensor:
    """Mean of ``features`` over the cells covered by each box, each from its own image,
    differentiable.

    Args:
        features: (N, C, H, W) a level's maps of stride ``stride``.
        boxes: (M, 4) XYXY in input-image pixels; images: (M,) the image of each box.
    Returns:
        (M, C). O(1) per box after one (N, C, H, W) integral image.
    """
    _, channels, height, width = features.shape
    if len(boxes) == 0:
        return features.new_zeros(0, channels)
    # The integral image of the map minus its per-image, per-channel mean: its entries stay
    # O(sqrt(H W)) instead of O(H W), so single precision keeps box means exact to ~1e-6.
    mean = features.mean(dim=(2, 3))  # (N, C)
    integral = (features - mean[:, :, None, None]).cumsum(2).cumsum(3)  # sums over [0..y, 0..x]
    x0, y0, x1, y1 = box_cells(boxes, stride, height, width)
    images = images.long()

    def corner(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(M, C) integral at (y, x); 0 where y or x is -1 (an empty prefix)."""
        inside = ((y >= 0) & (x >= 0)).to(integral.dtype)[:, None]
        return integral[images, :, y.clamp(min=0), x.clamp(min=0)] * inside

    sums = corner(y1, x1) - corner(y0 - 1, x1) - corner(y1, x0 - 1) + corner(y0 - 1, x0 - 1)
    areas = ((y1 - y0 + 1) * (x1 - x0 + 1)).to(sums.dtype)
    return sums / areas[:, None] + mean[images]


def roi_align_mean(features: torch.Tensor, boxes: torch.Tensor, images: torch.Tensor,
                   stride: int, resolution: int, sampling_ratio: int,
                   aligned: bool) -> torch.Tensor:
    """Mean over the ``resolution`` x ``resolution`` RoIAlign bins of each box, each from its own
    image, differentiable: the RoI features an R-CNN box head sees, averaged over the bins.

    Args:
        features: (N, C, H, W) a level's maps of stride ``stride``.
        boxes: (M, 4) XYXY in input-image pixels.
        images: (M,) the image of each box.
        stride: the stride of ``features``.
        resolution: RoIAlign's output size.
        sampling_ratio: RoIAlign's samples per bin side (0: ceil(bin size) adaptively).
        aligned: RoIAlign's half-pixel alignment (detectron2's ROIAlignV2, mmcv's default).
    Returns:
        (M, C).
    """
    rois = torch.cat([images.to(features.dtype)[:, None], boxes.to(features.dtype)], dim=1)
    bins = roi_align(features, rois, resolution, 1.0 / stride, sampling_ratio, aligned)
    return bins.mean(dim=(2, 3))
