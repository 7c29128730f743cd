"""The same training batches in every benchmark process."""
from typing import Dict, List

from detectron2.data import build_detection_train_loader
from detectron2.utils.env import seed_all_rng


def seeded_training_batches(cfg, count: int) -> List[List[Dict]]:
    """The first ``count`` batches of ``cfg``'s training loader, identical in every process.

    detectron2's ``TrainingSampler`` draws its shuffle seed from NumPy and the augmentations
    (e.g. ``ResizeShortestEdge``) draw sizes from NumPy too, so seeding torch alone gives each
    process other images at other sizes: all of Python's, NumPy's and torch's generators are
    seeded from ``cfg.SEED`` (which also seeds the model's initialisation that follows).
    """
    seed_all_rng(cfg.SEED)
    cfg = cfg.clone()
    cfg.defrost()
    cfg.DATALOADER.NUM_WORKERS = 0  # workers would reseed themselves
    loader = iter(build_detection_train_loader(cfg))
    return [next(loader) for _ in range(count)]
