"""Does a comparison's ranking hold on a second dataset?

Two accuracy results (``tools/benchmark.py accuracy`` JSON) with the same rows, e.g. the
RetinaNet methods on DigitsDet and on DigitsDetHard (configs of the same file name in
``configs/DigitsDet/`` and ``configs/DigitsDetHard/``). Per row and dataset: mean box AP, its
rank, and its gain over a baseline row (the student without distillation). Between the two
datasets: Kendall's rank correlation (tau-b, ``scipy.stats.kendalltau``) of the rows' mean APs
(over all rows, and over a chosen subset, e.g. the distillation methods without the baseline
and rows of another budget, whose places are never in question), and every pair of rows
classified by its seeds: a pair is *separated* on a dataset when every seed of one row scores
above every seed of the other; it *holds* when it is separated on both datasets in the same
order, *flips* when separated on both in opposite orders, and is *unresolved* otherwise (the
seeds overlap on at least one dataset).
"""
import argparse
import functools
import itertools
import json
import os
from typing import Dict, List, Optional, Sequence, Tuple

from matplotlib.figure import Figure
from scipy.stats import kendalltau
from tabulate import tabulate

from d2kd.utils.io import atomic_save_figure, atomic_write_json, atomic_write_text

from .accuracy import box_aps_by_row


def pair_order(first: Sequence[float], second: Sequence[float]) -> int:
    """+1 when every AP of ``first`` is above every AP of ``second``, -1 when every one is
    below, 0 when they overlap (the order is within the seeds' spread)."""
    if min(first) > max(second):
        return 1
    if max(first) < min(second):
        return -1
    return 0


def load_results(inputs: Sequence[Tuple[str, str]]) -> List[Tuple[str, Dict]]:
    """``(label, path)`` pairs as ``(label, result)``; a missing or foreign file is a
    ``ValueError`` that names it."""
    loaded = []
    for label, path in inputs:
        if not os.path.isfile(path):
            raise ValueError(f"No such file {path} ({label}); give the JSON that "
                             "`tools/benchmark.py accuracy` wrote.")
        with open(path) as f:
            result = json.load(f)
        if not {"summary", "runs"} <= set(result):
            raise ValueError(f"{path} ({label}) is not an accuracy result (no 'summary' and "
                             "'runs'); give the JSON that `tools/benchmark.py accuracy` wrote.")
        loaded.append((label, result))
    return loaded


def _kendall(means: Dict[str, Dict[str, float]], labels: Sequence[str],
             names: Sequence[str]) -> Dict:
    """Kendall's tau-b (and its p-value) of the mean APs of ``names`` on the two datasets."""
    tau, p_value = kendalltau([means[labels[0]][n] for n in names],
                              [means[labels[1]][n] for n in names])
    return {"kendall_tau": round(float(tau), 4), "p_value": round(float(p_value), 4)}


def compare_rankings(results: Sequence[Tuple[str, Dict]], baseline: str,
                     methods: Sequence[str] = ()) -> Dict:
    """The two ``(label, accuracy result)`` compared row by row (rows matched by name, in the
    order of the first result); ``baseline`` is the row the gains are measured from;
    ``methods``: rows whose ranking among themselves is also reported (at least 3)."""
    if len(results) != 2:
        raise ValueError(f"Give exactly two results to compare, not {len(results)}.")
    (label_a, result_a), (label_b, result_b) = results
    aps_a, aps_b = box_aps_by_row(result_a["runs"]), box_aps_by_row(result_b["runs"])
    if set(aps_a) != set(aps_b):
        raise ValueError(f"The results have different rows: only in {label_a}: "
                         f"{sorted(set(aps_a) - set(aps_b))}, only in {label_b}: "
                         f"{sorted(set(aps_b) - set(aps_a))}; compare results of the same "
                         "configs.")
    if baseline not in aps_a:
        raise ValueError(f"--baseline {baseline!r} is not a row; rows: {list(aps_a)}.")
    unknown = [m for m in methods if m not in aps_a]
    if unknown or 0 < len(set(methods)) < 3:
        raise ValueError(f"--methods {list(methods)}: give at least 3 of the rows "
                         f"{list(aps_a)} (unknown: {unknown}).")
    names = list(aps_a)
    means = {label: {n: sum(aps[n]) / len(aps[n]) for n in names}
             for label, aps in ((label_a, aps_a), (label_b, aps_b))}
    ranks = {label: {n: rank for rank, n in enumerate(
        sorted(names, key=lambda n: -means[label][n]), start=1)} for label in means}
    rows = []
    for name in names:
        row: Dict = {"name": name}
        for label, aps in ((label_a, aps_a), (label_b, aps_b)):
            row[label] = {"AP": round(means[label][name], 2), "seeds": aps[name],
                          "gain": round(means[label][name] - means[label][baseline], 2),
                          "rank": ranks[label][name]}
        rows.append(row)
    pairs = []
    for first, second in itertools.combinations(names, 2):
        order_a = pair_order(aps_a[first], aps_a[second])
        order_b = pair_order(aps_b[first], aps_b[second])
        verdict = ("unresolved" if order_a == 0 or order_b == 0
                   else "holds" if order_a == order_b else "flips")
        pairs.append({"pair": [first, second], label_a: order_a, label_b: order_b,
                      "verdict": verdict})
    counts = {v: sum(p["verdict"] == v for p in pairs) for v in ("holds", "flips", "unresolved")}
    labels = (label_a, label_b)
    comparison = {"datasets": list(labels), "baseline": baseline, "rows": rows, "pairs": pairs,
                  **_kendall(means, labels, names), "pair_counts": counts}
    if methods:
        chosen = [n for n in names if n in set(methods)]
        comparison["methods"] = {"rows": chosen, **_kendall(means, labels, chosen)}
    return comparison


