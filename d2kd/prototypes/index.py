"""The instance index: the fixed subset of training GT instances prototypes are chosen from.

Per class, the images holding at least one instance of that class whose width and height both
exceed ``min_size`` pixels (original resolution) are candidates; at most
``max_images_per_class`` of them are drawn (seeded, without replacement). An image drawn for
class c contributes its large-enough instances of class c. Each image appears once in the
index with all the instances it contributes, so extraction forwards every image once for all
its classes.
"""
import random
from dataclasses import dataclass
from typing import Dict, List, Sequence

import torch
from detectron2.structures import BoxMode


@dataclass
class IndexedImage:
    """One image of the index: its dataset record and its indexed instances, boxes (M, 4)
    XYXY in original pixels and classes (M,)."""

    record: Dict
    boxes: torch.Tensor
    classes: torch.Tensor


def build_instance_index(dataset_dicts: Sequence[Dict], num_classes: int, min_size: float,
                         max_images_per_class: int, seed: int) -> List[IndexedImage]:
    """The index over ``dataset_dicts`` (detectron2 dataset records), in dataset order.

    Deterministic for a given dataset and seed; ``max_images_per_class <= 0`` keeps every
    candidate image.
    """
    per_image: List[Dict[int, List[List[float]]]] = []
    images_of_class: Dict[int, List[int]] = {c: [] for c in range(num_classes)}
    for i, record in enumerate(dataset_dicts):
        by_class: Dict[int, List[List[float]]] = {}
        for ann in record.get("annotations", []):
            if ann.get("iscrowd", 0):
                continue
            box = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            if box[2] - box[0] > min_size and box[3] - box[1] > min_size:
                by_class.setdefault(ann["category_id"], []).append(box)
        per_image.append(by_class)
        for c in by_class:
            images_of_class[c].append(i)
    rng = random.Random(seed)
    chosen: Dict[int, List[int]] = {}  # image -> classes it contributes
    for c in range(num_classes):
        candidates = images_of_class[c]
        if 0 < max_images_per_class < len(candidates):
            candidates = sorted(rng.sample(candidates, max_images_per_class))
        for i in candidates:
            chosen.setdefault(i, []).append(c)
    index = []
    for i in sorted(chosen):
        boxes = [b for c in chosen[i] for b in per_image[i][c]]
        classes = [c for c in chosen[i] for _ in per_image[i][c]]
        index.append(IndexedImage(dataset_dicts[i], torch.tensor(boxes, dtype=torch.float32),
                                  torch.tensor(classes, dtype=torch.long)))
    return index


def instances_per_class(index: Sequence[IndexedImage], num_classes: int) -> List[int]:
    """Number of indexed instances of each class."""
    if not index:
        return [0] * num_classes
    classes = torch.cat([image.classes for image in index])
    return torch.bincount(classes, minlength=num_classes).tolist()
