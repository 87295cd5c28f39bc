"""Private reward estimators for kernel bandits, with their sensitivities in closed form.

Two estimators over a data-independent feature map phi: Z -> R^m with ||phi(z)|| <= kappa = 1
(Nystrom features on landmarks that do not depend on the data, :func:`nystrom_features`), and
rewards clipped to [-R, R]:

- :class:`CovarianceEstimator`, the low-sensitivity estimator of Pavlovic, Salgia & Zhao
  (AISTATS 2025, arXiv 2501.07046; follow-up arXiv 2507.13639): the second-moment operator
  Sigma = E[phi phi^T] and the cross moment b = E[phi y] are estimated privately, and
  f_hat = phi^T (Sigma_priv + lam I)^{-1} b_priv. Replacing one record moves Sigma_hat by at
  most sqrt(2) kappa^2 / n (Frobenius) and b_hat by 2 kappa R / n, a sensitivity of order 1/n
  that does not depend on the regularisation.
- :class:`RidgeOutputPerturbation`, the classical counterpart: kernel ridge regression in the
  same features, released by output perturbation (Chaudhuri, Monteleoni & Sarwate 2011, JMLR,
  Sec. 3-4). Its sensitivity 2 kappa R (kappa / sqrt(lam) + 1) / (n lam) grows as lam^{-3/2}.

Both add Gaussian noise calibrated by the analytic Gaussian mechanism (Balle & Wang 2018,
ICML, Theorem 8), which is exact: the mechanism is (eps, delta)-DP and, for any smaller noise,
it is not. ``noise_multiplier`` scales the calibrated noise (1 is correct; < 1 breaks privacy,
which :mod:`rewardiff.bandits.audit` detects).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from rewardiff.errors import UserError

FeatureMap = Callable[[np.ndarray], np.ndarray]


def _phi_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / math.sqrt(2.0))


def gaussian_delta(sigma: float, sensitivity: float, epsilon: float) -> float:
    """The exact delta of the Gaussian mechanism N(0, sigma^2 I) at ``epsilon``.

    Balle & Wang (2018), Theorem 8: delta = Phi(D/(2s) - eps s/D) - e^eps Phi(-D/(2s) - eps s/D)
    with D the L2 sensitivity and s = sigma.
    """
    a, b = sensitivity / (2.0 * sigma), epsilon * sigma / sensitivity
    return _phi_cdf(a - b) - math.exp(epsilon) * _phi_cdf(-a - b)


def gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """The smallest sigma with which the Gaussian mechanism of L2 ``sensitivity`` is (eps, delta)-DP.

    Found by bisection on :func:`gaussian_delta`, which decreases in sigma. Returns 0 for
    ``epsilon = inf`` (no privacy asked).
    """
    if math.isinf(epsilon):
        return 0.0
    if not (epsilon > 0 and 0 < delta < 1):
        raise UserError(f"privacy: need epsilon > 0 and 0 < delta < 1, got ({epsilon}, {delta})")
    lo, hi = 1e-6 * sensitivity, sensitivity
    while gaussian_delta(hi, sensitivity, epsilon) > delta:
        hi *= 2.0
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if gaussian_delta(mid, sensitivity, epsilon) <= delta else (mid, hi)
    return hi


def covariance_sensitivity(n1: int, n2: int, reward_bound: float, kappa: float = 1.0) -> tuple[float, float]:
    """L2 sensitivities (Sigma_hat, b_hat) under replacing one record, Sigma_hat over n1 records, b_hat over n2.

    Sigma_hat = (1/n1) sum phi_i phi_i^T: ||u u^T - v v^T||_F^2 = |u|^4 + |v|^4 - 2 (u.v)^2
    <= 2 kappa^4, so Delta_Sigma = sqrt(2) kappa^2 / n1 (it also bounds the released upper
    triangle, whose squared norm is at most the Frobenius one). b_hat = (1/n2) sum phi_i y_i with
    |y| <= R: Delta_b = 2 kappa R / n2.
    """
    return math.sqrt(2.0) * kappa**2 / n1, 2.0 * kappa * reward_bound / n2


def ridge_sensitivity(n: int, ridge: float, reward_bound: float, kappa: float = 1.0) -> float:
    """L2 sensitivity of theta_hat = argmin (1/n) sum (y_i - phi_i.theta)^2 + ridge |theta|^2.

    The objective is 2*ridge strongly convex, so two neighbours' minimisers differ by at most
    |grad g(theta')| / (2 ridge), g the change of one loss term divided by n (Chaudhuri et al.
    2011, Lemma 7). |theta| <= R / sqrt(ridge) (compare with theta = 0), so
    |grad g| <= (4 kappa / n)(kappa R / sqrt(ridge) + R) and
    Delta = 2 kappa R (kappa / sqrt(ridge) + 1) / (n ridge).
    """
    return 2.0 * kappa * reward_bound * (kappa / math.sqrt(ridge) + 1.0) / (n * ridge)


def upper(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the upper triangle (with the diagonal) of an m x m matrix."""
    return np.triu_indices(m)


