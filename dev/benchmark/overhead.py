"""Training-step overhead of distillation: student alone vs teacher forward vs distillation.

Timing runs in one process on pre-loaded seeded batches (``measure_times``): per batch a full
student-alone training step (forward, backward, optimizer step), the teachers' no-grad forward,
the distillation heads alone (their losses and backward on the student's and the teacher's
outputs for the batch) and a full distillation step, paired on the batch. Peak memory comes
from two more fresh processes, one training the student alone and one distilling, so that
each peak is its own. Reported: medians over ``iters`` steps after ``warmup`` steps,
``ratio = t_distill / (t_student + t_teacher_forward)`` with a 95 % bootstrap interval, and
``ratio_without_heads = (t_distill - t_heads) / (t_student + t_teacher_forward)``: the
framework's share (tapping, the teacher on the shared batch, dispatch), apart from the compute
a method's own loss needs (e.g. MGD's generators).
"""
import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Callable, Dict, List, Sequence, Tuple

import numpy as np
import torch
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from d2kd.config import load_config
from d2kd.engine.optimizer import build_optimizer
from d2kd.modeling.distillation_detector import student_config
from d2kd.prototypes.refresh import prototype_banks
from d2kd.utils.host_memory import retain_freed_host_memory
from d2kd.utils.io import atomic_write_json, atomic_write_text

from .batches import seeded_training_batches
from .fresh_process import module_command, module_env
from .random_teachers import save_random_teachers

logger = logging.getLogger(__name__)


def _training_step(cfg, mode: str) -> Tuple[torch.nn.Module, Callable[[List[Dict]], None]]:
    """A fresh model and its full training step (forward, backward, optimizer step): the
    student alone (``mode`` "student") or the distillation model ("distill", prototype banks
    filled)."""
    model = build_model(student_config(cfg) if mode == "student" else cfg)
    model.train()
    if mode == "distill":
        _fill_prototype_banks(model)
    optimizer = build_optimizer(cfg, model)

    def step(batch):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return model, step


def _synchronize() -> None:
    """Wait for queued GPU work, so that wall-clock times measure the work, not its launch."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    _synchronize()
    start = time.perf_counter()
    fn()
    _synchronize()
    return time.perf_counter() - start


def _as_leaves(value):
    """``value`` (a tensor, or dicts / lists / tuples of them) with every floating tensor
    replaced by a detached leaf that requires grad: the heads' backward then reaches the
    student's outputs, as in a training step, and stops there."""
    if isinstance(value, torch.Tensor):
        return value.detach().requires_grad_() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _as_leaves(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_as_leaves(v) for v in value)
    return value


def _time_teacher_and_heads(model: torch.nn.Module, batch: List[Dict]) -> Tuple[float, float]:
    """On one batch: the student's taps, untimed; then timed, the teachers' no-grad forward on
    them and the distillation heads' losses + backward on them."""
    with torch.no_grad():
        _, taps = model.student_losses_and_taps(batch)
        outputs = {}
        teacher_time = _timed(lambda: outputs.update(model.teacher_outputs(taps)))
    taps = replace(taps, **{name: _as_leaves(getattr(taps, name)) for name in
                            ("features", "dense_predictions", "rpn_predictions",
                             "roi_predictions")})
    head_time = _timed(lambda: sum(model.head_losses(taps, outputs).values()).backward())
    model.zero_grad(set_to_none=True)
    return teacher_time, head_time


def _fill_prototype_banks(model: torch.nn.Module) -> None:
    """Random valid prototypes in every bank: a step then costs what it costs after a refresh
    (the refresh itself is a trainer hook, measured separately in training runs)."""
    for bank in prototype_banks(model):
        for level in range(len(bank.levels)):
            for cls in range(bank.num_classes):
                bank.set_prototypes(level, cls,
                                    torch.randn(bank.teacher.shape[2:], device=bank.teacher.device),
                                    torch.randn(bank.student.shape[2:], device=bank.student.device))


def measure_times(cfg, batches: List[List[Dict]], warmup: int) -> Dict[str, List[float]]:
    """Paired step times, all in this process: per batch a student-alone training step (its own
    model and optimizer), the teachers' forward, the heads alone and a distillation training
    step, alternating whether the student or the distillation step comes first. Pairing on the
    batch and the process removes the between-process spread (±5 % for identical work) that
    separate processes add to a ratio."""
    _, student_step = _training_step(cfg, "student")
    model, distill_step = _training_step(cfg, "distill")
    times: Dict[str, List[float]] = {"student": [], "teacher_forward": [], "heads": [],
                                     "distill": []}
    for i, batch in enumerate(batches):
        t_distill = _timed(lambda: distill_step(batch)) if i % 2 else None
        t_student = _timed(lambda: student_step(batch))
        t_teacher, t_heads = _time_teacher_and_heads(model, batch)
        if t_distill is None:
            t_distill = _timed(lambda: distill_step(batch))
        if i >= warmup:
            for key, value in zip(times, (t_student, t_teacher, t_heads, t_distill)):
                times[key].append(value)
    return times


def _ratio(times: Dict[str, np.ndarray]) -> float:
    median = {k: float(np.median(v)) for k, v in times.items()}
    return median["distill"] / (median["student"] + median["teacher_forward"])


