"""Contextual kernel-bandit agents over a finite action set, one interface for all.

Every agent has ``act(context) -> arm index``, ``update(context, arm, reward)``,
``predict(z) -> f_hat(z)`` on joint inputs z = (context, action) and ``privacy_spent()``.

- :class:`UniformAgent`: uniform random arms; predicts with exact kernel ridge regression.
- :class:`GPUCB`: IGP-UCB (Chowdhury & Gopalan 2017, Alg. 1; GP-UCB of Srinivas et al. 2010
  with beta_t = B + R sqrt(2 (gamma_{t-1} + 1 + ln(1/delta))), lam = 1 + 2/T), exact GP posterior.
- :class:`PrivateKernelBandit`: the explore-then-release scheme of Pavlovic, Salgia & Zhao
  (AISTATS 2025). For ``explore_rounds`` rounds the arm is uniform at random, drawn from the
  agent's own generator and independent of every context and reward seen; then a private
  estimate is released once (:mod:`rewardiff.bandits.estimators`) and every later action is
  argmax_a f_hat(c_t, a), computed from the release and the current user's own context only.

Privacy of :class:`PrivateKernelBandit` (joint DP, Kearns et al. 2014; Shariff & Sheffet 2018):
the exploration queries carry no information about the data; the release is (eps, delta)-DP
with respect to replacing one (context, reward) record: the released (Sigma_hat, b_hat) is
one Gaussian mechanism, calibrated on its whitened joint L2 sensitivity by the analytic
Gaussian mechanism (Balle & Wang 2018, Theorem 8); the exploitation actions are
post-processing of the release (Dwork & Roth 2014, Proposition 2.1) combined with user t's own
context, which the billboard lemma (Hsu et al. 2014) turns into (eps, delta)-joint DP of the
whole action sequence. The accountant is this one-shot argument: ``privacy_spent()`` is
(eps, delta) after the release and (0, 0) before it.

Deviations from the paper (its full text could not be read here, only its abstract and parts
of the follow-up's appendix; the constructions below are the nearest faithful ones):

1. The projection set is a data-independent landmark set (uniform contexts in a known box x
   uniform arms) with Nystrom features, not a set drawn from the private data (the follow-up
   uses i.i.d. copies of the data and privatises them); it costs no privacy here.
2. The covariance and the cross moment are computed on the same records and released
   together as one Gaussian mechanism calibrated on their whitened joint sensitivity
   (exact, see :class:`CovarianceEstimator`), instead of the follow-up's independent data
   copies (its Lemma 6.6); this spends (eps, delta) once, with no data split.
3. Rewards are clipped to [-R, R] so that the sensitivity holds with Gaussian noise (the paper
   assumes bounded noise).
4. The regulariser is a rule of ours:
   lam = max((lam0 + 1 + log m)/n, sigma_b sqrt(m)/B, 2 sigma_S sqrt(m)), the privacy noise
   balanced against the bias sqrt(lam) B and kept above the operator norm of the covariance
   noise; the privatised covariance is projected onto the PSD cone.
5. Noise calibration is the exact analytic Gaussian mechanism rather than the paper's
   constants; the exploration length is the caller's ``explore_rounds`` (the paper's T).
6. The baseline is output-perturbed kernel ridge regression (Chaudhuri et al. 2011), the
   "classical counterpart" the follow-up compares against, not the earlier private GP bandit
   of Dubey (AISTATS 2021), which is not implemented.
"""

from __future__ import annotations

import math

import numpy as np

from rewardiff.bandits.environments import Arms, joint
from rewardiff.bandits.estimators import CovarianceEstimator, Release, RidgeOutputPerturbation
from rewardiff.bandits.kernels import Kernel, nystrom_features
from rewardiff.errors import UserError


