"""detectron2's training data loader, rebuilt on :class:`StepBatchSampler`: the batch of
iteration ``i`` (images and augmentation) depends on ``(SEED, i)`` only, so a run resumed at
iteration ``i`` positions its loader in O(1) and trains on exactly the batches an
uninterrupted run would have.

Same inputs as ``build_detection_train_loader(cfg)``: ``get_detection_dataset_dicts`` of
``DATASETS.TRAIN``, ``DatasetMapper(cfg, True)`` (or a given mapper), the sampler named by
``DATALOADER.SAMPLER_TRAIN``, aspect-ratio grouping, ``DATALOADER.NUM_WORKERS`` processes.
"""
import logging
from typing import Callable, Dict, List, Optional, Tuple

import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetMapper, get_detection_dataset_dicts
from detectron2.data.common import DatasetFromList
from detectron2.data.samplers import RepeatFactorTrainingSampler
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from torch.utils.data import DataLoader, Dataset

from .step_sampler import _SUBSET, StepBatchSampler, derived_seed

logger = logging.getLogger(__name__)

SAMPLERS = ("TrainingSampler", "RepeatFactorTrainingSampler", "RandomSubsetTrainingSampler")
# A record the mapper rejects (returns None for) is replaced by another one, at most this often.
_MAX_REPLACEMENTS = 100


class SeededMapDataset(Dataset):
    """``mapper(dataset[index])`` with Python's, NumPy's and torch's generators seeded from the
    item's own seed: ``dataset[(index, seed)]``. A record the mapper rejects is replaced by
    another one drawn from the same seed."""

    def __init__(self, dataset: Dataset, mapper: Callable[[Dict], Optional[Dict]]):
        self.dataset, self.mapper = dataset, mapper

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]) -> Dict:
        index, seed = item
        for attempt in range(_MAX_REPLACEMENTS):
            seed_all_rng(derived_seed(seed, attempt))
            mapped = self.mapper(self.dataset[index])
            if mapped is not None:
                return mapped
            index = derived_seed(seed, attempt, len(self.dataset)) % len(self.dataset)
        raise RuntimeError(f"The mapper rejected {_MAX_REPLACEMENTS} records in a row; check "
                           "the dataset and DATALOADER.FILTER_EMPTY_ANNOTATIONS.")


def _trivial_batch(batch: List[Dict]) -> List[Dict]:
    return batch


def _aspect_groups(dataset_dicts: List[Dict], grouping: bool) -> List[int]:
    """detectron2's buckets: 0 for landscape (width > height), 1 otherwise."""
    if not grouping:
        return [0] * len(dataset_dicts)
    return [0 if d["width"] > d["height"] else 1 for d in dataset_dicts]


def build_step_sampler(cfg: CfgNode, dataset_dicts: List[Dict]) -> StepBatchSampler:
    """The :class:`StepBatchSampler` of ``cfg`` for this process's rank."""
    world, name = comm.get_world_size(), cfg.DATALOADER.SAMPLER_TRAIN
    repeat_factors, subset = None, None
    if name == "RepeatFactorTrainingSampler":
        repeat_factors = RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD)
    elif name == "RandomSubsetTrainingSampler":
        size = int(len(dataset_dicts) * cfg.DATALOADER.RANDOM_SUBSET_RATIO)
        generator = torch.Generator()
        generator.manual_seed(derived_seed(cfg.SEED, _SUBSET))
        subset = torch.randperm(len(dataset_dicts), generator=generator)[:size].sort().values
    elif name != "TrainingSampler":
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN {name} is not one of {SAMPLERS}.")
    logger.info("Training sampler %s, resumable by iteration (seed %d)", name, cfg.SEED)
    return StepBatchSampler(
        _aspect_groups(dataset_dicts, cfg.DATALOADER.ASPECT_RATIO_GROUPING),
        cfg.SOLVER.IMS_PER_BATCH // world, world, comm.get_rank(), cfg.SEED,
        repeat_factors=repeat_factors, subset=subset)


def build_step_train_loader(cfg: CfgNode, mapper: Optional[Callable] = None) -> DataLoader:
    """The training loader; its ``batch_sampler`` is a :class:`StepBatchSampler` whose
    ``start_iter`` positions the stream (set it before iterating)."""
    world = comm.get_world_size()
    if cfg.SOLVER.IMS_PER_BATCH % world:
        raise ValueError(f"SOLVER.IMS_PER_BATCH ({cfg.SOLVER.IMS_PER_BATCH}) must be divisible "
                         f"by the number of processes ({world}).")
    if cfg.SEED < 0:
        raise ValueError("The resumable training loader needs a fixed SEED (>= 0); "
                         "DistillTrainer draws one when SEED is negative.")
    dataset_dicts = get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE
                       if cfg.MODEL.KEYPOINT_ON else 0),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None)
    sampler = build_step_sampler(cfg, dataset_dicts)
    dataset = SeededMapDataset(DatasetFromList(dataset_dicts, copy=False),
                               mapper if mapper is not None else DatasetMapper(cfg, True))
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=_trivial_batch,
                      num_workers=cfg.DATALOADER.NUM_WORKERS)
