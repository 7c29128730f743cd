"""Looking at searches: best-so-far curves and the GA-vs-random comparison.

Reads only ``DIR/trials.csv`` and ``DIR/summary.json``, so searches run on other machines
compare as well.
"""
import csv
import json
import math
import os
import statistics
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure

from ...utils.io import atomic_save_figure

#: statuses of trials that count against the budget (a cached trial repeats an earlier AP)
BUDGET_STATUSES = ("ok", "cached", "pruned", "rejected")
#: how many of a search's best genomes :func:`breeding` looks at
TOP_GENOMES = 5


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


def breeding(rows: Sequence[Dict], top: int = TOP_GENOMES) -> Dict:
    """Did the GA's breeding find the good genomes? Over the candidate trials that finished
    with their full proxy budget (``ok``): the generation of the best one, the share of the
    ``top`` best distinct genomes that were bred (generation >= 1; generation 0 is the seed and
    random genomes; an enqueued seed genome has no recorded generation, which is 0 as for the
    sampler), and the trials, mean and best AP of each generation. A search without GA
    generations (the random arm) gives ``None`` and an empty table."""
    finished = [r for r in rows if r["study"] != "baseline" and r["status"] == "ok" and r["ap"]]
    if not any(r.get("generation") for r in finished):
        return {"winner_generation": None, "bred_share_top": None, "generations": {}}

    def generation(row: Dict) -> int:
        return int(row["generation"] or 0)

    best_first = sorted(finished, key=lambda r: -float(r["ap"]))
    best_of_genome = {}
    for r in best_first:
        best_of_genome.setdefault(r["genome"], r)
    distinct = list(best_of_genome.values())[:top]
    generations = {}
    for r in finished:
        generations.setdefault(generation(r), []).append(float(r["ap"]))
    return {"winner_generation": generation(best_first[0]),
            "bred_share_top": sum(generation(r) >= 1 for r in distinct) / len(distinct),
            "generations": {g: {"trials": len(aps), "mean_ap": statistics.mean(aps),
                                "best_ap": max(aps)} for g, aps in sorted(generations.items())}}


