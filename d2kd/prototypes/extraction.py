"""Instance features for prototype selection: box-pooled FPN features of indexed instances.

Images are read in the student's input format and resized as at test time (detectron2's
``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``); each model sees them with its own
normalisation (the student through ``preprocess_image``, a teacher through
:meth:`FrozenTeacher.normalize`). Every image is forwarded once for all its instances, in
batches of equally sized images (so a feature never depends on which images share its batch),
and the index is sharded over ranks (image j on rank j mod world size); rank 0 receives the
features in index order.
"""
import logging
from typing import Callable, Dict, List, Sequence

import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.structures import ImageList
from detectron2.utils import comm
from tqdm import tqdm

from .index import IndexedImage
from .pooling import box_pool

logger = logging.getLogger(__name__)

# images (student-normalised ImageList) -> FPN features, name -> (N, C, H/s, W/s)
Encoder = Callable[[ImageList], Dict[str, torch.Tensor]]


def _load(image: IndexedImage, resize: T.Augmentation, input_format: str):
    """(3, H, W) float image resized as at test time, and its boxes (M, 4) in those pixels."""
    array = detection_utils.read_image(image.record["file_name"], format=input_format)
    transform = resize.get_transform(array)
    resized = transform.apply_image(array)
    boxes = torch.as_tensor(transform.apply_box(image.boxes.numpy()), dtype=torch.float32)
    return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), boxes


def _size_batches(sizes: Sequence[tuple], batch_size: int) -> List[List[int]]:
    """Positions grouped into batches of equal image size, at most ``batch_size`` each."""
    groups: Dict[tuple, List[int]] = {}
    for position, size in enumerate(sizes):
        groups.setdefault(size, []).append(position)
    return [members[i:i + batch_size] for _, members in sorted(groups.items())
            for i in range(0, len(members), batch_size)]


@torch.no_grad()
def extract_features(index: Sequence[IndexedImage], student: torch.nn.Module,
                     encoders: Dict[str, Encoder], strides: Dict[str, Dict[str, int]],
                     input_format: str, min_size_test: int, max_size_test: int,
                     batch_size: int = 8, show_progress: bool = True
                     ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Pooled features of every indexed instance, per encoder and level.

    Args:
        index: the instance index (all ranks pass the same one).
        student: the student detector; its ``preprocess_image`` normalises the images.
        encoders: name (e.g. "student", "teacher") -> function of the student-normalised batch.
        strides: encoder name -> level -> stride of that encoder's map.
    Returns:
        On rank 0, encoder -> level -> (M, C) features of the M indexed instances in index
        order (image by image, instances in index order); on other ranks, ``{}``.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    shard = list(index[rank::world])
    resize = T.ResizeShortestEdge(min_size_test, max_size_test)
    loaded = [_load(image, resize, input_format) for image in shard]
    pooled: Dict[str, Dict[str, List[torch.Tensor]]] = {
        name: {level: [None] * len(shard) for level in strides[name]} for name in encoders}
    batches = _size_batches([tuple(img.shape[-2:]) for img, _ in loaded], batch_size)
    for batch in tqdm(batches, desc="prototype features", unit="batch",
                      disable=not (show_progress and comm.is_main_process())):
        images = student.preprocess_image([{"image": loaded[p][0]} for p in batch])
        for name, encode in encoders.items():
            features = encode(images)
            for level, stride in strides[name].items():
                for row, position in enumerate(batch):
                    boxes = loaded[position][1].to(features[level].device)
                    pooled[name][level][position] = box_pool(features[level][row], boxes,
                                                             stride).cpu()
    gathered = comm.gather(pooled, dst=0)
    if not comm.is_main_process():
        return {}
    return {name: {level: torch.cat([gathered[j % world][name][level][j // world]
                                     for j in range(len(index))])
                   for level in strides[name]}
            for name in encoders}
