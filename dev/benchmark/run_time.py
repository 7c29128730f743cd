"""Wall time of a training run (start to evaluated model), measured or projected.

A run of ``tools/train_net.py`` costs start-up, ``MAX_ITER`` training steps (the first few
slower: allocator and oneDNN warm-up), the final checkpoint and the evaluation with
COCOEvaluator. With ``iters`` set, the same command runs only ``iters`` iterations (start-up,
warm-up and evaluation included) and the remaining ``MAX_ITER - iters`` steps are added at the
steady-state step time: the median step time over the last 20 iterations of the short run, as
detectron2's ``IterationTimer`` writes it to ``metrics.json``. Without ``iters`` the whole run
is measured. Intermediate checkpoints of a full run (one every ``CHECKPOINT_PERIOD``, under a
second each for these models) are not in a short run.
"""
import argparse
import json
import os
import tempfile
from typing import Dict, List, Optional, Sequence

from tabulate import tabulate

from d2kd.apps.launch.process import run_train_net
from d2kd.config import load_config
from d2kd.utils.io import atomic_write_json, atomic_write_text


def steady_step_seconds(metrics_lines: Sequence[str]) -> float:
    """The last "time" in detectron2's ``metrics.json`` lines: the median step time of the last
    20 iterations (IterationTimer's scalar, smoothed by JSONWriter's window)."""
    times = [record["time"] for record in map(json.loads, metrics_lines) if "time" in record]
    if not times:
        raise ValueError("no step time in metrics.json: the run trained fewer iterations than "
                         "detectron2's logging period (20); use more iterations")
    return float(times[-1])


def time_run(config_file: str, iters: Optional[int] = None, threads: int = 0,
             opts: Sequence[str] = ()) -> Dict:
    """One ``tools/train_net.py`` run in a temporary OUTPUT_DIR: its wall time, steady-state
    seconds per iteration and the (for a short run: projected) wall time of the schedule."""
    max_iter = load_config(config_file, opts).SOLVER.MAX_ITER
    with tempfile.TemporaryDirectory(prefix="d2kd_run_time_") as out:
        short = [] if iters is None else ["SOLVER.MAX_ITER", str(iters)]
        wall = run_train_net(config_file, [*opts, "OUTPUT_DIR", out, *short], threads=threads)
        with open(os.path.join(out, "metrics.json")) as f:
            step = steady_step_seconds(f.read().splitlines())
    remaining = 0 if iters is None else max(0, max_iter - iters)
    return {"config": config_file, "opts": list(opts), "threads": threads or "default",
            "max_iter": max_iter, "iters_run": max_iter - remaining, "measured": remaining == 0,
            "wall_seconds": round(wall, 1), "steady_seconds_per_iter": step,
            "run_minutes": round((wall + remaining * step) / 60, 2)}


def run_time_benchmark(configs: Sequence[str], json_path: str, markdown_path: str,
                       iters: Optional[int] = None, threads: int = 0,
                       opts: Sequence[str] = ()) -> List[Dict]:
    """``time_run`` for each config; results rewritten atomically after every run."""
    results = []
    for config in configs:
        results.append(time_run(config, iters, threads, opts))
        atomic_write_json(json_path, {"runs": results})
        rows = [[os.path.basename(r["config"]), r["max_iter"], r["wall_seconds"],
                 r["steady_seconds_per_iter"], r["run_minutes"],
                 "measured" if r["measured"] else f"{r['iters_run']} its + projection",
                 r["threads"]] for r in results]
        headers = ["config", "MAX_ITER", "wall s (run)", "steady s/it", "run min", "how",
                   "threads"]
        atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    return results


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py run-time``."""
    rtm = subparsers.add_parser("run-time",
                                help="wall time of a run: measured, or projected from a short run")
    rtm.add_argument("--configs", nargs="+", required=True)
    rtm.add_argument("--json", required=True)
    rtm.add_argument("--markdown", required=True)
    rtm.add_argument("--iters", type=int, default=None,
                     help="run this many iterations and project the schedule (default: run it all)")
    rtm.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    rtm.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    rtm.set_defaults(run=lambda args: run_time_benchmark(
        args.configs, args.json, args.markdown, args.iters, args.threads, args.opts))
