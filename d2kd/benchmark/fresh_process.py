"""Measurements that need a process of their own (peak memory, start-up cost)."""
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

from ..utils.io import atomic_save_figure


def measure_in_fresh_process(module: str, args: Sequence[str]) -> Dict:
    """Run ``python -m module *args OUT_JSON`` and return the JSON it wrote to OUT_JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        subprocess.run([sys.executable, "-m", module, *args, out], check=True)
        with open(out) as f:
            return json.load(f)


def save_curves(path: str, x: Sequence[float], curves: List[Tuple[Sequence[float], str, str]],
                xlabel: str, ylabel: str, title: str = "", log_y: bool = False) -> None:
    """A PNG of ``(y, matplotlib style, label)`` curves over ``x`` (log x axis), atomically.
    Uses matplotlib's ``Figure`` directly: the process's plotting backend is left alone."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for y, style, label in curves:
        ax.plot(x, y, style, label=label)
    ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    atomic_save_figure(fig, path)
