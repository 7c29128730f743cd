"""The interval arithmetic of ``certify`` (docs/certify.md).

- **Paired** (distilled vs its matched control, same seeds): the differences d_i of each seed,
  their mean, and Student's t interval d̄ ± t_{0.975, n-1} · s_d / √n.
- **Against the teacher's seeds** (independent runs): Welch's t interval for the difference
  of the two means, with the Welch–Satterthwaite degrees of freedom.
- **Against one teacher** (the weights the runs distilled from): the one-sample t interval of
  the student's mean minus that teacher's AP.

Verdicts read the 95 % interval: above 0 a gain (or "above"), below 0 a loss (or "below"),
else no measurable difference; with fewer than 2 values on a side there is no interval.
"""
import math
import statistics
from dataclasses import asdict, dataclass
from typing import Dict, Optional, Sequence

from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    """A difference of means with its confidence interval (None: not enough values)."""

    method: str
    difference: float
    low: Optional[float]
    high: Optional[float]
    dof: Optional[float]

    def verdict(self, above: str, within: str, below: str, too_few: str) -> str:
        if self.low is None:
            return too_few
        if self.low > 0:
            return above
        if self.high < 0:
            return below
        return within

    def as_dict(self) -> Dict:
        return asdict(self)


def _t(dof: float) -> float:
    return float(stats.t.ppf(0.5 + CONFIDENCE / 2, dof))


def paired_interval(treated: Sequence[float], control: Sequence[float]) -> Interval:
    """Paired t interval of mean(treated - control); ``treated[i]`` and ``control[i]`` share
    seed i."""
    if len(treated) != len(control) or not treated:
        raise ValueError(f"paired values need the same seeds, got {len(treated)} and "
                         f"{len(control)} values")
    diffs = [a - b for a, b in zip(treated, control)]
    mean = statistics.fmean(diffs)
    n = len(diffs)
    if n < 2:
        return Interval("paired t", mean, None, None, None)
    half = _t(n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return Interval("paired t", mean, mean - half, mean + half, n - 1)


def welch_interval(a: Sequence[float], b: Sequence[float]) -> Interval:
    """Welch's t interval of mean(a) - mean(b) for independent samples."""
    mean = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return Interval("Welch t", mean, None, None, None)
    va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
    if va + vb == 0:
        return Interval("Welch t", mean, mean, mean, math.inf)
    dof = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    half = _t(dof) * math.sqrt(va + vb)
    return Interval("Welch t", mean, mean - half, mean + half, dof)


def one_sample_interval(values: Sequence[float], reference: float) -> Interval:
    """t interval of mean(values) - reference."""
    mean = statistics.fmean(values) - reference
    if len(values) < 2:
        return Interval("one-sample t", mean, None, None, None)
    half = _t(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return Interval("one-sample t", mean, mean - half, mean + half, len(values) - 1)
