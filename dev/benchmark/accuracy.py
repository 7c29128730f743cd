"""Accuracy benchmark: box AP of configs over seeds, each run a ``tools/train_net.py`` process.

Finished runs (``OUTPUT_DIR/benchmark_run.json`` present) are reused, so re-running the
same command after a kill continues where it stopped; a finished run whose saved config no
longer matches its config file and overrides (the file was edited since) is an error, not a
silently reused result. Results are rewritten atomically after every run.
"""
import argparse
import json
import logging
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from tabulate import tabulate

from d2kd.apps.certify.provenance import record_start, run_provenance
from d2kd.apps.launch.process import run_options, run_train_net
from d2kd.config import ConfigError, load_config
from d2kd.config.saved import config_mismatches
from d2kd.utils.io import atomic_write_json, atomic_write_text

from .accuracy_plot import plot_accuracy

logger = logging.getLogger(__name__)

METRICS = ("AP", "AP50", "APs", "APm", "APl")


def _run_name(config_file: str) -> str:
    return os.path.splitext(os.path.basename(config_file))[0]


def _run_dir(output: str, name: str, seed: int) -> str:
    return os.path.join(output, name, f"seed{seed}")


def load_finished_run(config_file: str, seed: int, output_dir: str,
                      opts: Sequence[str]) -> Optional[Dict]:
    """The record of a finished run of ``config_file`` + ``opts`` at ``seed``, or None.

    Raises:
        ConfigError: the run was trained with other settings than the config gives now.
    """
    record_file = os.path.join(output_dir, "benchmark_run.json")
    if not os.path.isfile(record_file):
        return None
    stale = config_mismatches(output_dir, config_file, [*opts, "SEED", str(seed)])
    if stale:
        raise ConfigError(
            f"The finished run {output_dir} was trained with other settings than {config_file} "
            f"{' '.join(opts)} gives now: {'; '.join(stale)}. Move the run away (or benchmark "
            f"the changed config under another --tag / --output) so that its result is not "
            f"reported for the changed config.")
    with open(record_file) as f:
        return json.load(f)


def train_and_evaluate(config_file: str, seed: int, output_dir: str, opts: Sequence[str],
                       threads: int = 0) -> Dict:
    """Train (resuming an interrupted run) and evaluate; record the results, the wall time
    (training + evaluation) and what they depend on
    (:func:`d2kd.apps.certify.provenance.provenance`) in ``benchmark_run.json``."""
    run_opts = [*run_options(config_file, seed, output_dir), *opts]
    recorded = not config_file.endswith(".py")  # a LazyConfig recipe: no yacs config to read
    if recorded:
        record_start(load_config(config_file, run_opts), output_dir, threads)
    seconds = run_train_net(config_file, ["--resume", *run_opts], threads=threads)
    with open(os.path.join(output_dir, "inference", "results.json")) as f:
        results = json.load(f)
    depends_on = run_provenance(output_dir) if recorded else None
    record = {"config": config_file, "seed": seed, "opts": list(opts), "results": results,
              "wall_seconds": round(seconds, 1), "provenance": depends_on}
    atomic_write_json(os.path.join(output_dir, "benchmark_run.json"), record)
    return record


def prototype_refresh_seconds(output_dir: str) -> Optional[float]:
    """Total seconds a run spent rebuilding prototype banks (``prototypes/total_seconds`` in
    its metrics.json, written by PrototypeRefreshHook), or None for runs without a bank."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        totals = [r["prototypes/total_seconds"] for r in map(json.loads, f)
                  if "prototypes/total_seconds" in r]
    return max(totals) if totals else None


def box_aps_by_row(runs: List[Dict]) -> Dict[str, List[float]]:
    """Each run name's box AP per seed, names in the order of the runs (as in :func:`summarize`)."""
    aps: Dict[str, List[float]] = {}
    for run in runs:
        aps.setdefault(run["name"], []).append(run["results"]["bbox"]["AP"])
    return aps


