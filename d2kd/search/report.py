"""Looking at searches: best-so-far curves and the GA-vs-random comparison.

Reads only ``DIR/trials.csv`` and ``DIR/summary.json``, so searches run on other machines
compare as well.
"""
import csv
import json
import math
import os
from typing import Dict, List, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

#: statuses of trials that count against the budget (a cached trial repeats an earlier AP)
BUDGET_STATUSES = ("ok", "cached", "pruned", "rejected")


def markdown_cell(value) -> str:
    """A table cell; the ``|`` of genomes escaped."""
    return str(value).replace("|", "\\|")


def load_rows(output_dir: str) -> List[Dict]:
    path = os.path.join(output_dir, "trials.csv")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {output_dir} is not a search output "
                                "directory (tools/search_net.py --output).")
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def best_so_far(rows: Sequence[Dict]) -> List[float]:
    """Best AP after each candidate trial (baseline excluded), in completion order; a rejected
    or pruned trial never improves it. -inf until a trial finishes with an AP."""
    trials = sorted((r for r in rows if r["study"] != "baseline"
                     and r["status"] in BUDGET_STATUSES), key=lambda r: r["completed"])
    best, curve = -math.inf, []
    for r in trials:
        if r["status"] in ("ok", "cached") and r["ap"]:
            best = max(best, float(r["ap"]))
        curve.append(best)
    return curve


def plot_best_so_far(curves: Dict[str, List[float]], path: str) -> None:
    """One line per search: best-so-far proxy AP vs trial number."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, curve in curves.items():
        ax.step(range(1, len(curve) + 1), [v if math.isfinite(v) else math.nan for v in curve],
                where="post", label=label)
    ax.set_xlabel("trial")
    ax.set_ylabel("best proxy box AP so far")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(output_dirs: Sequence[str], plot_path: str) -> str:
    """Plot the best-so-far curves of several searches; returns a markdown table of them."""
    curves, lines = {}, ["| search | arm | trials | best proxy AP | baseline AP | best genome |",
                         "|---|---|---|---|---|---|"]
    for directory in output_dirs:
        with open(os.path.join(directory, "summary.json")) as f:
            summary = json.load(f)
        curve = best_so_far(load_rows(directory))
        label = f"{summary['arm']} ({os.path.basename(os.path.normpath(directory))})"
        curves[label] = curve
        best = f"{curve[-1]:.2f}" if curve and math.isfinite(curve[-1]) else "-"
        baseline = summary.get("baseline_ap")
        lines.append(f"| {directory} | {summary['arm']} | {len(curve)} | {best} | "
                     f"{'-' if baseline is None else f'{baseline:.2f}'} | "
                     f"{markdown_cell(summary.get('best_genome'))} |")
    plot_best_so_far(curves, plot_path)
    return "\n".join(lines) + "\n"
