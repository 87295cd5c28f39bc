"""Seeded synthetic contextual kernel-bandit environments with a reward in a known RKHS.

The reward is f(z) = sum_i a_i k(x_i, z) on the joint input z = (context, action), with centres
x_i drawn uniformly from the input box and coefficients a ~ N(0, I) rescaled so that the RKHS
norm ||f||_k = sqrt(a^T K a) equals the bound B: the setting of Srinivas et al. (2010) and of
Pavlovic, Salgia & Zhao (2025, Sec. 2). Contexts are i.i.d. (uniform in a box, or uniform over a
finite set); observations are f(z) + N(0, noise_std^2).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from rewardiff.bandits.kernels import Kernel
from rewardiff.errors import UserError


@dataclass(frozen=True)
class Arms:
    """A finite action set: one feature vector per action (a discrete setting, a grid point ...).

    Args:
        features: [K, d_a] action vectors.
        names: Optional label per action (for a caller mapping indices back to settings).
    """

    features: np.ndarray
    names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        f = np.asarray(self.features, dtype=float)
        object.__setattr__(self, "features", f[:, None] if f.ndim == 1 else f)
        if len(self.features) == 0:
            raise UserError("arms features: the action set is empty")
        if self.names is not None and len(self.names) != len(self.features):
            raise UserError(f"arms names: {len(self.names)} names for {len(self.features)} actions")

    def __len__(self) -> int:
        return len(self.features)

    @property
    def dim(self) -> int:
        return self.features.shape[1]

    @classmethod
    def grid(cls, low: float, high: float, n: int) -> "Arms":
        """``n`` evenly spaced scalar actions in [low, high] (a discretised continuous set)."""
        return cls(np.linspace(low, high, n)[:, None])


def joint(contexts: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Every (context, action) pair as joint inputs z = (c, a): [N, d_c] x [K, d_a] -> [N, K, d]."""
    c = np.atleast_2d(contexts)
    a = np.atleast_2d(actions)
    n, k = len(c), len(a)
    return np.concatenate([np.repeat(c[:, None], k, 1), np.repeat(a[None], n, 0)], axis=2)


class RKHSEnvironment:
    """A contextual bandit whose mean reward f lies in the RKHS of ``kernel`` with ||f|| = B.

    Args:
        kernel: The kernel on joint inputs z = (context, action).
        context_dim: d_c; contexts live in [0, 1]^d_c.
        arms: A finite action set; or None with ``action_dim`` for the continuous box [0, 1]^d_a.
        action_dim: d_a for a continuous action set (ignored when ``arms`` is given).
        rkhs_norm: B, the RKHS norm f is rescaled to.
        noise_std: Standard deviation of the Gaussian observation noise.
        n_centres: How many kernel centres make up f.
        context_set: Optional finite set of contexts [S, d_c]; contexts are then uniform over it.
        seed: Seeds f and the environment's own draws.
        action_grid: Points per axis of the grid on which a continuous action set is maximised.
    """

    def __init__(self, kernel: Kernel, context_dim: int = 1, arms: Arms | None = None,
                 action_dim: int = 1, rkhs_norm: float = 1.0, noise_std: float = 0.1,
                 n_centres: int = 30, context_set: np.ndarray | None = None, seed: int = 0,
                 action_grid: int = 101) -> None:
        self.kernel, self.context_dim, self.arms = kernel, context_dim, arms
        self.action_dim = arms.dim if arms is not None else action_dim
        self.rkhs_norm, self.noise_std = rkhs_norm, noise_std
        self.context_set = None if context_set is None else np.atleast_2d(context_set)
        self.rng = np.random.default_rng(seed)
        d = context_dim + self.action_dim
        self.centres = self.rng.uniform(0.0, 1.0, (n_centres, d))
        a = self.rng.standard_normal(n_centres)
        norm = np.sqrt(a @ kernel.gram(self.centres) @ a)
        self.coef = a * (rkhs_norm / norm)
        self._candidates = self._action_candidates(action_grid)

    def _action_candidates(self, per_axis: int) -> np.ndarray:
        if self.arms is not None:
            return self.arms.features
        axes = np.meshgrid(*[np.linspace(0.0, 1.0, per_axis)] * self.action_dim, indexing="ij")
        return np.stack([g.ravel() for g in axes], axis=1)

    @property
    def rkhs_norm_actual(self) -> float:
        """sqrt(a^T K a), which equals ``rkhs_norm`` by construction."""
        return float(np.sqrt(self.coef @ self.kernel.gram(self.centres) @ self.coef))

    def f(self, z: np.ndarray) -> np.ndarray:
        """The mean reward at joint inputs ``z`` [..., d] -> [...]."""
        z = np.asarray(z, dtype=float)
        flat = z.reshape(-1, z.shape[-1])
        return (self.kernel.gram(flat, self.centres) @ self.coef).reshape(z.shape[:-1])

    def sample_contexts(self, n: int, rng: np.random.Generator | None = None) -> np.ndarray:
        """``n`` i.i.d. contexts [n, d_c] (uniform in [0, 1]^d_c or over ``context_set``)."""
        rng = self.rng if rng is None else rng
        if self.context_set is not None:
            return self.context_set[rng.integers(0, len(self.context_set), n)]
        return rng.uniform(0.0, 1.0, (n, self.context_dim))

    def sample_context(self) -> np.ndarray:
        return self.sample_contexts(1)[0]

    def action_vector(self, action) -> np.ndarray:
        """An arm index (finite set) or an action vector, as a vector [d_a]."""
        if self.arms is not None and np.ndim(action) == 0:
            return self.arms.features[int(action)]
        return np.atleast_1d(np.asarray(action, dtype=float))

    def mean_reward(self, context: np.ndarray, action) -> float:
        z = np.concatenate([np.atleast_1d(context), self.action_vector(action)])
        return float(self.f(z[None])[0])

    def reward(self, context: np.ndarray, action) -> float:
        """A noisy observation f(context, action) + N(0, noise_std^2)."""
        return self.mean_reward(context, action) + self.noise_std * float(self.rng.standard_normal())

    def best_action(self, context: np.ndarray):
        """The maximiser of f(context, .): an arm index, or (continuous set) the best grid point."""
        values = self.f(joint(np.atleast_1d(context)[None], self._candidates))[0]
        i = int(np.argmax(values))
        return i if self.arms is not None else self._candidates[i]

    def best_value(self, contexts: np.ndarray) -> np.ndarray:
        """max_a f(c, a) for each context [N, d_c] -> [N]."""
        return self.f(joint(contexts, self._candidates)).max(axis=1)

    def regret(self, context: np.ndarray, action) -> float:
        """f(c, a*(c)) - f(c, a) >= 0 for one round."""
        return float(self.best_value(np.atleast_1d(context)[None])[0]) - self.mean_reward(context, action)
