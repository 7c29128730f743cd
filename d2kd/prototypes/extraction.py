"""Instance features for prototype selection: box-pooled FPN features of indexed instances.

Images are read in the student's input format and resized as at test time (detectron2's
``ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)``); each model sees them with its own
normalisation (the student through ``preprocess_image``, a teacher through
:meth:`FrozenTeacher.normalize`). Every image is forwarded once for all its instances, in
batches of equally sized images (so a feature never depends on which images share its batch),
and the index is sharded over ranks (image j on rank j mod world size); rank 0 receives the
features in index order.

Memory does not grow with the index: the batches are planned from the records' sizes alone
(``height`` / ``width``, else the image file's header), and images are read batch by batch
(by ``num_workers`` loader processes, a few batches ahead), so a process holds a few batches of
images plus the pooled features — (M, C) per level, what rank 0 gathers — never its shard.
"""
import itertools
import logging
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.structures import ImageList
from detectron2.utils import comm
from PIL import Image
from tqdm import tqdm

from .index import IndexedImage
from .pooling import box_pool

logger = logging.getLogger(__name__)

# images (student-normalised ImageList) -> FPN features, name -> (N, C, H/s, W/s)
Encoder = Callable[[ImageList], Dict[str, torch.Tensor]]


def _resized_size(record: Dict, min_size_test: int, max_size_test: int) -> Tuple[int, int]:
    """(H, W) of the record's image after the test-time resize, without decoding it."""
    if "height" in record and "width" in record:
        height, width = record["height"], record["width"]
    else:
        with Image.open(record["file_name"]) as image:  # reads the header only
            width, height = image.size
    return T.ResizeShortestEdge.get_output_shape(height, width, min_size_test, max_size_test)


def _size_batches(sizes: Sequence[tuple], batch_size: int) -> List[List[int]]:
    """Positions grouped into batches of equal image size, at most ``batch_size`` each."""
    groups: Dict[tuple, List[int]] = {}
    for position, size in enumerate(sizes):
        groups.setdefault(size, []).append(position)
    return [members[i:i + batch_size] for _, members in sorted(groups.items())
            for i in range(0, len(members), batch_size)]


class _BatchReader(torch.utils.data.Dataset):
    """Batch ``i`` of a plan: [(3, H, W) float image resized as at test time, its indexed boxes
    (M, 4) in those pixels] for each of its images."""

    def __init__(self, images: Sequence[IndexedImage], batches: List[List[int]],
                 input_format: str, min_size_test: int, max_size_test: int):
        self.images, self.batches = images, batches
        self.input_format = input_format
        self.resize = T.ResizeShortestEdge(min_size_test, max_size_test)

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        return [self._load(self.images[position]) for position in self.batches[i]]

    def _load(self, image: IndexedImage) -> Tuple[torch.Tensor, torch.Tensor]:
        array = detection_utils.read_image(image.record["file_name"], format=self.input_format)
        transform = self.resize.get_transform(array)
        resized = transform.apply_image(array)
        boxes = torch.as_tensor(transform.apply_box(image.boxes.numpy()), dtype=torch.float32)
        return torch.as_tensor(resized.astype("float32").transpose(2, 0, 1)), boxes


@torch.no_grad()
def extract_features(index: Sequence[IndexedImage], student: torch.nn.Module,
                     encoders: Dict[str, Encoder], strides: Dict[str, Dict[str, int]],
                     input_format: str, min_size_test: int, max_size_test: int,
                     batch_size: int = 8, num_workers: int = 0, show_progress: bool = True
                     ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Pooled features of every indexed instance, per encoder and level.

    Args:
        index: the instance index (all ranks pass the same one).
        student: the student detector; its ``preprocess_image`` normalises the images.
        encoders: name (e.g. "student", "teacher") -> function of the student-normalised batch.
        strides: encoder name -> level -> stride of that encoder's map.
        batch_size: images per forward (equal sizes only).
        num_workers: processes reading images ahead (0: read in this process).
    Returns:
        On rank 0, encoder -> level -> (M, C) features of the M indexed instances in index
        order (image by image, instances in index order); on other ranks, ``{}``.
    """
    rank, world = comm.get_rank(), comm.get_world_size()
    shard = list(index[rank::world])
    batches = _size_batches([_resized_size(image.record, min_size_test, max_size_test)
                             for image in shard], batch_size)
    reader = torch.utils.data.DataLoader(
        _BatchReader(shard, batches, input_format, min_size_test, max_size_test),
        batch_size=None, num_workers=num_workers)
    # rows of each shard image's instances in this shard's (M_shard, C) output
    offsets = list(itertools.accumulate([len(image.classes) for image in shard], initial=0))
    pooled: Dict[str, Dict[str, torch.Tensor]] = {name: {} for name in encoders}
    for batch, loaded in tqdm(zip(batches, reader), total=len(batches),
                              desc="prototype features", unit="batch",
                              disable=not (show_progress and comm.is_main_process())):
        images = student.preprocess_image([{"image": image} for image, _ in loaded])
        boxes = [b.to(images.tensor.device) for _, b in loaded]  # one copy per batch
        for name, encode in encoders.items():
            features = encode(images)
            for level, stride in strides[name].items():
                # one device-to-host copy per batch and level
                parts = torch.cat([box_pool(features[level][row], boxes[row], stride)
                                   for row in range(len(batch))]).cpu()
                out = pooled[name].get(level)
                if out is None:
                    out = pooled[name][level] = parts.new_empty(offsets[-1], parts.shape[1])
                row = 0
                for position in batch:
                    count = offsets[position + 1] - offsets[position]
                    out[offsets[position]:offsets[position + 1]] = parts[row:row + count]
                    row += count
    return _gather_in_index_order(pooled, index, rank, world)


def _gather_in_index_order(pooled: Dict[str, Dict[str, torch.Tensor]],
                           index: Sequence[IndexedImage], rank: int, world: int
                           ) -> Dict[str, Dict[str, torch.Tensor]]:
    """Rank 0: every shard's (M_shard, C) rows interleaved back into index order (image j
    is image j // world of shard j % world)."""
    if world == 1:
        return pooled
    gathered = comm.gather(pooled, dst=0)
    if rank != 0:
        return {}
    counts = [len(image.classes) for image in index]
    shard_offsets = [list(itertools.accumulate(counts[r::world], initial=0))
                     for r in range(world)]
    result = {}
    for name in gathered[0]:
        result[name] = {}
        for level in {level for shard in gathered for level in shard[name]}:
            shards = [gathered[r][name].get(level) for r in range(world)]  # None: no images
            result[name][level] = torch.cat([
                shards[j % world][shard_offsets[j % world][j // world]:
                                  shard_offsets[j % world][j // world + 1]]
                for j in range(len(index))])
            for r in range(world):
                gathered[r][name][level] = None  # free each shard once it is interleaved
    return result
