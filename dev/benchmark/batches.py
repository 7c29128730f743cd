"""The same training batches in every benchmark process."""
from typing import Dict, List

from detectron2.utils.env import seed_all_rng

from d2kd.data.step_loader import build_step_train_loader


def seeded_training_batches(cfg, count: int) -> List[List[Dict]]:
    """The first ``count`` batches of ``cfg``'s training loader, identical in every process.

    d2kd's training stream is a function of ``cfg.SEED`` (d2kd/data/step_loader.py); the
    global generators are seeded from it too, for the model initialisation that follows.
    """
    seed_all_rng(cfg.SEED)
    loader = iter(build_step_train_loader(cfg))
    return [next(loader) for _ in range(count)]
