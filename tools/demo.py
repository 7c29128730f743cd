#!/usr/bin/env python
"""The main job on the embedded benchmark (``make demo``).

Generates DigitsDet if needed, trains the DigitsDet RetinaNet teacher unless a finished run
exists (then it is reused), evaluates it with COCOEvaluator and prints the AP table.
Each training is a ``tools/train_net.py`` run, so its output directory is a normal
detectron2 output directory (log.txt, metrics.json, TensorBoard events, checkpoints).
"""
import argparse
import json
import logging
import os
import subprocess
import sys
from typing import Dict, List

from tabulate import tabulate

import d2kd  # noqa: F401
from d2kd.config import load_config
from d2kd.data import digitsdet_root, ensure_digitsdet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("d2kd.demo")

# (row name, config file): the runs of the demo, in order.
RUNS = [("RetinaNet teacher (R-50/2, FPN 128)", "configs/DigitsDet/retinanet_R50_teacher.yaml")]
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def run_train_net(config_file: str, extra_args: List[str]) -> None:
    cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"),
           "--config-file", config_file, *extra_args]
    logger.info("$ %s", " ".join(cmd))
    subprocess.run(cmd, check=True)


def train_or_reuse(config_file: str) -> Dict[str, float]:
    """Box AP of the run of ``config_file``; trains (or resumes) it unless already finished."""
    cfg = load_config(config_file)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    results_file = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
    if os.path.isfile(final) and os.path.isfile(results_file):
        logger.info("Reusing the finished run in %s", cfg.OUTPUT_DIR)
    elif os.path.isfile(final):
        run_train_net(config_file, ["--eval-only", "MODEL.WEIGHTS", final])
    else:
        run_train_net(config_file, ["--resume"])
    with open(results_file) as f:
        return json.load(f)["bbox"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    ensure_digitsdet(digitsdet_root())
    rows = []
    for name, config_file in RUNS:
        box = train_or_reuse(os.path.join(REPO, config_file))
        rows.append([name] + [f"{box[m]:.1f}" for m in METRICS])
    print("\nDigitsDet val, box AP (COCOEvaluator):")
    print(tabulate(rows, headers=["model"] + METRICS, tablefmt="github"))


if __name__ == "__main__":
    main()
