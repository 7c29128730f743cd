#!/usr/bin/env python
"""The main job on the embedded benchmark (``make demo``).

Generates DigitsDet if needed; trains the DigitsDet RetinaNet teacher, the student alone and
the student distilled from the teacher (MGD), each unless a finished run exists (then it is
reused); evaluates them with COCOEvaluator; prints the AP table and saves a bar chart
(``output/digitsdet/demo_ap.png``).
Each training is a ``tools/train_net.py`` run, so its output directory is a normal
detectron2 output directory (log.txt, metrics.json, TensorBoard events, checkpoints).
"""
import argparse
import json
import logging
import os
from typing import Dict

from tabulate import tabulate

import d2kd  # noqa: F401
from d2kd.apps.launch.process import run_train_net
from d2kd.config import load_config
from d2kd.data import digitsdet_root, ensure_digitsdet
from d2kd.utils.io import atomic_save_figure

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
logger = logging.getLogger("d2kd.demo")

# (row name, config file): the runs of the demo, in order.
RUNS = [
    ("teacher RetinaNet R-50/2", "configs/DigitsDet/retinanet_R50_teacher.yaml"),
    ("student RetinaNet R-18/2", "configs/DigitsDet/retinanet_R18_student.yaml"),
    ("student + MGD from the teacher", "configs/DigitsDet/retinanet_R18_from_R50_mgd.yaml"),
]
CHART = "output/digitsdet/demo_ap.png"
METRICS = ["AP", "AP50", "AP75", "APs", "APm", "APl"]


def train_or_reuse(config_file: str) -> Dict[str, float]:
    """Box AP of the run of ``config_file``; trains (or resumes) it unless already finished."""
    cfg = load_config(config_file)
    final = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
    results_file = os.path.join(cfg.OUTPUT_DIR, "inference", "results.json")
    if os.path.isfile(final) and os.path.isfile(results_file):
        logger.info("Reusing the finished run in %s", cfg.OUTPUT_DIR)
    elif os.path.isfile(final):
        run_train_net(config_file, ["--eval-only", "MODEL.WEIGHTS", final], quiet=False)
    else:
        run_train_net(config_file, ["--resume"], quiet=False)
    with open(results_file) as f:
        return json.load(f)["bbox"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(name)s: %(message)s")
    ensure_digitsdet(digitsdet_root())
    results = {name: train_or_reuse(os.path.join(REPO, config)) for name, config in RUNS}
    rows = [[name] + [f"{box[m]:.1f}" for m in METRICS] for name, box in results.items()]
    print("\nDigitsDet val, box AP (COCOEvaluator):")
    print(tabulate(rows, headers=["model"] + METRICS, tablefmt="github"))
    save_chart(results, CHART)
    print(f"\nChart: {CHART}")


def save_chart(results: Dict[str, Dict[str, float]], path: str) -> None:
    """Grouped bars: AP, AP50, APs, APm, APl per run."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    metrics = ["AP", "AP50", "APs", "APm", "APl"]
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.8 / len(results)
    for i, (name, box) in enumerate(results.items()):
        xs = [m + i * width for m in range(len(metrics))]
        bars = ax.bar(xs, [box[m] for m in metrics], width, label=name)
        ax.bar_label(bars, fmt="%.1f", fontsize=7)
    ax.set_xticks([m + width * (len(results) - 1) / 2 for m in range(len(metrics))], metrics)
    ax.set_ylabel("COCO box AP on digitsdet_val")
    ax.set_title("DigitsDet: teacher, student, distilled student")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_save_figure(fig, path)


if __name__ == "__main__":
    main()
