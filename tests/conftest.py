"""Shared fixtures: a tiny DigitsDet copy registered as ``digitsdet_tiny_{train,val}``."""
import os

import pytest
import torch

import d2kd  # noqa: F401  (registrations)
from d2kd.config import load_config
from d2kd.data import register_digitsdet
from d2kd.data.digitsdet import DigitsDetSpec, generate_digitsdet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
TINY_SPEC = DigitsDetSpec(seed=0, num_train=24, num_val=8)

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_digitsdet(tmp_path_factory) -> str:
    """Root of a tiny DigitsDet (24 train / 8 val images), registered as digitsdet_tiny_*."""
    root = str(tmp_path_factory.mktemp("datasets") / "digitsdet")
    generate_digitsdet(root, TINY_SPEC, show_progress=False)
    register_digitsdet(root, name_prefix="digitsdet_tiny")
    return root


def tiny_training_cfg(config_file: str, output_dir: str, max_iter: int = 2):
    """A DigitsDet config shrunk to a few iterations on the tiny dataset (CPU, 2 images/step)."""
    cfg = load_config(os.path.join(CONFIGS, config_file))
    cfg.DATASETS.TRAIN = ("digitsdet_tiny_train",)
    cfg.DATASETS.TEST = ("digitsdet_tiny_val",)
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.SOLVER.MAX_ITER = max_iter
    cfg.SOLVER.WARMUP_ITERS = 1
    cfg.SOLVER.CHECKPOINT_PERIOD = max_iter
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.TEST.EVAL_PERIOD = 0
    cfg.MODEL.WEIGHTS = ""  # no pre-trained backbone: tests must not pre-train
    cfg.OUTPUT_DIR = output_dir
    return cfg
