"""Cell masks on FPN levels derived from ground-truth boxes."""
from typing import List, Tuple

import torch
from detectron2.structures import Boxes, Instances, pairwise_iou

from ..prototypes.pooling import box_cells


def box_cell_masks(gt_instances: List[Instances], shape: torch.Size, stride: int) -> torch.Tensor:
    """(N, 1, H, W) float: 1 on cells whose centre lies inside some GT box of the image.

    ``shape`` is the level's (N, C, H, W); boxes are in input-image pixels (XYXY).
    """
    return (box_area_masks(gt_instances, shape, stride) > 0).float()


def gt_boxes_and_images(gt_instances: List[Instances]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every GT box of the batch (M, 4) XYXY and the index of its image (M,)."""
    device = gt_instances[0].gt_boxes.device if gt_instances else "cpu"
    if not gt_instances:
        return torch.zeros(0, 4, device=device), torch.zeros(0, dtype=torch.long, device=device)
    boxes = torch.cat([x.gt_boxes.tensor for x in gt_instances])
    images = torch.cat([torch.full((len(x),), i, dtype=torch.long, device=device)
                        for i, x in enumerate(gt_instances)])
    return boxes, images


def _inside(ys: torch.Tensor, xs: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor,
            x1: torch.Tensor, y1: torch.Tensor) -> torch.Tensor:
    """(M, H, W) bool: grid rows ``ys`` (H,) in [y0, y1] and columns ``xs`` (W,) in [x0, x1],
    per box (each bound (M,))."""
    return (((ys >= y0[:, None]) & (ys <= y1[:, None]))[:, :, None]
            & ((xs >= x0[:, None]) & (xs <= x1[:, None]))[:, None, :])


def _max_per_image(inside: torch.Tensor, values: torch.Tensor, images: torch.Tensor,
                   n: int) -> torch.Tensor:
    """(N, 1, H, W): each box's value (M,) on its cells ``inside`` (M, H, W), max over the boxes
    of the same image (``images`` (M,)), 0 elsewhere."""
    _, h, w = inside.shape
    maps = values.new_zeros(n, h * w)
    cells = torch.where(inside, values[:, None, None], values.new_zeros(())).flatten(1)
    maps.scatter_reduce_(0, images[:, None].expand(-1, h * w), cells, "amax")
    return maps.view(n, 1, h, w)


def box_area_masks(gt_instances: List[Instances], shape: torch.Size, stride: int) -> torch.Tensor:
    """(N, 1, H, W): on the cells of each GT box (centre rule of :func:`box_cell_masks`),
    1 / (number of cells of that box), max over overlapping boxes; 0 elsewhere."""
    n, _, h, w = shape
    boxes, images = gt_boxes_and_images(gt_instances)
    ys = (torch.arange(h, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    xs = (torch.arange(w, device=boxes.device, dtype=torch.float32) + 0.5) * stride
    inside = _inside(ys, xs, *boxes.unbind(dim=1))
    areas = inside.flatten(1).sum(dim=1).clamp(min=1)
    return _max_per_image(inside, 1.0 / areas, images, n)


def near_object_masks(gt_instances: List[Instances], anchors: List[Boxes],
                      shapes: List[torch.Size], num_anchors: int, psi: float) -> List[torch.Tensor]:
    """FGFI's imitation masks, one (N, 1, H, W) float tensor per level.

    For each GT box, its IoUs with the anchors of all given levels are thresholded at
    ``psi * max IoU`` (max over all those anchors, as in the paper); a cell is on when any of
    its ``num_anchors`` anchors passes for any GT box. Anchors are ordered (H, W, A) per
    level, like detectron2's anchor generators.
    """
    device = anchors[0].tensor.device
    masks = [torch.zeros(shape[0], 1, shape[2], shape[3], device=device) for shape in shapes]
    for i, instances in enumerate(gt_instances):
        if len(instances) == 0:
            continue
        ious = [pairwise_iou(instances.gt_boxes, level_anchors) for level_anchors in anchors]
        best = torch.cat(ious, dim=1).max(dim=1, keepdim=True).values.clamp(min=1e-6)  # (G, 1)
        for mask, iou, shape in zip(masks, ious, shapes):
            keep = (iou > psi * best).any(dim=0)  # (H*W*A,)
            mask[i, 0] = keep.view(shape[2], shape[3], num_anchors).any(dim=2).float()
    return masks


def random_keep_mask(x: torch.Tensor, drop_ratio: float) -> torch.Tensor:
    """(N, 1, H, W) 0/1 mask of x (N, C, H, W): each cell dropped with probability
    ``drop_ratio``, shared over channels (MGD's mask)."""
    return (torch.rand_like(x[:, :1]) >= drop_ratio).to(x.dtype)


def valid_cell_masks(image_sizes: List[Tuple[int, int]], shape: torch.Size, stride: int,
                     device=None) -> torch.Tensor:
    """(N, 1, H, W) bool on ``device``: cells whose top-left pixel lies inside the image (not
    padding). ``image_sizes`` are (height, width) Python numbers (as in ``ImageList``): they
    enter as kernel scalars, so no host-to-device copy (a synchronisation on CUDA) is made."""
    _, _, h, w = shape
    ys = torch.arange(h, device=device) * stride
    xs = torch.arange(w, device=device) * stride
    return torch.stack([(ys[:, None] < height) & (xs[None, :] < width)
                        for height, width in image_sizes])[:, None]


def box_weight_maps(boxes: torch.Tensor, weights: torch.Tensor, images: torch.Tensor,
                    shape: torch.Size, stride: int) -> torch.Tensor:
    """(N, 1, H, W): the cells each box covers (``box_cells``' floor rule) filled with its
    weight, max over overlapping boxes of the same image; 0 elsewhere.

    Args:
        boxes: (M, 4) XYXY in input-image pixels; weights: (M,); images: (M,) image of each box.
        shape: the level's (N, C, H, W).
    """
    n, _, h, w = shape
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    x0, y0, x1, y1 = box_cells(boxes, stride, h, w)
    return _max_per_image(_inside(ys, xs, x0, y0, x1, y1), weights, images, n)


def released_box_weight_maps(boxes: torch.Tensor, weights: torch.Tensor, images: torch.Tensor,
                             shape: torch.Size, stride: int) -> torch.Tensor:
    """(N, 1, H, W): the global-knowledge release's foreground mask (``get_gt_mask`` of
    ``kd/strategy/kd_one_stage_strategy.py``), boxes taken in their order. A box covers rows
    floor(y1/s) .. floor(y2/s) - 1 and columns floor(x1/s) .. floor(x2/s) - 1 (exclusive ends,
    clamped to the map) and overwrites what earlier boxes wrote there; a box whose range is
    empty in either direction marks the one cell (floor(y1/s), floor(x1/s)) with the maximum
    of its weight and the cell's value. The map starts at 0; negative weights stay.

    Args: as :func:`box_weight_maps`.
    """
    n, _, h, w = shape
    order = torch.arange(len(boxes), device=boxes.device)
    cells = torch.div(boxes, stride, rounding_mode="floor").long()
    x0, y0 = cells[:, 0].clamp(min=0), cells[:, 1].clamp(min=0)
    x1, y1 = cells[:, 2].clamp(max=w), cells[:, 3].clamp(max=h)
    single = (x0 == x1) | (y0 == y1)
    ys = torch.arange(h, device=boxes.device)
    xs = torch.arange(w, device=boxes.device)
    # exclusive ends: the inclusive ranges of _inside end one cell earlier
    rectangle = _inside(ys, xs, x0, y0, x1 - 1, y1 - 1) & ~single[:, None, None]
    corner = (_inside(ys, xs, x0, y0, x0, y0) & single[:, None, None]).flatten(1)
    by_image = images[:, None].expand(-1, h * w)
    # the last rectangle over each cell (-1: none) writes its weight ...
    last = torch.full((n, h * w), -1, dtype=torch.long, device=boxes.device).scatter_reduce_(
        0, by_image, torch.where(rectangle.flatten(1), order[:, None], -1), "amax")
    written = torch.where(last >= 0, weights[last.clamp(min=0)], weights.new_zeros(()))
    # ... then the one-cell boxes after it take the maximum with it
    later = corner & (order[:, None] > last[images])
    lowest = torch.finfo(weights.dtype).min
    marked = torch.full((n, h * w), lowest, dtype=weights.dtype, device=boxes.device)
    marked.scatter_reduce_(0, by_image, torch.where(later, weights[:, None], lowest), "amax")
    return torch.maximum(written, marked).view(n, 1, h, w)


#: How GT boxes reach a level's grid for FGD's and DetKDS's released fg/bg masks
#: (``DISTILL.FGD.BOX_MAPPING``): the authors' stretch over the padded grid, or the stride.
BOX_MAPPINGS = ("image_size", "stride")


def grid_boxes(gt_instances: List[Instances], image_sizes: List[Tuple[int, int]],
               grid: Tuple[int, int], stride: int, mapping: str
               ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Every GT box of the batch in grid units (M, 4) XYXY, and the image of each box (M,).

    ``mapping``: ``"image_size"`` (the authors') scales x by W / w and y by H / h, with (H, W)
    the level's ``grid`` and (h, w) the image's size before padding (``image_sizes``), so the
    image is stretched over the padded grid; ``"stride"`` divides by the level's ``stride``.
    """
    height, width = grid
    boxes, images = [], []
    for i, (instances, (image_h, image_w)) in enumerate(zip(gt_instances, image_sizes)):
        b = instances.gt_boxes.tensor
        if mapping == "stride":
            boxes.append(b / stride)
        else:  # divided, then multiplied: the authors' order, so floor / ceil agree exactly
            boxes.append(torch.stack([b[:, 0] / image_w * width, b[:, 1] / image_h * height,
                                      b[:, 2] / image_w * width, b[:, 3] / image_h * height],
                                     dim=1))
        images.append(torch.full((len(b),), i, dtype=torch.long, device=b.device))
    return torch.cat(boxes), torch.cat(images)


def focal_masks(boxes: torch.Tensor, images: torch.Tensor, shape: torch.Size,
                dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """FGD's foreground and background masks, each (N, 1, H, W) of ``dtype``.

    A box (x0, y0, x1, y1) in grid units (``boxes`` (M, 4), its image in ``images`` (M,))
    covers rows floor(y0)..ceil(y1) and columns floor(x0)..ceil(x1), both ends included and
    cut to the map; it weighs 1 / ((ceil(y1) - floor(y0) + 1)(ceil(x1) - floor(x0) + 1)), the
    count before the cut. Foreground: each cell's largest weight over the boxes covering it.
    Background: 1 on the other cells, divided by their number per image.
    """
    n, _, h, w = shape
    x0, y0 = boxes[:, 0].floor().long(), boxes[:, 1].floor().long()
    x1, y1 = boxes[:, 2].ceil().long(), boxes[:, 3].ceil().long()
    rows = torch.arange(h, device=boxes.device)
    columns = torch.arange(w, device=boxes.device)
    weights = 1.0 / ((y1 - y0 + 1) * (x1 - x0 + 1)).to(dtype)
    fg = _max_per_image(_inside(rows, columns, x0, y0, x1, y1), weights, images, n)
    bg = (fg == 0).to(dtype)
    return fg, bg / bg.sum(dim=(2, 3), keepdim=True).clamp(min=1)