def summarize(runs: List[Dict]) -> List[Dict]:
    """Mean and spread (max - min) of each metric per run name (config, or config@tag)."""
    summary = []
    for name in dict.fromkeys(r["name"] for r in runs):
        mine = [r for r in runs if r["name"] == name]
        row = {"name": name, "config": mine[0]["config"], "opts": mine[0]["opts"],
               "seeds": [r["seed"] for r in mine],
               "wall_seconds_mean": round(statistics.mean(r["wall_seconds"] for r in mine), 1)}
        refresh = [r["prototype_refresh_seconds"] / r["wall_seconds"] for r in mine
                   if r.get("prototype_refresh_seconds") is not None]
        if refresh:
            row["prototype_refresh_fraction"] = round(statistics.mean(refresh), 4)
        for task in mine[0]["results"]:
            for metric in METRICS:
                values = [r["results"][task][metric] for r in mine]
                row[f"{task}/{metric}"] = round(statistics.mean(values), 2)
                row[f"{task}/{metric}_spread"] = round(max(values) - min(values), 2)
        summary.append(row)
    return summary


def markdown_table(summary: List[Dict]) -> str:
    headers = ["config", "seeds", "box AP (mean)", "spread", "AP50", "APs", "APm", "APl",
               "wall s/run"]
    rows = [[s["name"], len(s["seeds"]), s["bbox/AP"], s["bbox/AP_spread"],
             s["bbox/AP50"], s["bbox/APs"], s["bbox/APm"], s["bbox/APl"],
             s["wall_seconds_mean"]] for s in summary]
    if any("prototype_refresh_fraction" in s for s in summary):
        headers.append("prototype refresh % of wall")
        for row, s in zip(rows, summary):
            fraction = s.get("prototype_refresh_fraction")
            row.append("-" if fraction is None else round(100 * fraction, 1))
    return tabulate(rows, headers=headers, tablefmt="github") + "\n"


def run_accuracy_benchmark(configs: Sequence[str], seeds: Sequence[int], output: str,
                           json_path: str, markdown_path: str, opts: Sequence[str] = (),
                           threads: int = 0, tag: str = "",
                           finished_only: bool = False, plot_path: str = "",
                           references: Sequence[Tuple[str, float]] = ()) -> List[Dict]:
    """``tag`` names a variant (e.g. an ablation's overrides): runs go to
    ``output/<config name>@<tag>/seed<k>`` and the table rows read ``<config name>@<tag>``.
    ``finished_only`` tabulates the finished runs and trains nothing (while a queue runs).
    ``plot_path``: also a PNG chart of the table (written at the end), with a dashed line per
    ``(label, AP)`` of ``references`` (e.g. the teacher's AP)."""
    planned = [(config, seed, f"{_run_name(config)}@{tag}" if tag else _run_name(config))
               for config in configs for seed in seeds]
    # every finished run is checked against its config before anything trains
    finished = {(config, seed): load_finished_run(config, seed, _run_dir(output, name, seed), opts)
                for config, seed, name in planned}
    runs, summary = [], []
    for config, seed, name in planned:
        out = _run_dir(output, name, seed)
        record = finished[config, seed]
        if record is None:
            if finished_only:
                continue
            record = train_and_evaluate(config, seed, out, opts, threads)
        runs.append(dict(record, name=name,
                         prototype_refresh_seconds=prototype_refresh_seconds(out)))
        summary = summarize(runs)
        atomic_write_json(json_path, {"opts": list(opts), "runs": runs, "summary": summary})
        atomic_write_text(markdown_path, markdown_table(summary))
    logger.info("\n%s", markdown_table(summary))
    if plot_path and summary:
        plot_accuracy(summary, box_aps_by_row(runs), plot_path, references)
    return summary


