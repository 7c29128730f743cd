"""Loss scale probe: every loss of a config's model on one training batch, before training.

The student starts from ``MODEL.WEIGHTS`` (as a fresh run does), the teacher from its trained
weights; the values say whether a distillation loss starts at the scale of the detection
losses or dwarfs them. The DigitsDet feature-loss weights are set from this probe
(docs/distillation.md, "Loss scales").
"""
import argparse
import os
from typing import Dict, List, Sequence

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tabulate import tabulate

from d2kd.apps.launch.pretrain import ensure_pretrained_weights
from d2kd.config import load_config
from d2kd.utils.io import atomic_write_json, atomic_write_text

from .batches import seeded_training_batches


@torch.no_grad()
def probe_losses(config_file: str, batch: List[Dict], seed: int = 0) -> Dict[str, float]:
    cfg = load_config(config_file)
    ensure_pretrained_weights(cfg.MODEL.WEIGHTS)  # a DigitsDet backbone it starts from, once
    torch.manual_seed(seed)
    model = build_model(cfg)
    if hasattr(model, "initialize"):  # a DistillationDetector: student weights (+ teacher's)
        model.initialize(cfg.MODEL.WEIGHTS, cfg.DISTILL.INIT_FROM_TEACHER)
    else:
        DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.train()
    with EventStorage(0):
        return {name: float(value) for name, value in model(batch).items()}


def run_loss_scale_probe(configs: Sequence[str], json_path: str, markdown_path: str) -> List[Dict]:
    """One batch of the first config's training set, every config's initial losses."""
    batch, = seeded_training_batches(load_config(configs[0]), 1)
    results = []
    for config in configs:
        losses = probe_losses(config, batch)
        detection = sum(v for k, v in losses.items() if not k.startswith("loss_kd_"))
        distillation = sum(v for k, v in losses.items() if k.startswith("loss_kd_"))
        results.append({"config": config, "losses": losses, "detection": detection,
                        "distillation": distillation})
    rows = [[os.path.splitext(os.path.basename(r["config"]))[0], round(r["detection"], 3),
             round(r["distillation"], 3),
             ", ".join(f"{k} {v:.3g}" for k, v in r["losses"].items() if k.startswith("loss_kd_"))]
            for r in results]
    atomic_write_json(json_path, {"runs": results})
    atomic_write_text(markdown_path, tabulate(
        rows, headers=["config", "detection losses", "KD losses", "KD terms"],
        tablefmt="github") + "\n")
    return results


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py loss-scale``."""
    scl = subparsers.add_parser("loss-scale", help="initial losses of configs on one batch")
    scl.add_argument("--configs", nargs="+", required=True)
    scl.add_argument("--json", required=True)
    scl.add_argument("--markdown", required=True)
    scl.set_defaults(run=lambda args: run_loss_scale_probe(args.configs, args.json, args.markdown))
