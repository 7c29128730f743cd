"""DigitsDet pre-trained backbones: ``MODEL.WEIGHTS: "digitsdet-pretrained://R18_FPN64"``.

The offline stand-in for ImageNet initialisation. ``digitsdet-pretrained://NAME`` resolves,
through an iopath handler registered in detectron2's ``PathManager``, to
``$DETECTRON2_DATASETS/digitsdet/pretrained/NAME.pth``. A missing file is produced once by
training ``configs/DigitsDet/pretrain/NAME.yaml`` (dense digit segmentation,
d2kd/modeling/pretext.py) in a ``tools/train_net.py`` process; concurrent processes wait on a
lock, and a killed pre-training resumes from its last checkpoint. The cached file holds only
``backbone.*`` tensors, so every detector with the same backbone config loads it; the
detector's heads keep their own initialisation.
"""
import fcntl
import logging
import os
from typing import Sequence

import torch
from detectron2.utils.file_io import PathManager
from iopath.common.file_io import PathHandler

from .compat.file_io import register_path_handler
from .data import digitsdet_root, ensure_digitsdet
from .utils.io import atomic_save
from .utils.train_net_process import REPO, run_train_net

logger = logging.getLogger(__name__)

PREFIX = "digitsdet-pretrained://"
PRETRAIN_CONFIGS = os.path.join(REPO, "configs", "DigitsDet", "pretrain")


def pretrain_config(name: str) -> str:
    path = os.path.join(PRETRAIN_CONFIGS, f"{name}.yaml")
    if not os.path.isfile(path):
        available = sorted(f[:-5] for f in os.listdir(PRETRAIN_CONFIGS)
                           if f.endswith(".yaml") and not f.startswith("Base-"))
        raise FileNotFoundError(
            f"No pre-training config for {PREFIX}{name} ({path}). Available: {available}."
        )
    return path


def ensure_pretrained_backbone(name: str, root: str = "", opts: Sequence[str] = ()) -> str:
    """Path of the cached backbone ``name`` for the DigitsDet copy at ``root``; trains it once."""
    root = root or digitsdet_root()
    weights = os.path.join(root, "pretrained", f"{name}.pth")
    if os.path.isfile(weights):
        return weights
    config = pretrain_config(name)
    ensure_digitsdet(root)
    os.makedirs(os.path.dirname(weights), exist_ok=True)
    with open(weights + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.path.isfile(weights):
            return weights
        run_dir = os.path.join(root, "pretrained", f"{name}.run")
        logger.info("Pre-training backbone %s once (cached at %s); log in %s", name, weights,
                    run_dir)
        run_train_net(config, ["--resume", "OUTPUT_DIR", run_dir, *opts],
                      env={"DETECTRON2_DATASETS": os.path.dirname(os.path.abspath(root))},
                      quiet=False)  # detectron2's ETA lines: a pre-training takes minutes
        model = torch.load(os.path.join(run_dir, "model_final.pth"), map_location="cpu",
                           weights_only=False)["model"]
        backbone = {k: v for k, v in model.items() if k.startswith("backbone.")}
        atomic_save({"model": backbone, "__author__": f"d2kd {os.path.basename(config)}"},
                    weights)
    return weights


class DigitsDetPretrainedHandler(PathHandler):
    """Resolves ``digitsdet-pretrained://NAME`` (see module docstring)."""

    def _get_supported_prefixes(self):
        return [PREFIX]

    def _get_local_path(self, path: str, **kwargs) -> str:
        return ensure_pretrained_backbone(path[len(PREFIX):])

    def _open(self, path: str, mode: str = "r", **kwargs):
        return PathManager.open(self._get_local_path(path), mode, **kwargs)

    def _exists(self, path: str, **kwargs) -> bool:
        return os.path.isfile(pretrain_config(path[len(PREFIX):]))


register_path_handler(DigitsDetPretrainedHandler())
