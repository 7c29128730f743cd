"""Measurements that need a process of their own (peak memory, start-up cost), and how a
benchmark module is started as one."""
import json
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Sequence, Tuple

from d2kd.utils.io import atomic_save_figure

#: the checkout's root, where ``dev`` is (this is tooling of the checkout, not installed code)
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def module_command(module: str) -> List[str]:
    """``python -m dev.benchmark.<module>``: a benchmark module in a fresh process, to be
    started with :func:`module_env`'s environment."""
    return [sys.executable, "-m", f"{__package__}.{module}"]


def module_env(**variables: str) -> Dict[str, str]:
    """This process's environment plus ``variables``, with the checkout's root first on
    ``PYTHONPATH``: a :func:`module_command` child imports ``dev`` from any directory."""
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    return {**os.environ, **variables, "PYTHONPATH": path}


def measure_in_fresh_process(module: str, args: Sequence[str]) -> Dict:
    """Run benchmark ``module`` as ``python -m dev.benchmark.<module> *args OUT_JSON`` and
    return the JSON it wrote to OUT_JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        subprocess.run([*module_command(module), *args, out], check=True, env=module_env())
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
