"""certify's intervals against hand-computed cases (t quantiles from a printed t table)."""
import math

import pytest

from d2kd.apps.certify.stats import one_sample_interval, paired_interval, welch_interval


def test_paired_interval_by_hand():
    # differences 1, 2, 3: mean 2, sd 1, n 3; t(0.975, 2) = 4.303 (t table)
    interval = paired_interval([11.0, 22.0, 33.0], [10.0, 20.0, 30.0])
    assert interval.difference == pytest.approx(2.0)
    half = 4.303 * 1.0 / math.sqrt(3)  # 2.4843
    assert interval.low == pytest.approx(2.0 - half, abs=1e-3)
    assert interval.high == pytest.approx(2.0 + half, abs=1e-3)
    assert interval.dof == 2
    assert interval.verdict("gain", "none", "loss", "few") == "none"  # 2 +- 2.48 spans 0


def test_paired_interval_certifies_a_consistent_gain():
    # differences 0.9, 1.0, 1.1: mean 1, sd 0.1; half width 4.303 * 0.1 / sqrt(3) = 0.2484
    interval = paired_interval([10.9, 21.0, 31.1], [10.0, 20.0, 30.0])
    assert interval.low == pytest.approx(1.0 - 0.2484, abs=1e-3)
    assert interval.verdict("gain", "none", "loss", "few") == "gain"
    loss = paired_interval([10.0, 20.0, 30.0], [10.9, 21.0, 31.1])
    assert loss.verdict("gain", "none", "loss", "few") == "loss"


def test_one_seed_gives_no_interval():
    interval = paired_interval([11.0], [10.0])
    assert interval.low is None and interval.verdict("gain", "none", "loss", "few") == "few"
    with pytest.raises(ValueError, match="same seeds"):
        paired_interval([1.0, 2.0], [1.0])


def test_welch_interval_by_hand():
    # a = 10, 12, 14 and b = 8, 10, 12 (means 12 and 10, variances 4): se^2 = 4/3 + 4/3 = 8/3,
    # dof = (8/3)^2 / ((4/3)^2 / 2 + (4/3)^2 / 2) = 4; t(0.975, 4) = 2.776 (t table)
    interval = welch_interval([10.0, 12.0, 14.0], [8.0, 10.0, 12.0])
    assert interval.difference == pytest.approx(2.0)
    assert interval.dof == pytest.approx(4.0)
    half = 2.776 * math.sqrt(8 / 3)  # 4.533
    assert interval.low == pytest.approx(2.0 - half, abs=2e-3)
    assert interval.high == pytest.approx(2.0 + half, abs=2e-3)


def test_one_sample_interval_by_hand():
    # values 44, 45, 46 against 43: mean difference 2, sd 1, t(0.975, 2) = 4.303
    interval = one_sample_interval([44.0, 45.0, 46.0], 43.0)
    assert interval.difference == pytest.approx(2.0)
    assert interval.low == pytest.approx(2.0 - 4.303 / math.sqrt(3), abs=1e-3)
