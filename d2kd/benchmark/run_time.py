"""Wall time of a training run (start to evaluated model), measured or projected.

A run of ``tools/train_net.py`` costs a fixed part (start-up, data loading, the final
checkpoint, evaluation with COCOEvaluator) plus ``MAX_ITER`` training steps. With ``iters``
set, the same command runs only ``iters`` iterations: detectron2's ``IterationTimer`` reports
the steady-state seconds per iteration ("Overall training speed", its warm-up iterations
excluded), everything else in the measured wall time is the fixed part, and the full run is
projected as ``fixed + MAX_ITER * seconds_per_iteration``. Without ``iters`` the whole run is
measured. Intermediate checkpoints of a full run (one every ``CHECKPOINT_PERIOD``, well under a
second each for these models) are not in a short run's fixed part.
"""
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from ..config import load_config
from ..utils.io import atomic_write_json, atomic_write_text

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_SPEED = re.compile(r"Overall training speed: (\d+) iterations in \S+ \(([\d.]+) s / it\)")


def parse_training_speed(log_text: str) -> float:
    """Seconds per iteration from detectron2's "Overall training speed" log line."""
    found = _SPEED.findall(log_text)
    if not found:
        raise ValueError("no 'Overall training speed' line in the log: the run trained fewer "
                         "iterations than IterationTimer's warm-up; use more iterations")
    return float(found[-1][1])


def time_run(config_file: str, iters: Optional[int] = None, threads: int = 0,
             opts: Sequence[str] = ()) -> Dict:
    """One ``tools/train_net.py`` run in a temporary OUTPUT_DIR: its wall time, seconds per
    iteration and (for a short run) the projected wall time of the configured schedule."""
    max_iter = load_config(config_file, opts).SOLVER.MAX_ITER
    env = dict(os.environ)
    if threads:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    with tempfile.TemporaryDirectory(prefix="d2kd_run_time_") as out:
        cmd = [sys.executable, os.path.join(REPO, "tools", "train_net.py"), "--config-file",
               config_file, *opts, "OUTPUT_DIR", out]
        if iters is not None:
            cmd += ["SOLVER.MAX_ITER", str(iters)]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
        wall = time.perf_counter() - start
        with open(os.path.join(out, "log.txt")) as f:
            seconds_per_iter = parse_training_speed(f.read())
    trained = max_iter if iters is None else iters
    fixed = wall - trained * seconds_per_iter
    return {"config": config_file, "opts": list(opts), "threads": threads or "default",
            "max_iter": max_iter, "iters_run": trained, "measured": iters is None,
            "wall_seconds": round(wall, 1), "seconds_per_iter": seconds_per_iter,
            "fixed_seconds": round(fixed, 1),
            "run_minutes": round((fixed + max_iter * seconds_per_iter) / 60, 2)}


def run_time_benchmark(configs: Sequence[str], json_path: str, markdown_path: str,
                       iters: Optional[int] = None, threads: int = 0,
                       opts: Sequence[str] = ()) -> List[Dict]:
    """``time_run`` for each config; results rewritten atomically after every run."""
    results = []
    for config in configs:
        results.append(time_run(config, iters, threads, opts))
        atomic_write_json(json_path, {"runs": results})
        rows = [[os.path.basename(r["config"]), r["max_iter"], r["seconds_per_iter"],
                 r["fixed_seconds"], r["run_minutes"],
                 "measured" if r["measured"] else f"projected from {r['iters_run']} its",
                 r["threads"]] for r in results]
        headers = ["config", "MAX_ITER", "s/it", "fixed s", "run min", "how", "threads"]
        atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    return results
