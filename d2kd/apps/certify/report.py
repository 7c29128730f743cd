"""The certificate: per-seed APs, the paired difference to the matched control with its 95 %
interval and verdict, and the same against the teacher (JSON, markdown, PNG)."""
import math
import statistics
from typing import Dict, List, Optional

from tabulate import tabulate

from ...utils.io import atomic_save_figure, atomic_write_json, atomic_write_text
from .runs import Arm
from .stats import one_sample_interval, paired_interval, welch_interval

GAIN = ("gain certified", "no measurable gain", "loss", "fewer than 2 seeds: no interval")
VS_TEACHER = ("above the teacher", "within the teacher's spread", "below the teacher",
              "fewer than 2 runs on a side: no interval")


def _summary(aps: Dict[int, float]) -> Dict:
    """Per-seed APs (None: the run made no detection, detectron2's NaN), their mean and
    spread."""
    values = [v for v in aps.values() if math.isfinite(v)]
    return {"aps": {str(k): v if math.isfinite(v) else None for k, v in aps.items()},
            "mean": statistics.fmean(values) if values else None,
            "spread": max(values) - min(values) if values else None}


def split_certificate(arms: List[Arm], split: str) -> Dict:
    """The comparisons on one split, from the runs finished so far; a run without detections
    (AP NaN) takes part in none."""
    by_name = {arm.name: {seed: ap for seed, ap in arm.aps.get(split, {}).items()
                          if math.isfinite(ap)} for arm in arms}
    control, distilled = by_name["control"], by_name["distilled"]
    seeds = sorted(set(control) & set(distilled))
    result: Dict = {"arms": {arm.name: _summary(arm.aps.get(split, {})) for arm in arms},
                    "paired_seeds": seeds}
    if seeds:
        gain = paired_interval([distilled[s] for s in seeds], [control[s] for s in seeds])
        result["vs_control"] = {**gain.as_dict(), "verdict": gain.verdict(*GAIN)}
    student = list(distilled.values())
    for name, aps in by_name.items():
        if not (name.startswith("teacher_") and aps and student):
            continue
        if name.endswith("_used"):
            (ap,) = aps.values()
            interval = one_sample_interval(student, ap)
        else:
            interval = welch_interval(student, list(aps.values()))
        result[f"vs_{name}"] = {**interval.as_dict(), "verdict": interval.verdict(*VS_TEACHER)}
    return result


def certificate(arms: List[Arm], splits: List[str], meta: Dict) -> Dict:
    return {**meta, "splits": {split: split_certificate(arms, split) for split in splits}}


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(cert: Dict) -> str:
    """One table of APs and one of comparisons per split."""
    parts = [f"# certify: {cert['config']}\n",
             f"Seeds {cert['seeds']}; confidence 95 %; overrides {cert['opts'] or 'none'}.\n"]
    for split, result in cert["splits"].items():
        rows = [[name, ", ".join(_fmt(v) for v in arm["aps"].values()) or "-",
                 _fmt(arm["mean"]), _fmt(arm["spread"])]
                for name, arm in result["arms"].items()]
        parts.append(f"\n## {split}\n\n" + tabulate(
            rows, headers=["arm", "AP per seed", "mean", "spread"], tablefmt="github") + "\n")
        comparisons = [[key[3:], c["method"], _fmt(c["difference"]),
                        f"[{_fmt(c['low'])}, {_fmt(c['high'])}]", c["verdict"]]
                       for key, c in result.items() if key.startswith("vs_")]
        if comparisons:
            parts.append("\n" + tabulate(
                comparisons, headers=["distilled vs", "interval", "difference", "95 % interval",
                                      "verdict"], tablefmt="github") + "\n")
    return "".join(parts)


def plot(cert: Dict, path: str) -> None:
    """Per split: each arm's per-seed APs (points) and mean (bar)."""
    from matplotlib.figure import Figure

    splits = list(cert["splits"])
    fig = Figure(figsize=(5 + 2 * len(splits), 4))
    for index, split in enumerate(splits):
        ax = fig.add_subplot(1, len(splits), index + 1)
        arms = cert["splits"][split]["arms"]
        for x, (name, arm) in enumerate(arms.items()):
            values = [v for v in arm["aps"].values() if v is not None]
            if values:
                ax.bar(x, arm["mean"], color="#c6dbef", width=0.6)
                ax.scatter([x] * len(values), values, color="#08519c", zorder=3, s=18)
        ax.set_xticks(range(len(arms)), list(arms), rotation=30, ha="right", fontsize=8)
        verdict = cert["splits"][split].get("vs_control", {}).get("verdict", "")
        ax.set_title(f"{split}\n{verdict}", fontsize=9)
        ax.set_ylabel("box AP")
    fig.tight_layout()
    atomic_save_figure(fig, path)


def write(cert: Dict, json_path: str, markdown_path: str, plot_path: str) -> None:
    atomic_write_json(json_path, cert)
    atomic_write_text(markdown_path, markdown(cert))
    if plot_path:
        plot(cert, plot_path)
