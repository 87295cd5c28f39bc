"""Stationary kernels on R^d: the squared exponential (RBF) and the Matern family.

Both are functions of the Euclidean distance r = ||x - y|| scaled by a lengthscale l, with
k(x, x) = 1, so every feature map built from them has ||phi(x)|| <= 1 (the bound the privacy
sensitivities in :mod:`rewardiff.bandits.estimators` use). Closed forms (Rasmussen & Williams
2006, eq. 4.9 and 4.17):

    RBF          k(r) = exp(-r^2 / (2 l^2))
    Matern 1/2   k(r) = exp(-r / l)
    Matern 3/2   k(r) = (1 + sqrt(3) r / l) exp(-sqrt(3) r / l)
    Matern 5/2   k(r) = (1 + sqrt(5) r / l + 5 r^2 / (3 l^2)) exp(-sqrt(5) r / l)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from rewardiff.errors import UserError

MATERN_NUS = (0.5, 1.5, 2.5)


def _as_2d(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    return x[:, None] if x.ndim == 1 else x


def distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances between the rows of ``x`` [N, d] and ``y`` [M, d], as [N, M]."""
    x, y = _as_2d(x), _as_2d(y)
    sq = (x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2.0 * x @ y.T
    return np.sqrt(np.maximum(sq, 0.0))


@dataclass(frozen=True)
class Kernel:
    """A stationary kernel k(x, y) = rho(||x - y|| / lengthscale) with rho(0) = 1.

    Args:
        name: ``"rbf"`` or ``"matern"``.
        lengthscale: l > 0.
        nu: Matern smoothness, one of 0.5, 1.5, 2.5 (ignored for the RBF).
    """

    name: str = "rbf"
    lengthscale: float = 0.2
    nu: float = 2.5

    def __post_init__(self) -> None:
        if self.name not in ("rbf", "matern"):
            raise UserError(f"kernel name: {self.name!r} is not one of 'rbf', 'matern'")
        if not self.lengthscale > 0:
            raise UserError(f"kernel lengthscale: must be > 0, got {self.lengthscale}")
        if self.name == "matern" and self.nu not in MATERN_NUS:
            raise UserError(f"kernel nu: Matern needs nu in {MATERN_NUS}, got {self.nu}")

    def profile(self, r: np.ndarray) -> np.ndarray:
        """rho(r): the kernel as a function of the unscaled distance ``r`` >= 0."""
        s = np.asarray(r, dtype=float) / self.lengthscale
        if self.name == "rbf":
            return np.exp(-0.5 * s * s)
        if self.nu == 0.5:
            return np.exp(-s)
        if self.nu == 1.5:
            a = math.sqrt(3.0) * s
            return (1.0 + a) * np.exp(-a)
        a = math.sqrt(5.0) * s
        return (1.0 + a + a * a / 3.0) * np.exp(-a)

    def gram(self, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
        """The matrix [k(x_i, y_j)] for rows ``x`` [N, d] and ``y`` [M, d] (``y = x`` if None)."""
        return self.profile(distances(x, x if y is None else y))

    def diag(self, x: np.ndarray) -> np.ndarray:
        """k(x_i, x_i) for each row, [N] (all ones: the kernels are normalised)."""
        return np.ones(_as_2d(x).shape[0])

    @property
    def label(self) -> str:
        return "rbf" if self.name == "rbf" else f"matern{self.nu:g}"


def rbf(lengthscale: float = 0.2) -> Kernel:
    """The squared-exponential kernel with the given lengthscale."""
    return Kernel("rbf", lengthscale)


def matern(nu: float = 2.5, lengthscale: float = 0.2) -> Kernel:
    """The Matern kernel of smoothness ``nu`` (0.5, 1.5 or 2.5) with the given lengthscale."""
    return Kernel("matern", lengthscale, nu)


def gram(kernel: Kernel, x: np.ndarray, y: np.ndarray | None = None) -> np.ndarray:
    """``kernel.gram(x, y)``: the cross-Gram matrix [N, M]."""
    return kernel.gram(x, y)


def nystrom_features(kernel: Kernel, landmarks: np.ndarray, jitter: float = 1e-8):
    """The Nystrom feature map phi(z) = K_mm^{-1/2} k_m(z) on fixed ``landmarks`` [m, d].

    phi(x)^T phi(y) is the Nystrom approximation of k(x, y) (Williams & Seeger 2001), and
    ||phi(z)||^2 = k_m(z)^T K_mm^{-1} k_m(z) <= k(z, z) = 1 (a Schur complement of a PSD Gram
    matrix). The returned map also rescales any row whose norm exceeds 1 by round-off, so the
    bound holds exactly.

    Returns:
        A function ``z [N, d] -> phi [N, m]``.
    """
    landmarks = _as_2d(landmarks)
    evals, evecs = np.linalg.eigh(kernel.gram(landmarks) + jitter * np.eye(len(landmarks)))
    inv_sqrt = (evecs / np.sqrt(np.maximum(evals, jitter))) @ evecs.T  # K_mm^{-1/2}, [m, m]

    def phi(z: np.ndarray) -> np.ndarray:
        f = kernel.gram(z, landmarks) @ inv_sqrt  # [N, m]
        norms = np.linalg.norm(f, axis=1, keepdims=True)
        return f / np.maximum(norms, 1.0)

    return phi
