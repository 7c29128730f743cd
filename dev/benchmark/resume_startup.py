"""Start-up cost of ``--resume`` against the iteration resumed at.

Two measurements per start iteration, each in a fresh process:

- **trainer**: a checkpoint of a DigitsDet run is written as if taken after iteration
  ``N - 1`` (the model, optimizer and scheduler state of a real run, with its iteration set to
  ``N - 1``); a new :class:`DistillTrainer` resumes it and runs one step. Reported: seconds from
  ``resume_or_load`` to the end of that first step, and how long positioning the data stream
  took (the ``ExactResumeHook``'s ``before_train``).
- **sampler**: positioning d2kd's training stream of a synthetic COCO-sized index (118,287
  records in two aspect-ratio groups, 16 images per step) at iteration ``N`` and drawing that
  batch.

For scale, the replay a resume used to do (loading every past batch again) is estimated as
``N`` times the measured time to load one batch.
"""
import argparse
import json
import sys
import tempfile
import time
from typing import Dict, List, Sequence

from detectron2.engine import HookBase

from d2kd.config import load_config
from d2kd.utils.io import atomic_write_json, atomic_write_text

from .fresh_process import measure_in_fresh_process, save_curves

COCO_TRAIN_IMAGES = 118287


class _FirstStepTimer(HookBase):
    def __init__(self):
        self.before_train_done = self.first_step_done = None

    def before_step(self):
        if self.before_train_done is None:
            self.before_train_done = time.perf_counter()

    def after_step(self):
        if self.first_step_done is None:
            self.first_step_done = time.perf_counter()


def _measure_trainer(config_file: str, start_iter: int, directory: str,
                     opts: Sequence[str]) -> Dict:
    from d2kd.data.step_loader import build_step_train_loader
    from d2kd.engine import DistillTrainer

    cfg = load_config(config_file, list(opts) + [
        "OUTPUT_DIR", directory, "SOLVER.MAX_ITER", str(start_iter + 1), "TEST.EVAL_PERIOD",
        "0", "MODEL.WEIGHTS", ""])
    trainer = DistillTrainer(cfg)
    trainer.iter = start_iter - 1  # the state a run has after step N - 1
    trainer.checkpointer.save(f"model_{start_iter - 1:07d}", iteration=start_iter - 1)
    del trainer

    began = time.perf_counter()
    trainer = DistillTrainer(cfg)
    timer = _FirstStepTimer()
    trainer.register_hooks([timer])
    trainer.resume_or_load(resume=True)
    resumed = time.perf_counter()
    trainer.train()
    loader = iter(build_step_train_loader(cfg))
    load_began = time.perf_counter()
    next(loader)
    batch_load = time.perf_counter() - load_began
    return {"start_iter": trainer.start_iter, "build_and_load_s": resumed - began,
            "to_first_step_s": timer.before_train_done - resumed,
            "first_step_s": timer.first_step_done - timer.before_train_done,
            "batch_load_s": batch_load, "replay_estimate_s": start_iter * batch_load}


def _measure_sampler(start_iter: int) -> Dict:
    from d2kd.data.step_sampler import StepBatchSampler

    groups = [i % 3 == 0 for i in range(COCO_TRAIN_IMAGES)]  # 1/3 portrait, as in COCO
    began = time.perf_counter()
    sampler = StepBatchSampler(groups, 16, 1, 0, seed=0)
    sampler.start_iter = start_iter
    next(iter(sampler))
    return {"sampler_position_s": time.perf_counter() - began}


def measure(config_file: str, start_iter: int, opts: Sequence[str]) -> Dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = _measure_trainer(config_file, start_iter, tmp, opts)
    result.update(_measure_sampler(start_iter))
    return result


def run_resume_startup_benchmark(config_file: str, start_iters: Sequence[int], json_path: str,
                                 markdown_path: str, plot_path: str = "",
                                 opts: Sequence[str] = ()) -> List[Dict]:
    """:func:`measure` for each start iteration in a fresh process; JSON, markdown, PNG."""
    from tabulate import tabulate

    results = [measure_in_fresh_process("resume_startup",
                                        [config_file, str(start), json.dumps(list(opts))])
               for start in start_iters]
    atomic_write_json(json_path, {"config": config_file, "runs": results})
    rows = [[r["start_iter"], round(r["build_and_load_s"], 2), round(r["to_first_step_s"], 3),
             round(r["first_step_s"], 2), round(r["sampler_position_s"], 3),
             round(r["replay_estimate_s"])] for r in results]
    headers = ["resumed at iteration", "build + load checkpoint s",
               "before_train (stream positioned) s", "first step s",
               "COCO-sized stream positioned s", "replaying past batches would take s"]
    atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    if plot_path:
        starts = [r["start_iter"] for r in results]
        save_curves(plot_path, starts, [
            ([r["build_and_load_s"] + r["to_first_step_s"] + r["first_step_s"] for r in results],
             "o-", "resume to end of first step (d2kd)"),
            ([r["replay_estimate_s"] for r in results], "s--",
             "replaying past batches (estimate)")],
            "iteration resumed at", "seconds", log_y=True)
    return results


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py resume-startup``."""
    rsm = subparsers.add_parser("resume-startup",
                                help="--resume start-up vs the iteration resumed at")
    rsm.add_argument("--config-file", required=True)
    rsm.add_argument("--iters", nargs="+", type=int, default=[10, 100000])
    rsm.add_argument("--json", required=True)
    rsm.add_argument("--markdown", required=True)
    rsm.add_argument("--plot", default="")
    rsm.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides")
    rsm.set_defaults(run=lambda args: run_resume_startup_benchmark(
        args.config_file, args.iters, args.json, args.markdown, args.plot, args.opts))


if __name__ == "__main__":  # one measuring process: CONFIG START_ITER OPTS_JSON OUT_JSON
    import d2kd  # noqa: F401  (registrations in the measuring process)

    config, start, extra, out_path = sys.argv[1:5]
    atomic_write_json(out_path, measure(config, int(start), json.loads(extra)))