def markdown_report(comparison: Dict) -> str:
    """The rows with each dataset's AP (rank) and gain, tau and the pairs that do not hold."""
    a, b = comparison["datasets"]
    headers = ["row", f"{a} AP (rank)", f"{a} gain", f"{b} AP (rank)", f"{b} gain"]
    table = [[r["name"], f"{r[a]['AP']:.2f} ({r[a]['rank']})", f"{r[a]['gain']:+.2f}",
              f"{r[b]['AP']:.2f} ({r[b]['rank']})", f"{r[b]['gain']:+.2f}"]
             for r in comparison["rows"]]
    counts = comparison["pair_counts"]
    words = {1: "above", -1: "below", 0: "level with"}
    lines = [f"Mean box AP over seeds, its rank, and the gain over {comparison['baseline']}.", "",
             tabulate(table, headers, tablefmt="github", disable_numparse=True), "",
             f"Kendall tau of the mean APs: {comparison['kendall_tau']} "
             f"(p = {comparison['p_value']}, {len(table)} rows)."]
    if "methods" in comparison:
        methods = comparison["methods"]
        lines.append(f"Among {', '.join(methods['rows'])}: Kendall tau "
                     f"{methods['kendall_tau']} (p = {methods['p_value']}, "
                     f"{len(methods['rows'])} rows).")
    lines += ["",
             f"Pairs of rows ({len(comparison['pairs'])}): {counts['holds']} hold (every seed "
             f"in the same order on both), {counts['flips']} flip, {counts['unresolved']} "
             "within the seeds' spread on at least one dataset (level)."]
    for verdict in ("flips", "unresolved"):
        for p in comparison["pairs"]:
            if p["verdict"] == verdict:
                first, second = p["pair"]
                second_word = "level with it" if p[b] == 0 else words[p[b]]
                lines.append(f"- {verdict}: {first} is {words[p[a]]} {second} on {a}, "
                             f"{second_word} on {b}")
    return "\n".join(lines) + "\n"


def ranking_figure(comparison: Dict) -> Figure:
    """A slope chart: each row's gain over the baseline on the two datasets (mean as a line,
    each seed as a dot), so that crossing lines are rank changes."""
    a, b = comparison["datasets"]
    baseline = next(r for r in comparison["rows"] if r["name"] == comparison["baseline"])
    base = {label: sum(baseline[label]["seeds"]) / len(baseline[label]["seeds"])
            for label in (a, b)}
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for i, row in enumerate(comparison["rows"]):
        color = f"C{i}"
        ax.plot([0, 1], [row[a]["gain"], row[b]["gain"]], "-o", color=color, label=row["name"])
        for x, label in ((0, a), (1, b)):
            ax.plot([x] * len(row[label]["seeds"]),
                    [s - base[label] for s in row[label]["seeds"]], ".", color=color, alpha=0.5)
    ax.set_xticks([0, 1], [a, b])
    title = f"Kendall tau of the rows' mean AP: {comparison['kendall_tau']}"
    if "methods" in comparison:
        title += (f"\namong the {len(comparison['methods']['rows'])} methods: "
                  f"{comparison['methods']['kendall_tau']}")
    ax.set_title(title, fontsize=10)
    ax.set_xlim(-0.3, 1.3)
    ax.set_ylabel(f"box AP gain over {comparison['baseline']} (line: mean; dots: seeds)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def run_ranking_comparison(inputs: Sequence[Tuple[str, str]], baseline: str, json_path: str,
                           markdown_path: str, plot_path: Optional[str] = None,
                           methods: Sequence[str] = ()) -> Dict:
    """Compare the two accuracy results ``inputs`` (``(label, path)``); write JSON, markdown
    and (``plot_path``) the slope chart."""
    comparison = compare_rankings(load_results(inputs), baseline, methods)
    atomic_write_json(json_path, comparison)
    atomic_write_text(markdown_path, markdown_report(comparison))
    if plot_path:
        atomic_save_figure(ranking_figure(comparison), plot_path)
    return comparison


def _labelled_path(text: str) -> Tuple[str, str]:
    """``LABEL=PATH`` of ``ranking --inputs`` as (label, path)."""
    label, _, path = text.partition("=")
    if label and path:
        return label, path
    raise argparse.ArgumentTypeError(f"{text!r} is not LABEL=JSON (e.g. "
                                     "'DigitsDetHard=benchmarks/digitsdet_hard/headline.json')")


def add_command(subparsers: argparse._SubParsersAction) -> None:
    """``tools/benchmark.py ranking``."""
    rnk = subparsers.add_parser("ranking",
                                help="does a ranking hold on another dataset (two results)")
    rnk.add_argument("--inputs", nargs=2, type=_labelled_path, required=True,
                     metavar="LABEL=JSON", help="two accuracy results with the same rows")
    rnk.add_argument("--baseline", required=True, help="the row gains are measured from")
    rnk.add_argument("--json", required=True)
    rnk.add_argument("--markdown", required=True)
    rnk.add_argument("--plot", default="", help="also a slope chart of the gains (PNG)")
    rnk.add_argument("--methods", nargs="+", default=[],
                     help="rows whose ranking among themselves is also reported (Kendall tau), "
                          "e.g. the distillation methods without the baseline")
    rnk.set_defaults(run=functools.partial(_run, rnk))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The comparison; bad input is ``parser``'s error, found before anything is written."""
    try:
        run_ranking_comparison(args.inputs, args.baseline, args.json, args.markdown, args.plot,
                               args.methods)
    except ValueError as e:
        parser.error(str(e))
