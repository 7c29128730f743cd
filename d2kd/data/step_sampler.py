"""A training batch stream addressed by iteration: what step ``i`` trains on is a function of
``(SEED, i)`` and the dataset, so ``--resume`` jumps to its iteration in O(1) and continues
exactly (no replay of past batches, no images of past iterations loaded).

The stream follows detectron2's training samplers:

- every epoch is a fresh permutation of the dataset (``TrainingSampler``), drawn from
  ``(seed, epoch)`` alone; ``RepeatFactorTrainingSampler`` repeats images by their factors
  (stochastic rounding drawn per epoch, the epoch's length fixed at the rounded sum of the
  factors, cycled or cut to it); ``RandomSubsetTrainingSampler`` draws its subset once;
- with aspect-ratio grouping (``DATALOADER.ASPECT_RATIO_GROUPING``), a global batch holds
  images of one orientation (detectron2's buckets: width > height or not): each epoch's
  permutation is split by orientation and cut into global batches, a group's last partial
  batch completed from the group's start, and the batches shuffled;
- an epoch holds ``ceil(len / global batch)`` batches (surplus batches of a grouped epoch are
  dropped), so iteration ``i`` lies in epoch ``i // batches_per_epoch``;
- the global batch of ``IMS_PER_BATCH`` images is split over ranks in order (rank ``r`` takes
  slots ``r * B ... (r + 1) * B - 1``), as detectron2's sharded samplers do;
- each image comes with its own seed from ``(seed, iteration, slot)``: data augmentation is
  seeded per image (:class:`~d2kd.data.step_loader.SeededMapDataset`), so it does not depend
  on which loader process maps it or on what that process mapped before.
"""
import math
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import Sampler


def derived_seed(*keys: int) -> int:
    """A 31-bit seed from integer keys (e.g. ``(seed, iteration, slot)``)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0] >> 1)


def _generator(*keys: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(derived_seed(*keys))
    return generator


# stream kinds: keys of derived_seed, so epochs, subsets and images never share a seed
_EPOCH, _REPEAT, _SUBSET, _ORDER, _IMAGE = range(5)


class StepBatchSampler(Sampler):
    """Yields, for iterations ``start_iter, start_iter + 1, ...`` of one rank, the batch
    ``[(dataset index, image seed), ...]`` of ``images_per_rank`` images.

    Args:
        groups: per dataset index, its aspect-ratio group (all 0 without grouping).
        images_per_rank: images per iteration on this rank.
        world_size, rank: the global batch is ``images_per_rank * world_size`` images.
        seed: the run's seed.
        repeat_factors: per dataset index, how often it appears per epoch on average
            (``RepeatFactorTrainingSampler``); None: once.
        subset: the dataset indices the stream draws from (``RandomSubsetTrainingSampler``);
            None: all.
    """

    def __init__(self, groups: Sequence[int], images_per_rank: int, world_size: int, rank: int,
                 seed: int, repeat_factors: Optional[torch.Tensor] = None,
                 subset: Optional[Sequence[int]] = None):
        self.groups = torch.as_tensor(list(groups), dtype=torch.long)
        self.images_per_rank, self.world_size, self.rank = images_per_rank, world_size, rank
        self.seed = seed
        self.repeat_factors = repeat_factors
        self.subset = (torch.as_tensor(list(subset), dtype=torch.long) if subset is not None
                       else torch.arange(len(self.groups), device="cpu"))  # host indices
        self.global_batch = images_per_rank * world_size
        self.epoch_length = (int(round(float(repeat_factors[self.subset].sum())))
                             if repeat_factors is not None else len(self.subset))
        if self.epoch_length == 0:
            raise ValueError("The training set is empty: nothing to sample.")
        self.batches_per_epoch = math.ceil(self.epoch_length / self.global_batch)
        self.start_iter = 0
        self._cached_epoch: Tuple[int, List[torch.Tensor]] = (-1, [])

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        iteration = self.start_iter
        while True:
            yield self.batch(iteration)
            iteration += 1

    def batch(self, iteration: int) -> List[Tuple[int, int]]:
        """This rank's ``[(dataset index, image seed), ...]`` of ``iteration``."""
        epoch, position = divmod(iteration, self.batches_per_epoch)
        images = self._epoch_batches(epoch)[position]
        first = self.rank * self.images_per_rank
        return [(int(images[slot]), derived_seed(self.seed, _IMAGE, iteration, slot))
                for slot in range(first, first + self.images_per_rank)]

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        """The epoch's dataset indices, ``epoch_length`` of them, in random order."""
        indices = self.subset
        if self.repeat_factors is not None:
            factors = self.repeat_factors[indices]
            draws = torch.rand(len(factors), generator=_generator(self.seed, _REPEAT, epoch))
            counts = factors.floor().long() + (draws < factors - factors.floor()).long()
            indices = indices.repeat_interleave(counts)
        order = indices[torch.randperm(len(indices), generator=_generator(self.seed, _EPOCH,
                                                                            epoch))]
        if len(order) == 0:  # every stochastic rounding came out 0: fall back to the subset
            order = self.subset
        return order.repeat(math.ceil(self.epoch_length / len(order)))[:self.epoch_length]

    def _epoch_batches(self, epoch: int) -> List[torch.Tensor]:
        """The epoch's global batches (each ``global_batch`` indices of one group)."""
        if self._cached_epoch[0] == epoch:
            return self._cached_epoch[1]
        order = self._epoch_order(epoch)
        batches = []
        for group in torch.unique(self.groups[order]).tolist():
            members = order[self.groups[order] == group]
            count = math.ceil(len(members) / self.global_batch)
            members = members.repeat(math.ceil(count * self.global_batch / len(members)))
            batches += list(members[:count * self.global_batch].view(count, self.global_batch))
        shuffle = torch.randperm(len(batches), generator=_generator(self.seed, _ORDER, epoch))
        batches = [batches[i] for i in shuffle[:self.batches_per_epoch].tolist()]
        self._cached_epoch = (epoch, batches)
        return batches