class _Recorder:
    """Shared data store and helpers: arms, the joint inputs seen and their rewards."""

    def __init__(self, arms: Arms, seed: int = 0) -> None:
        self.arms = arms
        self.rng = np.random.default_rng(seed)
        self.z: list[np.ndarray] = []
        self.y: list[float] = []

    def joint_row(self, context: np.ndarray, arm: int) -> np.ndarray:
        return np.concatenate([np.atleast_1d(np.asarray(context, dtype=float)), self.arms.features[int(arm)]])

    def candidates(self, context: np.ndarray) -> np.ndarray:
        """The joint inputs of every arm at ``context``, [K, d]."""
        return joint(np.atleast_1d(np.asarray(context, dtype=float))[None], self.arms.features)[0]

    def record(self, context: np.ndarray, arm: int, reward: float) -> None:
        self.z.append(self.joint_row(context, arm))
        self.y.append(float(reward))

    def privacy_spent(self) -> tuple[float, float]:
        return (math.inf, 1.0) if self.z else (0.0, 0.0)  # non-private once it has seen data


class UniformAgent(_Recorder):
    """Uniformly random arms; ``predict`` is exact kernel ridge regression on the data seen."""

    def __init__(self, arms: Arms, kernel: Kernel, ridge: float = 0.01, seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.kernel, self.ridge = kernel, ridge

    def act(self, context: np.ndarray) -> int:
        return int(self.rng.integers(len(self.arms)))

    def update(self, context: np.ndarray, arm: int, reward: float) -> None:
        self.record(context, arm, reward)

    def predict(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        if not self.z:
            return np.zeros(z.shape[:-1])
        x = np.stack(self.z)
        alpha = np.linalg.solve(self.kernel.gram(x) + self.ridge * np.eye(len(x)), np.asarray(self.y))
        return (self.kernel.gram(z.reshape(-1, z.shape[-1]), x) @ alpha).reshape(z.shape[:-1])


class GPUCB(_Recorder):
    """IGP-UCB (Chowdhury & Gopalan 2017): argmax_a mu_{t-1}(c, a) + beta_t sigma_{t-1}(c, a).

    Args:
        arms: The action set.
        kernel: Kernel on joint inputs.
        horizon: T, for lam = 1 + 2/T.
        rkhs_norm: B, a bound on ||f||_k.
        noise_bound: R, the sub-Gaussian constant of the noise.
        delta: Confidence parameter of beta_t.
        beta_scale: Multiplies beta_t (1 = the paper's value).
    """

    def __init__(self, arms: Arms, kernel: Kernel, horizon: int, rkhs_norm: float = 1.0,
                 noise_bound: float = 0.1, delta: float = 0.05, beta_scale: float = 1.0, seed: int = 0) -> None:
        super().__init__(arms, seed)
        self.kernel, self.b, self.r, self.delta, self.beta_scale = kernel, rkhs_norm, noise_bound, delta, beta_scale
        self.lam = 1.0 + 2.0 / horizon
        self.inv = np.zeros((0, 0))  # (K_t + lam I)^{-1}, grown one row at a time
        self.gamma = 0.0  # 0.5 log det(I + K_t / lam), the information gain so far

    def _posterior(self, zs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self.z:
            return np.zeros(len(zs)), np.ones(len(zs))
        kz = self.kernel.gram(np.stack(self.z), zs)  # [t, K]
        w = self.inv @ kz
        mean = w.T @ np.asarray(self.y)
        var = np.maximum(self.kernel.diag(zs) - (kz * w).sum(0), 1e-12)
        return mean, np.sqrt(var)

    def beta(self) -> float:
        return self.beta_scale * (self.b + self.r * math.sqrt(2.0 * (self.gamma + 1.0 + math.log(1.0 / self.delta))))

    def act(self, context: np.ndarray) -> int:
        mean, std = self._posterior(self.candidates(context))
        return int(np.argmax(mean + self.beta() * std))

    def update(self, context: np.ndarray, arm: int, reward: float) -> None:
        x = self.joint_row(context, arm)
        if self.z:  # block inverse: [[A, k], [k^T, c]]^{-1} through the Schur complement s
            k = self.kernel.gram(np.stack(self.z), x[None])[:, 0]
            u = self.inv @ k
            s = 1.0 + self.lam - k @ u
            top = self.inv + np.outer(u, u) / s
            self.inv = np.block([[top, -u[:, None] / s], [-u[None, :] / s, np.array([[1.0 / s]])]])
        else:
            s = 1.0 + self.lam
            self.inv = np.array([[1.0 / s]])
        self.gamma += 0.5 * math.log(s / self.lam)  # = 0.5 log(1 + sigma_{t-1}^2(x_t) / lam)
        self.record(context, arm, reward)

    def predict(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        return self._posterior(z.reshape(-1, z.shape[-1]))[0].reshape(z.shape[:-1])


def landmarks(arms: Arms, context_low, context_high, m: int, rng: np.random.Generator) -> np.ndarray:
    """``m`` data-independent joint points: uniform contexts in the box x uniformly drawn arms."""
    low, high = np.atleast_1d(context_low).astype(float), np.atleast_1d(context_high).astype(float)
    c = rng.uniform(low, high, (m, len(low)))
    return np.concatenate([c, arms.features[rng.integers(len(arms), size=m)]], axis=1)


class PrivateKernelBandit(_Recorder):
    """Uniform exploration, one private release, then greedy play on the release.

    Args:
        arms: The action set.
        kernel: Kernel on joint inputs.
        explore_rounds: T, the exploration length; the release happens after T updates.
        epsilon, delta: Privacy of the release (epsilon = inf: the non-private estimator).
        context_low, context_high: A box holding the contexts (for the data-independent landmarks).
        n_features: m, the number of Nystrom landmarks (default 2 sqrt(T), clipped to [16, 200]).
        estimator: ``"covariance"`` (the paper's) or ``"ridge"`` (output-perturbed KRR baseline).
        reward_bound: R, rewards are clipped to [-R, R].
        rkhs_norm: B, a bound on ||f||_k.
        ridge: lam0, the non-private regulariser (lam0 / n normalised).
        noise_multiplier: Scale on the calibrated noise; anything below 1 is NOT private.
        seed: Seeds the exploration arms, the landmarks and the privacy noise.
    """

    def __init__(self, arms: Arms, kernel: Kernel, explore_rounds: int, epsilon: float = 1.0,
                 delta: float = 1e-5, context_low=0.0, context_high=1.0, n_features: int | None = None,
                 estimator: str = "covariance", reward_bound: float = 1.0, rkhs_norm: float = 1.0,
                 ridge: float = 0.01, noise_multiplier: float = 1.0, seed: int = 0) -> None:
        super().__init__(arms, seed)
        if explore_rounds < 2:
            raise UserError(f"explore_rounds: need at least 2, got {explore_rounds}")
        kinds = {"covariance": CovarianceEstimator, "ridge": RidgeOutputPerturbation}
        if estimator not in kinds:
            raise UserError(f"estimator: {estimator!r} is not one of {sorted(kinds)}")
        m = n_features or int(min(200, max(16, round(2 * math.sqrt(explore_rounds)))))
        self.explore_rounds = explore_rounds
        self.landmarks = landmarks(arms, context_low, context_high, m, self.rng)
        phi = nystrom_features(kernel, self.landmarks)
        self.estimator = kinds[estimator](phi, m, epsilon, delta, reward_bound, rkhs_norm, ridge, noise_multiplier)
        self.release: Release | None = None

    def act(self, context: np.ndarray) -> int:
        if self.release is None:
            return int(self.rng.integers(len(self.arms)))  # data-independent query
        return int(np.argmax(self.release.predict(self.candidates(context))))

    def update(self, context: np.ndarray, arm: int, reward: float) -> None:
        if self.release is not None:
            return  # after the release no data is read: the rest is post-processing
        self.record(context, arm, reward)
        if len(self.z) == self.explore_rounds:
            self.release = self.estimator.fit(np.stack(self.z), np.asarray(self.y), self.rng)
            self.z, self.y = [], []  # the raw records are not kept past the release

    def predict(self, z: np.ndarray) -> np.ndarray:
        z = np.asarray(z, dtype=float)
        if self.release is None:
            return np.zeros(z.shape[:-1])
        return self.release.predict(z)

    def privacy_spent(self) -> tuple[float, float]:
        """(epsilon, delta) of the release once it is made, (0, 0) before."""
        if self.release is None:
            return 0.0, 0.0
        return self.estimator.epsilon, (0.0 if math.isinf(self.estimator.epsilon) else self.estimator.delta)
