"""Pre-train the DigitsDet backbones a config names (``digitsdet-pretrained://NAME``).

    python -m d2kd.apps.launch.pretrain R18_FPN64 [R50_FPN128 ...]

A missing backbone is produced once by training ``configs/DigitsDet/pretrain/NAME.yaml``
(dense digit segmentation, d2kd/modeling/pretext.py) in a child training process; concurrent
processes wait on a lock, and a killed pre-training resumes from its last checkpoint. The
cached file holds only ``backbone.*`` tensors, so every detector with the same backbone config
loads it; the detector's heads keep their own initialisation. ``tools/train_net.py`` calls
:func:`ensure_pretrained_weights` before a run starts.
"""
import argparse
import fcntl
import logging
import os
from typing import Sequence

import torch

from ...config import ConfigError
from ...data import digitsdet_root, ensure_digitsdet
from ...model_zoo import PRETRAINED_PREFIX, pretrain_config, pretrained_backbone_path
from ...utils.io import atomic_save
from .process import run_train_net

logger = logging.getLogger(__name__)


def ensure_pretrained_backbone(name: str, root: str = "", opts: Sequence[str] = ()) -> str:
    """Path of the cached backbone ``name`` for the DigitsDet copy at ``root``; trains it once.

    ``opts``: ``KEY VALUE`` overrides of the pre-training run (tests shorten it)."""
    root = root or digitsdet_root()
    weights = pretrained_backbone_path(name, root)
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
                           weights_only=True)["model"]
        backbone = {k: v for k, v in model.items() if k.startswith("backbone.")}
        atomic_save({"model": backbone, "__author__": f"d2kd {os.path.basename(config)}"},
                    weights)
    return weights


def ensure_pretrained_weights(weights: str, key: str = "MODEL.WEIGHTS") -> None:
    """Pre-train, once, the DigitsDet backbone ``weights`` names (``digitsdet-pretrained://NAME``)
    if it is not cached yet; other weights pass. An unknown name is a :class:`ConfigError`
    naming ``key``."""
    if not weights.startswith(PRETRAINED_PREFIX):
        return
    try:
        ensure_pretrained_backbone(weights[len(PRETRAINED_PREFIX):])
    except FileNotFoundError as e:
        raise ConfigError(f"{key}={weights}: {e}") from None


def main(argv: Sequence[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+", help="backbones, e.g. R18_FPN64")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    for name in args.names:
        print(ensure_pretrained_backbone(name))


if __name__ == "__main__":
    main()
