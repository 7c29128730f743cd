"""Training-step overhead of distillation: student alone vs teacher forward vs distillation.

Each measurement runs in a fresh process (so that peak RSS is its own) on the same pre-loaded
batches: ``student`` times a full student training step (forward, backward, optimizer step);
``distill`` times the teachers' no-grad forward on those batches, the distillation heads alone
(their losses and backward, on the student's and the teacher's outputs for the batch) and a
full distillation step. Reported: medians over ``iters`` steps after ``warmup`` steps,
``ratio = t_distill / (t_student + t_teacher_forward)`` and
``ratio_without_heads = (t_distill - t_heads) / (t_student + t_teacher_forward)``: the
framework's share (tapping, the teacher on the shared batch, dispatch), apart from the compute
a method's own loss needs (e.g. MGD's generators).
"""
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from typing import Dict, List, Sequence, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from ..config import load_config
from ..engine.optimizer import build_optimizer
from ..modeling.distillation_detector import student_config
from ..prototypes.refresh import prototype_banks
from ..utils.io import atomic_write_json, atomic_write_text
from .batches import seeded_training_batches


def _time_steps(step, batches, warmup: int) -> List[float]:
    times = []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        step(batch)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def _train_step(model, optimizer):
    def step(batch):
        losses = model(batch)
        optimizer.zero_grad()
        sum(losses.values()).backward()
        optimizer.step()
    return step


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


def _time_teacher_and_heads(model: torch.nn.Module, batches: List, warmup: int
                            ) -> Tuple[List[float], List[float]]:
    """Per batch (one in memory at a time): the student's taps, untimed; then timed, the
    teachers' no-grad forward on them and the distillation heads' losses + backward on them."""
    teacher_times, head_times = [], []
    for i, batch in enumerate(batches):
        with torch.no_grad():
            _, taps = model.student_losses_and_taps(batch)
            start = time.perf_counter()
            outputs = model.teacher_outputs(taps)
            teacher_time = time.perf_counter() - start
        taps = replace(taps, **{name: _as_leaves(getattr(taps, name)) for name in
                                ("features", "dense_predictions", "rpn_predictions",
                                 "roi_predictions")})
        start = time.perf_counter()
        sum(model.head_losses(taps, outputs).values()).backward()
        head_time = time.perf_counter() - start
        model.zero_grad(set_to_none=True)
        if i >= warmup:
            teacher_times.append(teacher_time)
            head_times.append(head_time)
    return teacher_times, head_times


def _fill_prototype_banks(model: torch.nn.Module) -> None:
    """Random valid prototypes in every bank: a step then costs what it costs after a refresh
    (the refresh itself is a trainer hook, measured separately in training runs)."""
    for bank in prototype_banks(model):
        for level in range(len(bank.levels)):
            for cls in range(bank.num_classes):
                bank.set_prototypes(level, cls, torch.randn(bank.teacher.shape[2:]),
                                    torch.randn(bank.student.shape[2:]))


def measure(config_file: str, mode: str, iters: int, warmup: int, opts: Sequence[str]) -> Dict:
    """One process's measurement (``mode``: "student" or "distill")."""
    cfg = load_config(config_file, opts)
    batches = seeded_training_batches(cfg, iters + warmup)
    result = {}
    with EventStorage():
        if mode == "student":
            model = build_model(student_config(cfg))
            model.train()
            times = _time_steps(_train_step(model, build_optimizer(cfg, model)), batches, warmup)
            result["t_student"] = statistics.median(times)
        else:
            model = build_model(cfg)
            model.train()
            _fill_prototype_banks(model)
            teacher_times, head_times = _time_teacher_and_heads(model, batches, warmup)
            result["t_teacher_forward"] = statistics.median(teacher_times)
            result["t_heads"] = statistics.median(head_times)
            times = _time_steps(_train_step(model, build_optimizer(cfg, model)), batches, warmup)
            result["t_distill"] = statistics.median(times)
    result[f"peak_rss_{mode}_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def _random_teacher_weights(cfg_file: str, opts: Sequence[str], directory: str) -> List[str]:
    """Untrained checkpoints matching the teachers (step times do not depend on weights)."""
    cfg = load_config(cfg_file, opts)
    paths = []
    for i, teacher_config in enumerate(cfg.DISTILL.TEACHER.CONFIGS):
        teacher_cfg = load_config(teacher_config, ["MODEL.WEIGHTS", ""])
        DetectionCheckpointer(build_model(teacher_cfg), save_dir=directory).save(f"teacher{i}")
        paths.append(os.path.join(directory, f"teacher{i}.pth"))
    return paths


def run_overhead_benchmark(config_file: str, json_path: str, iters: int = 20, warmup: int = 3,
                           opts: Sequence[str] = (), random_teacher: bool = False) -> Dict:
    opts = list(opts)
    with tempfile.TemporaryDirectory() as tmp:
        if random_teacher:
            weights = _random_teacher_weights(config_file, opts, tmp)
            opts += ["DISTILL.TEACHER.WEIGHTS", repr(weights)]
        result = {"config": config_file, "iters": iters, "warmup": warmup, "opts": opts,
                  "random_teacher": random_teacher, "threads": torch.get_num_threads()}
        for mode in ("student", "distill"):
            out = os.path.join(tmp, f"{mode}.json")
            cmd = [sys.executable, "-m", "d2kd.benchmark.overhead", mode, config_file,
                   str(iters), str(warmup), json.dumps(opts), out]
            subprocess.run(cmd, check=True, capture_output=True, text=True)
            with open(out) as f:
                result.update(json.load(f))
    base = result["t_student"] + result["t_teacher_forward"]
    result["ratio"] = result["t_distill"] / base
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
             round(r["ratio"], 2), round(r["ratio_without_heads"], 2),
             round(r["peak_rss_student_mb"]), round(r["peak_rss_distill_mb"]), r["threads"]]
            for r in results]
    headers = ["config", "t_student s", "t_teacher_fwd s", "t_heads s", "t_distill s", "ratio",
               "ratio without heads", "peak RSS student MB", "peak RSS distill MB", "threads"]
    atomic_write_json(json_path, {"runs": results})
    atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    return results


if __name__ == "__main__":  # one measuring process: MODE CONFIG ITERS WARMUP OPTS_JSON OUT_JSON
    import d2kd  # noqa: F401  (registrations in the measuring process)

    mode, config, n, w, extra, out_path = sys.argv[1:7]
    atomic_write_json(out_path, measure(config, mode, int(n), int(w), json.loads(extra)))
