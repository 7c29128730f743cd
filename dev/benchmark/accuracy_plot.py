"""The accuracy table as a chart: mean box AP per row, every seed's AP marked."""
import math
from typing import Dict, List, Sequence, Tuple

from matplotlib.figure import Figure

from d2kd.utils.io import atomic_save_figure


def accuracy_figure(summary: List[Dict], seed_aps: Dict[str, List[float]],
                    references: Sequence[Tuple[str, float]] = ()) -> Figure:
    """Horizontal bars of each row's mean box AP (``summary``), with each seed's AP as a dot
    (``seed_aps``: row name -> box AP per seed, ``accuracy.box_aps_by_row``) so that the
    spread is visible next to the differences; each ``(label, AP)`` of ``references`` (e.g. a
    teacher's AP) is a dashed vertical line."""
    names = [row["name"] for row in summary]
    means = [row["bbox/AP"] for row in summary]
    fig = Figure(figsize=(7, 0.45 * len(names) + 1.2))
    ax = fig.subplots()
    positions = range(len(names))
    ax.barh(positions, means, color="#8fb3d9")
    for position, name, mean in zip(positions, names, means):
        seeds = seed_aps[name]
        ax.plot(seeds, [position] * len(seeds), "k.", markersize=6)
        finite = [ap for ap in seeds + [mean] if math.isfinite(ap)]
        ax.text(max(finite, default=0.0) + 0.3, position, f"{mean:.2f}", va="center",
                fontsize=8)
    for i, (label, ap) in enumerate(references):
        ax.axvline(ap, color=f"C{i + 1}", linestyle="--", linewidth=1.2,
                   label=f"{label} ({ap:.2f})")
    if references:
        ax.legend(fontsize=8, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(references),
                  frameon=False)
    ax.set_yticks(list(positions), names, fontsize=8)
    ax.invert_yaxis()
    # the axis spans the finite APs: a run that detects nothing has AP NaN (COCOeval's), drawn
    # as no bar and no dot
    shown = [ap for ap in [ap for name in names for ap in seed_aps[name]] + means
             + [ap for _, ap in references] if math.isfinite(ap)]
    ax.set_xlim(max(0.0, min(shown, default=5.0) - 5.0), max(shown, default=97.0) + 3.0)
    ax.set_xlabel("box AP (bar: mean over seeds; dots: single seeds)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_accuracy(summary: List[Dict], seed_aps: Dict[str, List[float]], path: str,
                  references: Sequence[Tuple[str, float]] = ()) -> None:
    """:func:`accuracy_figure` written to ``path`` (PNG)."""
    atomic_save_figure(accuracy_figure(summary, seed_aps, references), path)
