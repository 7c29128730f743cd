"""Proxy fidelity of the DetKDS search: does a proxy trial rank genomes the way their
full-schedule trainings do?

For every genome: one proxy trial exactly as the search runs it (:class:`ProxyEvaluator` on
the search config: its proxy datasets, budget and starting weights), and the full schedule of
the distillation config over seeds (``DISTILL.DETKDS.GENOME`` set, a run per seed through
:func:`run_accuracy_benchmark`, tagged with :func:`genome_tag`, so that a genome's runs are
found again whatever list it comes in: benchmarks over parts of a list run side by side and
a last one over the whole list collects them). Kendall's rank correlation (tau-b,
``scipy.stats.kendalltau``) between the proxy AP and the mean full-schedule AP, in JSON,
markdown and a scatter plot. Finished trials and runs are reused, so the benchmark resumes.
"""
import argparse
import functools
import json
import logging
import math
import os
import re
import statistics
from typing import Dict, List, Sequence

from matplotlib.figure import Figure
from scipy.stats import kendalltau
from tabulate import tabulate

from d2kd.apps.search.proxy import ProxyEvaluator
from d2kd.apps.search.report import full_schedule_by_seed, markdown_cell
from d2kd.utils.io import atomic_save_figure, atomic_write_json, atomic_write_text

from .accuracy import run_accuracy_benchmark

logger = logging.getLogger(__name__)


def proxy_ap(search_config: str, genome: str, output_dir: str, opts: Sequence[str] = (),
             threads: int = 1) -> float:
    """Box AP of one proxy trial of ``genome`` (reused from ``output_dir/outcome.json``)."""
    record = os.path.join(output_dir, "outcome.json")
    if os.path.isfile(record):
        with open(record) as f:
            return json.load(f)["ap"]
    outcome = ProxyEvaluator(search_config, list(opts), threads)(
        genome, output_dir, lambda iteration, ap: False)  # report: never prune
    atomic_write_json(record, {"genome": genome, "status": outcome.status, "ap": outcome.ap,
                               "seconds": outcome.seconds, "reason": outcome.reason})
    return outcome.ap


def genome_tag(genome: str) -> str:
    """A directory-safe name of ``genome``, e.g. ``global-natt-local_s2-softmax_HW-cos-w1``."""
    return re.sub(r"[^A-Za-z0-9_.]+", "-", genome.replace("=", "")).strip("-")


def upper_half(rows: List[Dict]) -> List[Dict]:
    """The rows at or above the median proxy AP of the finished ones: the part of the range a
    search picks its winner from."""
    usable = [r for r in rows if math.isfinite(r["proxy_ap"])]
    if not usable:
        return []
    median = statistics.median(r["proxy_ap"] for r in usable)
    return [r for r in usable if r["proxy_ap"] >= median]


def _kendall(rows: List[Dict]) -> Dict:
    if len(rows) < 2:
        return {"kendall_tau": None, "p_value": None, "genomes": len(rows)}
    tau, p_value = kendalltau([r["proxy_ap"] for r in rows], [r["full_ap"] for r in rows])
    return {"kendall_tau": round(float(tau), 4), "p_value": round(float(p_value), 4),
            "genomes": len(rows)}


def _tau_text(summary: Dict, prefix: str) -> str:
    """``summary``'s tau with ``prefix`` ("" or "upper_half_") in words."""
    genomes = summary[f"{prefix}genomes"]
    if summary[f"{prefix}kendall_tau"] is None:
        return f"none ({genomes} genome(s); a rank correlation needs 2 or more)"
    tau, p_value = summary[f"{prefix}kendall_tau"], summary[f"{prefix}p_value"]
    return f"{tau} (p = {p_value}, {genomes} genomes)"