@dataclass
class Release:
    """A released estimate: f_hat(z) = phi(z) . theta, and what it cost."""

    phi: FeatureMap
    theta: np.ndarray  # [m]
    epsilon: float
    delta: float

    def predict(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        flat = z.reshape(-1, z.shape[-1])
        return (self.phi(flat) @ self.theta).reshape(z.shape[:-1])


@dataclass
class _PrivateEstimator:
    """The settings every private estimator shares (see each estimator's Args)."""

    phi: FeatureMap
    m: int
    epsilon: float = 1.0
    delta: float = 1e-5
    reward_bound: float = 1.0
    rkhs_norm: float = 1.0
    ridge: float = 0.01
    noise_multiplier: float = 1.0


@dataclass
class CovarianceEstimator(_PrivateEstimator):
    """The low-sensitivity covariance-based estimator (Pavlovic, Salgia & Zhao 2025).

    Releases Sigma_hat = (1/n) sum phi_i phi_i^T (its upper triangle) and b_hat = (1/n) sum phi_i y_i
    with Gaussian noise sigma_S on Sigma_hat and sigma_b on b_hat, then solves
    theta = (PSD part of Sigma_priv + lam I)^{-1} b_priv. Replacing one record moves both; the
    pair, divided coordinate-wise by its noise, moves by at most
    sqrt((Delta_S / sigma_S)^2 + (Delta_b / sigma_b)^2), so the joint release is a single
    Gaussian mechanism of that whitened sensitivity. With sigma_S = c Delta_S / sqrt(share),
    sigma_b = c Delta_b / sqrt(1 - share) and c = ``gaussian_sigma(1, eps, delta)`` the whitened
    sensitivity is 1/c: exactly (eps, delta)-DP.

    Args:
        phi: Data-independent feature map with ||phi(z)|| <= 1, output [N, m].
        m: Feature dimension.
        epsilon, delta: The privacy target of the release (epsilon = inf: no noise).
        reward_bound: R; rewards are clipped to [-R, R].
        rkhs_norm: B, used by the regularisation rule.
        ridge: lam0; lam = max((lam0 + 1 + log m) / n, sigma_b sqrt(m) / B, 2 sigma_S sqrt(m)).
        noise_multiplier: Scale on the calibrated noise (1 = correct).
        share: The part of the (whitened) privacy budget given to Sigma_hat.
    """

    share: float = 0.5

    def sensitivity(self, n: int) -> tuple[float, float]:
        """(Delta_Sigma, Delta_b) = (sqrt(2) / n, 2 R / n), :func:`covariance_sensitivity`."""
        return covariance_sensitivity(n, n, self.reward_bound)

    def noise_scales(self, n: int) -> tuple[float, float]:
        """(sigma_Sigma, sigma_b)."""
        c = self.noise_multiplier * gaussian_sigma(1.0, self.epsilon, self.delta)
        d_s, d_b = self.sensitivity(n)
        return c * d_s / math.sqrt(self.share), c * d_b / math.sqrt(1.0 - self.share)

    def statistics(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        """The exact statistics as one vector: (upper triangle of Sigma_hat, b_hat), [m(m+1)/2 + m]."""
        f = self.phi(z)  # [n, m]
        y = np.clip(np.asarray(y, dtype=float), -self.reward_bound, self.reward_bound)
        return np.concatenate([(f.T @ f / len(z))[upper(self.m)], f.T @ y / len(z)])

    def noise_std_vector(self, n: int) -> np.ndarray:
        """Per-coordinate noise standard deviation of the released vector."""
        s_sigma, s_b = self.noise_scales(n)
        k = self.m * (self.m + 1) // 2
        return np.concatenate([np.full(k, s_sigma), np.full(self.m, s_b)])

    def privatize(self, stats: np.ndarray, n: int, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        """Draw the release: stats + Gaussian noise, [D] (or [size, D] draws at once)."""
        std = self.noise_std_vector(n)
        shape = std.shape if size is None else (size, len(std))
        return stats + std * rng.standard_normal(shape)

    def regulariser(self, n: int) -> float:
        s_sigma, s_b = self.noise_scales(n)
        root_m = math.sqrt(self.m)
        return max((self.ridge + 1.0 + math.log(self.m)) / n, s_b * root_m / self.rkhs_norm, 2.0 * s_sigma * root_m)

    def solve(self, released: np.ndarray, n: int) -> np.ndarray:
        """theta = (PSD part of Sigma_priv + lam I)^{-1} b_priv (post-processing of the release)."""
        m, k = self.m, self.m * (self.m + 1) // 2
        s = np.zeros((m, m))
        s[upper(m)] = released[:k]
        s = s + np.triu(s, 1).T
        evals, evecs = np.linalg.eigh(s)
        lam = self.regulariser(n)
        return evecs @ ((evecs.T @ released[k:]) / (np.maximum(evals, 0.0) + lam))

    def fit(self, z: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Release:
        n = len(z)
        theta = self.solve(self.privatize(self.statistics(z, y), n, rng), n)
        return Release(self.phi, theta, self.epsilon, self.delta)


@dataclass
class RidgeOutputPerturbation(_PrivateEstimator):
    """Kernel ridge regression in the features, released by output perturbation (the baseline).

    theta_hat = (Phi^T Phi / n + lam I)^{-1} Phi^T y / n plus Gaussian noise of L2 sensitivity
    :func:`ridge_sensitivity`; Chaudhuri, Monteleoni & Sarwate (2011, Alg. 1 with the Gaussian
    instead of their gamma-norm noise). lam = max(lam0 / n, sqrt(2 c R / (n B))), c = sigma per
    unit sensitivity: the same rule as the covariance estimator's, noise error against the bias
    sqrt(lam) B.
    """

    def regulariser(self, n: int) -> float:
        c = gaussian_sigma(1.0, self.epsilon, self.delta)
        return max(self.ridge / n, math.sqrt(2.0 * c * self.reward_bound / (n * self.rkhs_norm)))

    def sensitivity(self, n: int) -> float:
        return ridge_sensitivity(n, self.regulariser(n), self.reward_bound)

    def noise_std_vector(self, n: int) -> np.ndarray:
        sigma = self.noise_multiplier * gaussian_sigma(self.sensitivity(n), self.epsilon, self.delta)
        return np.full(self.m, sigma)

    def statistics(self, z: np.ndarray, y: np.ndarray) -> np.ndarray:
        n = len(z)
        f = self.phi(z)
        y = np.clip(np.asarray(y, dtype=float), -self.reward_bound, self.reward_bound)
        return np.linalg.solve(f.T @ f / n + self.regulariser(n) * np.eye(self.m), f.T @ y / n)

    def privatize(self, stats: np.ndarray, n: int, rng: np.random.Generator, size: int | None = None) -> np.ndarray:
        std = self.noise_std_vector(n)
        shape = std.shape if size is None else (size, len(std))
        return stats + std * rng.standard_normal(shape)

    def solve(self, released: np.ndarray, n: int) -> np.ndarray:
        return released

    def fit(self, z: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Release:
        theta = self.privatize(self.statistics(z, y), len(z), rng)
        return Release(self.phi, theta, self.epsilon, self.delta)