def ratio_interval(times: Dict[str, List[float]], resamples: int = 2000,
                   seed: int = 0) -> Tuple[float, float]:
    """95 % bootstrap interval of ``ratio`` over the paired steps (steps resampled whole)."""
    arrays = {k: np.asarray(v) for k, v in times.items()}
    steps = len(arrays["distill"])
    rng = np.random.default_rng(seed)
    ratios = [_ratio({k: v[idx] for k, v in arrays.items()})
              for idx in rng.integers(0, steps, size=(resamples, steps))]
    low, high = np.percentile(ratios, [2.5, 97.5])
    return float(low), float(high)


def measure_peak_memory(cfg, batches: List[List[Dict]], mode: str) -> Dict[str, float]:
    """Peak RSS (MB) of this process after training steps of ``mode`` ("student" or
    "distill") on ``batches`` — run alone in a fresh process so that the peak is its own —
    and, on a GPU, the peak of allocated GPU memory (MB) over those steps."""
    _, step = _training_step(cfg, mode)
    on_cuda = torch.device(cfg.MODEL.DEVICE).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats()
    for batch in batches:
        step(batch)
    peaks = {f"peak_rss_{mode}_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if on_cuda:
        peaks[f"peak_cuda_{mode}_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def measure(config_file: str, mode: str, iters: int, warmup: int, opts: Sequence[str]) -> Dict:
    """One process's measurement (``mode``: "times", "student" or "distill")."""
    cfg = load_config(config_file, opts)
    if cfg.D2KD.RETAIN_HOST_MEMORY:  # as DistillTrainer does for training
        retain_freed_host_memory()
    batches = seeded_training_batches(cfg, iters + warmup)
    with EventStorage():
        if mode == "times":
            return {"step_times": measure_times(cfg, batches, warmup)}
        return measure_peak_memory(cfg, batches, mode)


def run_overhead_benchmark(config_file: str, json_path: str, iters: int = 20, warmup: int = 3,
                           opts: Sequence[str] = (), random_teacher: bool = False) -> Dict:
    opts = list(opts)
    with tempfile.TemporaryDirectory() as tmp:
        if random_teacher:
            weights = save_random_teachers(load_config(config_file, opts), tmp)
            opts += ["DISTILL.TEACHER.WEIGHTS", repr(weights)]
        result = {"config": config_file, "iters": iters, "warmup": warmup, "opts": opts,
                  "random_teacher": random_teacher, "threads": torch.get_num_threads()}
        for mode in ("times", "student", "distill"):
            out = os.path.join(tmp, f"{mode}.json")
            cmd = [*module_command("overhead"), mode, config_file, str(iters), str(warmup),
                   json.dumps(opts), out]
            subprocess.run(cmd, check=True, capture_output=True, text=True, env=module_env())
            with open(out) as f:
                result.update(json.load(f))
    times = result["step_times"]
    for key, values in times.items():
        result[f"t_{key}"] = statistics.median(values)
    base = result["t_student"] + result["t_teacher_forward"]
    result["ratio"] = result["t_distill"] / base
    result["ratio_ci95"] = ratio_interval(times)
    result["ratio_without_heads"] = (result["t_distill"] - result["t_heads"]) / base
    atomic_write_json(json_path, result)
    return result


def summarize_overhead(json_files: Sequence[str], json_path: str, markdown_path: str) -> List[Dict]:
    """One table (JSON + markdown) from several ``overhead`` result files."""
    from tabulate import tabulate

    results = []
    for path in json_files:
        with open(path) as f:
            results.append(json.load(f))
    rows = [[os.path.splitext(os.path.basename(r["config"]))[0], round(r["t_student"], 3),
             round(r["t_teacher_forward"], 3), round(r["t_heads"], 3), round(r["t_distill"], 3),
             round(r["ratio"], 2), "[{:.2f}, {:.2f}]".format(*r["ratio_ci95"]),
             round(r["ratio_without_heads"], 2),
             round(r["peak_rss_student_mb"]), round(r["peak_rss_distill_mb"]), r["threads"]]
            for r in results]
    headers = ["config", "t_student s", "t_teacher_fwd s", "t_heads s", "t_distill s", "ratio",
               "ratio 95 % interval", "ratio without heads", "peak RSS student MB",
               "peak RSS distill MB", "threads"]
    atomic_write_json(json_path, {"runs": results})
    atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    return results


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py overhead`` and ``overhead-summary``."""
    ovh = subparsers.add_parser("overhead",
                                help="distillation step vs student step + teacher forward")
    ovh.add_argument("--config-file", required=True)
    ovh.add_argument("--json", required=True)
    ovh.add_argument("--iters", type=int, default=20)
    ovh.add_argument("--warmup", type=int, default=3)
    ovh.add_argument("--random-teacher", action="store_true",
                     help="use untrained teacher weights (step times do not depend on them)")
    ovh.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    ovh.set_defaults(run=_run_overhead)
    ovs = subparsers.add_parser("overhead-summary", help="tabulate overhead result files")
    ovs.add_argument("--inputs", nargs="+", required=True)
    ovs.add_argument("--json", required=True)
    ovs.add_argument("--markdown", required=True)
    ovs.set_defaults(run=lambda args: summarize_overhead(args.inputs, args.json, args.markdown))


def _run_overhead(args: argparse.Namespace) -> None:
    result = run_overhead_benchmark(args.config_file, args.json, args.iters, args.warmup,
                                    args.opts, args.random_teacher)
    logger.info("%s", result)


if __name__ == "__main__":  # one measuring process: MODE CONFIG ITERS WARMUP OPTS_JSON OUT_JSON
    import d2kd  # noqa: F401  (registrations in the measuring process)

    mode, config, n, w, extra, out_path = sys.argv[1:7]
    atomic_write_json(out_path, measure(config, mode, int(n), int(w), json.loads(extra)))