def fidelity(rows: List[Dict]) -> Dict:
    """Kendall's tau-b (and its two-sided p-value) between ``proxy_ap`` and ``full_ap`` of
    the rows whose proxy trial finished (a rejected candidate has AP -inf), and the same over
    :func:`upper_half` (``upper_half_*``)."""
    upper = _kendall(upper_half(rows))
    return {**_kendall([r for r in rows if math.isfinite(r["proxy_ap"])]),
            **{f"upper_half_{key}": value for key, value in upper.items()}}


def plot_fidelity(rows: List[Dict], summary: Dict, path: str) -> None:
    """Full-schedule AP (mean, with the seeds' range) against proxy AP, one point per genome:
    every genome, and beside it :func:`upper_half`, which one bad candidate would otherwise
    squeeze together."""
    upper = {id(r) for r in upper_half(rows)}
    fig = Figure(figsize=(10, 4.2))
    panels = fig.subplots(1, 2)
    for ax, in_panel, title in (
            (panels[0], lambda r: math.isfinite(r["proxy_ap"]),
             f"all genomes: Kendall tau = {summary['kendall_tau']}"),
            (panels[1], lambda r: id(r) in upper,
             f"at or above the median proxy AP: tau = {summary['upper_half_kendall_tau']}")):
        for i, r in enumerate(rows):
            if not in_panel(r):
                continue
            low, high = min(r["full_aps"]), max(r["full_aps"])
            ax.errorbar(r["proxy_ap"], r["full_ap"], color=f"C{i % 10}",
                        yerr=[[r["full_ap"] - low], [high - r["full_ap"]]], fmt="o", capsize=3)
            ax.annotate(f"g{i}", (r["proxy_ap"], r["full_ap"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8)
        ax.set_xlabel("proxy box AP (held-out proxy validation images)")
        ax.set_ylabel("full-schedule box AP (mean over seeds)")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, path)


def proxy_trials_dir(output: str, proxy_opts: Sequence[str], proxy_variant: str) -> str:
    """Where the proxy trials go: ``output/proxy``, or ``output/proxy@<proxy_variant>`` for a
    variant of the proxy (``proxy_opts``, which therefore needs a name).

    Raises:
        ValueError: overrides without a variant name.
    """
    if proxy_opts and not proxy_variant:
        raise ValueError("proxy overrides make a variant of the proxy: name it (--proxy-variant "
                         "NAME), so that its trials are not mixed with the search config's.")
    return os.path.join(output, f"proxy@{proxy_variant}" if proxy_variant else "proxy")


def full_schedule(config_file: str, genome: str, seeds: Sequence[int], output: str,
                  threads: int) -> List[float]:
    """Box AP of ``config_file`` with ``genome`` at every seed (runs in ``output/full``, reused
    when finished)."""
    tag = genome_tag(genome)
    runs_dir = os.path.join(output, "full")
    run_accuracy_benchmark(
        [config_file], seeds, runs_dir, os.path.join(runs_dir, f"{tag}.json"),
        os.path.join(runs_dir, f"{tag}.md"), opts=["DISTILL.DETKDS.GENOME", genome],
        threads=threads, tag=tag)
    with open(os.path.join(runs_dir, f"{tag}.json")) as f:
        return [r["results"]["bbox"]["AP"] for r in json.load(f)["runs"]]


def run_proxy_fidelity_benchmark(search_config: str, config_file: str, genomes: Sequence[str],
                                 seeds: Sequence[int], output: str, json_path: str,
                                 markdown_path: str, plot_path: str = "",
                                 threads: int = 1, proxy_opts: Sequence[str] = (),
                                 proxy_variant: str = "",
                                 full_schedule_from: Sequence[str] = ()) -> Dict:
    """Proxy AP and full-schedule AP of every genome (see module docstring).

    ``proxy_opts`` (``KEY VALUE`` overrides of the search config) measure a variant of the
    proxy against the same full-schedule runs (:func:`proxy_trials_dir`).
    ``full_schedule_from``: JSON files of earlier proxy-fidelity benchmarks; a genome found
    there with an AP for every seed takes those APs instead of being trained again (its row
    says ``full_aps_reused``), so a variant of the proxy costs only its proxy trials, also on a
    machine that no longer has the runs.
    """
    known = full_schedule_by_seed(full_schedule_from)
    proxy_dir = proxy_trials_dir(output, proxy_opts, proxy_variant)
    rows = []
    for i, genome in enumerate(genomes):
        tag = genome_tag(genome)
        ap = proxy_ap(search_config, genome, os.path.join(proxy_dir, tag), proxy_opts, threads)
        by_seed = known.get(genome, {})
        reused = all(seed in by_seed for seed in seeds)
        full_aps = ([by_seed[seed] for seed in seeds] if reused
                    else full_schedule(config_file, genome, seeds, output, threads))
        rows.append({"genome": genome, "proxy_ap": ap, "full_ap": statistics.mean(full_aps),
                     "full_aps": full_aps, "seeds": list(seeds), "full_aps_reused": reused})
        logger.info("genome%d: proxy %.2f, full %.2f (%s)", i, ap, rows[-1]["full_ap"], genome)
    summary = fidelity(rows)
    atomic_write_json(json_path, {"search_config": search_config, "proxy_opts": list(proxy_opts),
                                  "config": config_file,
                                  "full_schedule_from": list(full_schedule_from), "rows": rows,
                                  **summary})
    table = tabulate([[f"g{i}", markdown_cell(r["genome"]), round(r["proxy_ap"], 2),
                       round(r["full_ap"], 2), round(max(r["full_aps"]) - min(r["full_aps"]), 2),
                       len(r["full_aps"])]
                      for i, r in enumerate(rows)],
                     headers=["", "genome", "proxy AP", "full AP (mean)", "spread", "seeds"],
                     tablefmt="github")
    atomic_write_text(markdown_path, f"{table}\n\nKendall tau-b: {_tau_text(summary, '')}; "
                                     "at or above the median proxy AP: "
                                     f"{_tau_text(summary, 'upper_half_')}\n")
    if plot_path:
        plot_fidelity(rows, summary, plot_path)
    return summary


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py proxy-fidelity``."""
    fid = subparsers.add_parser("proxy-fidelity",
                                help="DetKDS proxy AP vs full-schedule AP, Kendall tau")
    fid.add_argument("--search-config", required=True, help="the search config (its proxy)")
    fid.add_argument("--config-file", required=True, help="the full-schedule distillation config")
    fid.add_argument("--genomes", nargs="+", required=True)
    fid.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    fid.add_argument("--output", required=True, help="parent of the trials' and runs' folders")
    fid.add_argument("--json", required=True)
    fid.add_argument("--markdown", required=True)
    fid.add_argument("--plot", default="", help="also a scatter plot (PNG)")
    fid.add_argument("--threads", type=int, default=1, help="torch threads per trial / run")
    fid.add_argument("--proxy-variant", default="",
                     help="name of a proxy variant given by trailing KEY VALUE overrides")
    fid.add_argument("--full-schedule-from", action="append", default=[], metavar="JSON",
                     help="an earlier proxy-fidelity result (repeatable): its genomes' "
                          "full-schedule APs are reused instead of trained again")
    fid.add_argument("opts", nargs=argparse.REMAINDER,
                     help="KEY VALUE overrides of the search config's proxy (a variant)")
    fid.set_defaults(run=functools.partial(_run, fid))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The benchmark, after the checks that need nothing run (failures: ``parser``'s error)."""
    try:
        proxy_trials_dir(args.output, args.opts, args.proxy_variant)
    except ValueError as e:
        parser.error(str(e))
    missing = [p for p in args.full_schedule_from if not os.path.isfile(p)]
    if missing:
        parser.error(f"--full-schedule-from: no such file {missing[0]} (give the JSON a "
                     "proxy-fidelity benchmark wrote).")
    logger.info("%s", run_proxy_fidelity_benchmark(
        args.search_config, args.config_file, args.genomes, args.seeds, args.output, args.json,
        args.markdown, args.plot, args.threads, args.opts, args.proxy_variant,
        args.full_schedule_from))