def describe_run(output_dir: str) -> Dict:
    """Config essentials, AP and measured step time of a finished ``train_net`` run."""
    from detectron2.config import CfgNode

    with open(os.path.join(output_dir, "config.yaml")) as f:
        cfg = CfgNode.load_cfg(f)
    with open(os.path.join(output_dir, "metrics.json")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "time" in r]
    results = {}
    final_eval = [r for r in records if "bbox/AP" in r]
    if final_eval:
        results["bbox"] = {k.split("/", 1)[1]: v for k, v in final_eval[-1].items()
                           if k.startswith("bbox/")}
    return {
        "run": os.path.basename(os.path.normpath(output_dir)),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "depth": cfg.MODEL.RESNETS.DEPTH,
        "res2_channels": cfg.MODEL.RESNETS.RES2_OUT_CHANNELS,
        "fpn_channels": cfg.MODEL.FPN.OUT_CHANNELS,
        "weights": cfg.MODEL.WEIGHTS,
        "optimizer": cfg.SOLVER.get("OPTIMIZER", "SGD"),
        "base_lr": cfg.SOLVER.BASE_LR,
        "max_iter": cfg.SOLVER.MAX_ITER,
        "ims_per_batch": cfg.SOLVER.IMS_PER_BATCH,
        "min_size_train": list(cfg.INPUT.MIN_SIZE_TRAIN),
        "seed": cfg.SEED,
        "median_step_seconds": round(statistics.median(r["time"] for r in train), 3),
        "results": results,
    }


def _weights_label(path: str) -> str:
    """Short name of an initialisation: '-' (random), a pre-trained name, or parent/file."""
    if not path:
        return "-"
    if "://" in path:
        return path.split("://", 1)[1]
    return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))


def collect_runs(output_dirs: Sequence[str], json_path: str, markdown_path: str) -> List[Dict]:
    runs = [describe_run(d) for d in output_dirs]
    headers = ["run", "arch", "R", "res2", "FPN", "weights", "opt", "lr", "iters", "s/step",
               "box AP", "AP50", "APs", "APm", "APl"]
    rows = []
    for r in runs:
        box = r["results"].get("bbox", {})
        rows.append([r["run"], r["meta_architecture"], r["depth"], r["res2_channels"],
                     r["fpn_channels"], _weights_label(r["weights"]), r["optimizer"],
                     r["base_lr"], r["max_iter"], r["median_step_seconds"],
                     *[round(box[m], 1) if m in box else "-" for m in METRICS]])
    atomic_write_json(json_path, {"runs": runs})
    atomic_write_text(markdown_path, tabulate(rows, headers=headers, tablefmt="github") + "\n")
    return runs


def _reference(text: str) -> Tuple[str, float]:
    """``LABEL=AP`` of ``--reference`` as (label, AP)."""
    label, _, ap = text.rpartition("=")
    try:
        if label:
            return label, float(ap)
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=AP (e.g. 'R-50/2 teacher=42.92')")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py accuracy`` and ``collect``."""
    acc = subparsers.add_parser("accuracy", help="train + evaluate configs over seeds")
    acc.add_argument("--configs", nargs="+", required=True)
    acc.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    acc.add_argument("--output", required=True, help="parent of the runs' OUTPUT_DIRs")
    acc.add_argument("--json", required=True)
    acc.add_argument("--markdown", required=True)
    acc.add_argument("--threads", type=int, default=0, help="torch threads per run (0: default)")
    acc.add_argument("--tag", default="", help="variant name for runs with overrides (ablations)")
    acc.add_argument("--finished-only", action="store_true",
                     help="tabulate finished runs only; train nothing")
    acc.add_argument("--plot", default="", help="also write the table as a PNG chart")
    acc.add_argument("--reference", type=_reference, action="append", default=[],
                     metavar="LABEL=AP", help="a dashed line on the chart at that box AP, e.g. "
                     "'R-50/2 teacher=42.92'; repeatable")
    acc.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    acc.set_defaults(run=_run_accuracy)
    col = subparsers.add_parser("collect", help="summarise finished tools/train_net.py runs")
    col.add_argument("--runs", nargs="+", required=True, help="OUTPUT_DIRs of finished runs")
    col.add_argument("--json", required=True)
    col.add_argument("--markdown", required=True)
    col.set_defaults(run=lambda args: collect_runs(args.runs, args.json, args.markdown))


def _run_accuracy(args: argparse.Namespace) -> None:
    run_accuracy_benchmark(args.configs, args.seeds, args.output, args.json, args.markdown,
                           args.opts, threads=args.threads, tag=args.tag,
                           finished_only=args.finished_only, plot_path=args.plot,
                           references=args.reference)
