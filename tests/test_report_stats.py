"""Learning-curve statistics: the interpolated crossing of a target and its bootstrap intervals."""

from __future__ import annotations

import math

import numpy as np
import pytest

from rewardiff.report.stats import crossing, crossing_interval, paired_se, ratio_of_medians


def test_crossing_interpolates_between_the_points_around_the_target():
    assert crossing([0, 40, 80], [-0.76, -0.72, -0.68], -0.70) == pytest.approx(60.0)  # halfway from -0.72 to -0.68
    assert crossing([0, 40, 80], [-0.70, -0.72, -0.68], -0.70) == 0.0  # already there
    assert crossing([0, 40, 80], [-0.76, -0.75, -0.71], -0.70) is None
    # the first crossing counts, not a later one after a dip
    assert crossing([0, 10, 20, 30], [0.0, 1.0, 0.0, 1.0], 0.5) == pytest.approx(5.0)


def test_a_broken_crossing_that_takes_the_last_point_or_ignores_the_slope_is_caught():
    x, y = [0, 40, 80], [-0.76, -0.72, -0.68]
    assert crossing(x, y, -0.70) not in (40.0, 80.0)  # neither the point before nor after


def test_paired_se_by_hand():
    v = np.array([[1.0, 2.0, 3.0], [2.0, 2.0, 5.0]])  # changes (1, 0, 2): std 1, N = 3
    np.testing.assert_allclose(paired_se(v), [0.0, 1.0 / math.sqrt(3)])


def test_crossing_interval_is_tight_for_a_clear_curve_and_open_for_one_that_barely_misses():
    rng = np.random.default_rng(0)
    n = 400
    base = rng.normal(0, 1, n)
    # each point shifts every sample by the same amount, plus a little noise of its own
    shifts = np.array([0.0, 0.5, 1.0, 1.5])  # the set's mean moves by about 1 / sqrt(400) = 0.05: 1 unit of x
    values = base[None] + shifts[:, None] + rng.normal(0, 0.05, (4, n))
    lo, hi, share = crossing_interval([0, 10, 20, 30], values, base.mean() + 0.75, rng, draws=300)
    assert share == 1.0 and 12.5 < lo < 15 < hi < 17.5
    lo, hi, share = crossing_interval([0, 10, 20, 30], values, values[-1].mean(), rng, draws=300)  # reached just at the end
    assert 0.2 < share < 0.8 and math.isinf(hi)


def test_ratio_of_medians_and_its_interval():
    rng = np.random.default_rng(1)
    est, (lo, hi) = ratio_of_medians([640, 960, 320, 800, 700], [400, 80, 640, 300, 350], rng)
    assert est == pytest.approx(700 / 350) and lo <= est <= hi
    est, (lo, hi) = ratio_of_medians([math.inf] * 3, [100, 200, 300], rng, draws=50)
    assert math.isinf(est) and math.isinf(lo)