def plot_best_so_far(curves: Dict[str, List[float]], path: str,
                     baseline_ap: Optional[float] = None) -> None:
    """One line per search: best-so-far proxy AP vs trial number; the no-distillation
    baseline's AP as a dashed line when given."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    if baseline_ap is not None:
        ax.axhline(baseline_ap, color="gray", linestyle="--", label="no distillation")
    for label, curve in curves.items():
        ax.step(range(1, len(curve) + 1), [v if math.isfinite(v) else math.nan for v in curve],
                where="post", label=label)
    ax.set_xlabel("trial")
    ax.set_ylabel("best proxy box AP so far")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_save_figure(fig, path)


def session_overhead(sessions: Sequence[Dict]) -> Dict[str, Optional[float]]:
    """Overhead of the sessions (runs of the command) of a search together:
    1 - trial seconds / (workers x wall seconds), and the same without the workers' idle time
    at the end when every session recorded it. ``summary.json`` holds it per session."""
    slots = sum(s["wall_seconds"] * s["workers"] for s in sessions)
    busy = sum(s["trial_seconds"] for s in sessions)
    idle = [s.get("idle_at_end_seconds") for s in sessions]
    if not sessions or slots <= 0:
        return {"overhead": None, "overhead_without_idle_at_end": None}
    return {"overhead": 1 - busy / slots,
            "overhead_without_idle_at_end": (None if None in idle
                                             else 1 - (busy + sum(idle)) / slots)}


def full_schedule_by_seed(paths: Sequence[str]) -> Dict[str, Dict[int, float]]:
    """genome -> {seed: its full-schedule box AP}, from proxy-fidelity results
    (``tools/benchmark.py proxy-fidelity --json``; a later file adds to or replaces seeds of an
    earlier one)."""
    aps: Dict[str, Dict[int, float]] = {}
    for path in paths:
        with open(path) as f:
            for row in json.load(f)["rows"]:
                aps.setdefault(row["genome"], {}).update(zip(row["seeds"], row["full_aps"]))
    return aps


def full_schedule_aps(paths: Sequence[str]) -> Dict[str, List[float]]:
    """genome -> its full-schedule box APs (one per seed), from proxy-fidelity results."""
    return {genome: list(by_seed.values())
            for genome, by_seed in full_schedule_by_seed(paths).items()}


def compare(output_dirs: Sequence[str], plot_path: str,
            full_schedule: Optional[Dict[str, List[float]]] = None) -> Tuple[str, Dict]:
    """Plot the best-so-far curves of several searches; returns a markdown table of them and
    the same as a dict (per search, and per sampler: the mean best AP over its searches).
    ``full_schedule`` (genome -> full-schedule APs over seeds, :func:`full_schedule_aps`) adds
    each winner's full-schedule AP."""
    full_schedule = full_schedule or {}
    curves, searches = {}, []
    for directory in output_dirs:
        with open(os.path.join(directory, "summary.json")) as f:
            summary = json.load(f)
        rows = load_rows(directory)
        curve = best_so_far(rows)
        curves[f"{summary['arm']} ({os.path.basename(os.path.normpath(directory))})"] = curve
        searches.append({
            "directory": directory, "arm": summary["arm"],
            "sampler": summary["arm"].rsplit("-seed", 1)[0], "trials": len(curve),
            "best_ap": curve[-1] if curve and math.isfinite(curve[-1]) else None,
            "baseline_ap": summary.get("baseline_ap"), "best_genome": summary.get("best_genome"),
            "best_so_far": [v if math.isfinite(v) else None for v in curve],
            "winner_full_aps": full_schedule.get(summary.get("best_genome")),
            **session_overhead(summary.get("sessions", [])), **breeding(rows)})
    baselines = {s["baseline_ap"] for s in searches}
    plot_best_so_far(curves, plot_path, baselines.pop() if len(baselines) == 1 else None)
    by_sampler = {}
    for search in searches:
        by_sampler.setdefault(search["sampler"], []).append(search["best_ap"])
    samplers = {name: {"searches": len(aps), "best_ap": aps,
                       "best_ap_mean": (statistics.mean(aps) if None not in aps else None)}
                for name, aps in by_sampler.items()}
    for name, sampler in samplers.items():
        winners = [s["winner_full_aps"] for s in searches if s["sampler"] == name]
        sampler["winner_full_ap_mean"] = (statistics.mean(ap for aps in winners for ap in aps)
                                          if winners and None not in winners else None)
    return compare_markdown(searches, samplers), {"searches": searches, "samplers": samplers}


def compare_markdown(searches: Sequence[Dict], samplers: Dict[str, Dict]) -> str:
    """The two tables of :func:`compare`: one row per search, one per sampler."""
    def number(value, spec=".2f"):
        return "-" if value is None else format(value, spec)

    def seeds(aps):
        return "-" if aps is None else f"{statistics.mean(aps):.2f} ({', '.join(map(number, aps))})"

    lines = ["| search | arm | trials | best proxy AP | baseline AP | best genome | its full-"
             "schedule AP (seeds) | winner's generation | top-"
             f"{TOP_GENOMES} genomes bred | overhead (without idle at end) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {s['directory']} | {s['arm']} | {s['trials']} | {number(s['best_ap'])} | "
              f"{number(s['baseline_ap'])} | {markdown_cell(s['best_genome'])} | "
              f"{seeds(s['winner_full_aps'])} | "
              f"{number(s['winner_generation'], 'd')} | {number(s['bred_share_top'], '.0%')} | "
              f"{number(s['overhead'], '.1%')} ({number(s['overhead_without_idle_at_end'], '.1%')})"
              " |" for s in searches]
    lines += ["", "| sampler | searches | best proxy AP, mean | per search | winners' "
              "full-schedule AP, mean |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {v['searches']} | {number(v['best_ap_mean'])} | "
              f"{', '.join(number(ap) for ap in v['best_ap'])} | "
              f"{number(v['winner_full_ap_mean'])} |" for name, v in samplers.items()]
    bred = [s for s in searches if s["generations"]]
    if bred:
        lines += ["", "| search | generation | finished trials | mean proxy AP | best proxy AP |",
                  "|---|---|---|---|---|"]
        lines += [f"| {s['arm']} | {g} | {v['trials']} | {number(v['mean_ap'])} | "
                  f"{number(v['best_ap'])} |" for s in bred for g, v in s["generations"].items()]
    return "\n".join(lines) + "\n"
