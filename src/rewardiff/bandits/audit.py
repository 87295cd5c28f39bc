"""Empirical privacy audit of a released estimator: a lower bound on its epsilon.

On two neighbouring data sets D, D' (one record changed to the worst case within the bounds),
the mechanism is run many times on each (the noise draws are vectorised), the released vector
is projected onto the direction of the change of its exact statistics, and a threshold test
"t > tau means D'" is scored. Any (eps, delta)-DP mechanism has TPR <= e^eps FPR + delta for
every test, so eps >= log((TPR - delta) / FPR); with a Clopper-Pearson lower bound on TPR and
upper bound on FPR this holds with confidence 1 - alpha (Jagielski et al. 2020, NeurIPS, "Auditing
differentially private machine learning"; Nasr et al. 2021, IEEE S&P). The threshold is chosen
on one half of the draws and scored on the other, so the choice does not bias the bound. Both
directions of the test are tried (the DP inequality must hold both ways).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.stats import beta as beta_dist


@dataclass(frozen=True)
class AuditResult:
    """What the audit measured. ``epsilon_lower`` <= the true epsilon with confidence 1 - alpha."""

    epsilon_lower: float
    epsilon_claimed: float
    delta: float
    tpr: float  # empirical, on the scoring half
    fpr: float
    threshold: float
    n_draws: int  # per data set


def clopper_pearson(k: int, n: int, alpha: float) -> tuple[float, float]:
    """The two-sided (1 - alpha) Clopper-Pearson interval of a binomial proportion k / n."""
    lo = 0.0 if k == 0 else float(beta_dist.ppf(alpha / 2, k, n - k + 1))
    hi = 1.0 if k == n else float(beta_dist.ppf(1 - alpha / 2, k + 1, n - k))
    return lo, hi


def _best_threshold(t0: np.ndarray, t1: np.ndarray, delta: float, alpha: float) -> float:
    """The threshold whose Clopper-Pearson bound log((TPR_lo - delta) / FPR_hi) is largest on these draws."""
    taus = np.quantile(np.concatenate([t0, t1]), np.linspace(0.3, 0.9995, 300))
    s0, s1 = np.sort(t0), np.sort(t1)
    k0 = len(t0) - np.searchsorted(s0, taus, side="right")
    k1 = len(t1) - np.searchsorted(s1, taus, side="right")
    fpr_hi = np.where(k0 == len(t0), 1.0, beta_dist.ppf(1 - alpha / 2, k0 + 1, len(t0) - k0))
    tpr_lo = np.where(k1 == 0, 0.0, beta_dist.ppf(alpha / 2, np.maximum(k1, 1), len(t1) - k1 + 1))
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(tpr_lo > delta, np.log((tpr_lo - delta) / fpr_hi), -np.inf)
    return float(taus[int(np.argmax(score))])


def _score(t0: np.ndarray, t1: np.ndarray, tau: float, delta: float, alpha: float) -> tuple[float, float, float]:
    k0, k1 = int((t0 > tau).sum()), int((t1 > tau).sum())
    fpr_hi = clopper_pearson(k0, len(t0), alpha)[1]
    tpr_lo = clopper_pearson(k1, len(t1), alpha)[0]
    eps = math.log((tpr_lo - delta) / fpr_hi) if tpr_lo > delta else 0.0
    return max(eps, 0.0), k1 / len(t1), k0 / len(t0)


def epsilon_lower_bound(t0: np.ndarray, t1: np.ndarray, delta: float, alpha: float = 0.05):
    """The audited lower bound from 1-D statistics of outputs on D (``t0``) and D' (``t1``).

    Returns:
        (eps_lower, tpr, fpr, threshold) of the better of the two test directions.
    """
    h0, h1 = len(t0) // 2, len(t1) // 2
    best = (0.0, 0.0, 0.0, 0.0)
    for a, b in ((t0, t1), (-t1, -t0)):  # "t > tau means D'" and "t < tau means D"
        tau = _best_threshold(a[:h0], b[:h1], delta, alpha)
        eps, tpr, fpr = _score(a[h0:], b[h1:], tau, delta, alpha)
        if eps >= best[0]:
            best = (eps, tpr, fpr, tau)
    return best


def audit(estimator, z0: np.ndarray, y0: np.ndarray, z1: np.ndarray, y1: np.ndarray,
          n_draws: int = 40000, alpha: float = 0.05, seed: int = 0) -> AuditResult:
    """Audit ``estimator`` (``statistics``/``privatize``, e.g. a :class:`CovarianceEstimator`) on D, D'.

    The statistic is the projection of the released vector, divided coordinate-wise by the
    noise scale the estimator claims, onto the unit direction of the likewise whitened
    ``statistics(D') - statistics(D)``: for Gaussian noise this is the likelihood-ratio
    (most powerful) test. Any fixed projection gives a valid bound; the whitening only makes
    it the strongest one.
    """
    rng = np.random.default_rng(seed)
    n = len(z0)
    s0, s1 = estimator.statistics(z0, y0), estimator.statistics(z1, y1)
    scale = np.asarray(estimator.noise_std_vector(n), dtype=float)
    scale = np.where(scale > 0, scale, 1.0)
    u = (s1 - s0) / scale
    u = u / np.linalg.norm(u)
    t0 = (estimator.privatize(s0, n, rng, size=n_draws) / scale) @ u
    t1 = (estimator.privatize(s1, n, rng, size=n_draws) / scale) @ u
    eps, tpr, fpr, tau = epsilon_lower_bound(t0, t1, estimator.delta, alpha)
    return AuditResult(eps, estimator.epsilon, estimator.delta, tpr, fpr, tau, n_draws)


def worst_case_neighbours(estimator, landmarks: np.ndarray, n: int, kind: str = "reward", seed: int = 0):
    """Two data sets of ``n`` records that differ in one record, changed to the worst case.

    ``kind="reward"``: the last record (in the half that estimates b) sits on a landmark, where
    ||phi|| = 1, with reward +R in D and -R in D': the change of b_hat is the bound 2R / n2.
    ``kind="context"``: the first record (the covariance half) moves between the two landmarks
    whose features are closest to orthogonal, so ||phi phi^T - phi' phi'^T||_F ~ sqrt(2).
    The other records are drawn uniformly among the landmarks with random rewards in [-R, R].

    Returns:
        (z0, y0, z1, y1).
    """
    rng = np.random.default_rng(seed)
    r = estimator.reward_bound
    z0 = landmarks[rng.integers(len(landmarks), size=n)].copy()
    y0 = rng.uniform(-r, r, n)
    z1, y1 = z0.copy(), y0.copy()
    if kind == "reward":
        z0[-1] = z1[-1] = landmarks[0]
        y0[-1], y1[-1] = r, -r
    else:
        f = estimator.phi(landmarks)
        g = np.abs(f @ f.T)
        i, j = np.unravel_index(int(np.argmin(g)), g.shape)
        z0[0], z1[0] = landmarks[i], landmarks[j]
    return z0, y0, z1, y1
