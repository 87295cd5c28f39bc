"""Uncertainty of learning curves: where a curve first crosses a target, and its bootstrap interval.

A learning curve here is a run's evaluations on one fixed set of N (prompt, seed) pairs at P
points of training: per-sample values ``values`` [P, N] at cost ``x`` [P] (reward queries,
seconds). Because every point scores the same N pairs, resampling the pairs (the same
resample at every point) keeps the pairing: the interval says how far the crossing would move
with another evaluation set of the same size, the whole curve moving together.

    q = crossing(x, values.mean(1), target)               # linear interpolation, None if never
    lo, hi = crossing_interval(x, values, target, rng)    # 95 % bootstrap interval over the N pairs
    r, (lo, hi) = ratio_of_medians(a, b, rng)             # median(a) / median(b), bootstrap over seeds
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def crossing(x: Sequence[float], y: Sequence[float], target: float) -> float | None:
    """The first x at which the curve (x_i, y_i) reaches ``target``, interpolated linearly
    between the last point below it and the first at or above it; None when it never does.

    Worked example: x = (0, 40, 80), y = (-0.76, -0.72, -0.68), target -0.70 -> 60.
    """
    for i, (xi, yi) in enumerate(zip(x, y)):
        if yi >= target:
            if i == 0:
                return float(xi)
            x0, y0 = x[i - 1], y[i - 1]
            return float(x0 + (target - y0) * (xi - x0) / (yi - y0))
    return None


def paired_se(values: np.ndarray) -> np.ndarray:
    """Standard error of each point's change from the first point [P] (paired over the N
    samples): std over samples of values[p] - values[0], divided by sqrt(N)."""
    diff = values - values[:1]
    n = values.shape[1]
    return diff.std(axis=1, ddof=1) / math.sqrt(n) if n > 1 else np.zeros(len(values))


def crossing_interval(x: Sequence[float], values: np.ndarray, target: float, rng: np.random.Generator,
                      draws: int = 1000, level: float = 0.95) -> tuple[float, float, float]:
    """(low, high, share reached) of the crossing over ``draws`` bootstrap resamples of the N
    evaluation pairs [P, N]; a resample that never reaches the target counts as +inf, so the
    high end is inf when more than (1 - level) / 2 of them miss."""
    n = values.shape[1]
    got = np.empty(draws)
    for b in range(draws):
        idx = rng.integers(0, n, n)
        c = crossing(x, values[:, idx].mean(1), target)
        got[b] = math.inf if c is None else c
    tail = (1 - level) / 2
    return _quantile(got, tail), _quantile(got, 1 - tail), float(np.isfinite(got).mean())


def ratio_of_medians(a: Sequence[float], b: Sequence[float], rng: np.random.Generator, draws: int = 2000,
                     level: float = 0.95) -> tuple[float, tuple[float, float]]:
    """median(a) / median(b) and its bootstrap interval, resampling the seeds of each side.

    Values may be inf (a run that never reached the target): the ratio is then inf or 0, and
    so may be the interval's ends.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    est = _safe_ratio(np.median(a), np.median(b))
    got = np.array([_safe_ratio(np.median(rng.choice(a, len(a))), np.median(rng.choice(b, len(b)))) for _ in range(draws)])
    tail = (1 - level) / 2
    return est, (_quantile(got, tail), _quantile(got, 1 - tail))


def _quantile(values: np.ndarray, q: float) -> float:
    """The q-quantile as one of the values (no interpolation, so inf stays inf, never nan)."""
    return float(np.quantile(values, q, method="inverted_cdf"))


def _safe_ratio(num: float, den: float) -> float:
    if math.isinf(num) and math.isinf(den):
        return math.nan
    if math.isinf(den):
        return 0.0
    return math.inf if math.isinf(num) else float(num / den)
