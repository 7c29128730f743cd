"""The training stream addressed by iteration (d2kd/data/step_sampler.py, step_loader.py)."""
import itertools
from collections import Counter

import torch
from conftest import tiny_training_cfg

from d2kd.data.step_loader import build_step_train_loader
from d2kd.data.step_sampler import StepBatchSampler


def _take(sampler: StepBatchSampler, count: int):
    return list(itertools.islice(iter(sampler), count))


def test_stream_started_at_any_iteration_equals_the_stream_from_zero():
    groups = [0, 1, 0, 0, 1, 1, 0, 1, 0, 0, 0]
    full = _take(StepBatchSampler(groups, 2, 1, 0, seed=3), 40)
    late = StepBatchSampler(groups, 2, 1, 0, seed=3)
    late.start_iter = 25
    assert _take(late, 15) == full[25:]
    other_seed = _take(StepBatchSampler(groups, 2, 1, 0, seed=4), 40)
    assert [[i for i, _ in b] for b in other_seed] != [[i for i, _ in b] for b in full]


def test_batches_are_one_orientation_and_epochs_cover_the_dataset():
    groups = [0] * 7 + [1] * 5  # 12 images, global batch 4 -> 3 batches per epoch
    sampler = StepBatchSampler(groups, 2, 2, 0, seed=0)
    other_rank = StepBatchSampler(groups, 2, 2, 1, seed=0)
    assert sampler.batches_per_epoch == 3
    for epoch in range(4):
        seen = Counter()
        for iteration in range(3 * epoch, 3 * epoch + 3):
            batch = [i for i, _ in sampler.batch(iteration) + other_rank.batch(iteration)]
            assert len({groups[i] for i in batch}) == 1, batch
            seen.update(batch)
        # 4 grouped batches (7 -> 2, 5 -> 2) of which 3 are kept: at least 8 distinct images
        assert len(seen) >= 8 and max(seen.values()) <= 2


def test_ranks_split_the_global_batch_and_seeds_are_per_image():
    groups = [0] * 10
    ranks = [StepBatchSampler(groups, 3, 2, r, seed=1) for r in range(2)]
    alone = StepBatchSampler(groups, 6, 1, 0, seed=1)
    for iteration in range(6):
        assert ranks[0].batch(iteration) + ranks[1].batch(iteration) == alone.batch(iteration)
    seeds = [s for it in range(6) for _, s in alone.batch(it)]
    assert len(set(seeds)) == len(seeds)


def test_repeat_factors_repeat_rare_images():
    factors = torch.tensor([1.0, 1.0, 1.0, 3.0])  # epoch length 6
    sampler = StepBatchSampler([0] * 4, 2, 1, 0, seed=0, repeat_factors=factors)
    assert sampler.batches_per_epoch == 3
    counts = Counter(i for it in range(300) for i, _ in sampler.batch(it))
    assert counts[3] == 300 and counts[0] + counts[1] + counts[2] == 300


def test_loader_batches_do_not_depend_on_loader_processes(tiny_digitsdet, tmp_path):
    cfg = tiny_training_cfg("DigitsDet/retinanet_R18_student.yaml", str(tmp_path))
    batches = {}
    for workers in (0, 2):
        cfg.DATALOADER.NUM_WORKERS = workers
        loader = build_step_train_loader(cfg)
        loader.batch_sampler.start_iter = 5
        batches[workers] = list(itertools.islice(iter(loader), 3))
    for a, b in zip(batches[0], batches[2]):
        for x, y in zip(a, b):
            assert x["file_name"] == y["file_name"] and torch.equal(x["image"], y["image"])
            assert torch.equal(x["instances"].gt_boxes.tensor, y["instances"].gt_boxes.tensor)
