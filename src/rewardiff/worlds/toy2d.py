"""A 2-D toy world: a Gaussian mixture data distribution with an exact denoiser.

The data are a mixture of isotropic 2-D Gaussians (by default 8 equally weighted components
on a circle of radius 2, each of std 0.15). Under the forward process
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps`` every component stays Gaussian, so the
posterior mean E[x0 | x_t] (what a perfectly trained denoiser predicts) has a closed form:

    p(x_t | k)        = N(x_t; sqrt(abar) mu_k, (abar s_k^2 + 1 - abar) I)
    r_k(x_t)          = w_k p(x_t | k) / sum_j w_j p(x_t | j)
    E[x0 | x_t, k]    = mu_k + sqrt(abar) s_k^2 / (abar s_k^2 + 1 - abar) (x_t - sqrt(abar) mu_k)
    E[x0 | x_t]       = sum_k r_k(x_t) E[x0 | x_t, k]

The same holds under rectified flow, ``x_t = (1 - sigma) x0 + sigma eps``: with c = 1 - sigma,

    p(x_t | k)        = N(x_t; c mu_k, var_k I),  var_k = c^2 s_k^2 + sigma^2
    E[x0 | x_t, k]    = mu_k + c s_k^2 / var_k (x_t - c mu_k)
    E[eps | x_t, k]   = sigma / var_k (x_t - c mu_k)
    v(x_t)            = E[eps - x0 | x_t] = sum_k r_k(x_t) (E[eps | x_t, k] - E[x0 | x_t, k])

the exact velocity (:class:`MixtureVelocity`, :func:`toy2d_flow_model`), finite at every
sigma in [0, 1] (var_k >= min(s_k^2, 1) / 2 > 0), so the world also runs as a flow.

With no training error in the way, a guidance method's effect on samples (best-of-N, SVDD,
SMC, gradient guidance ...) can be measured against known answers: the unguided model
reproduces the mixture, and a reward peaked on one mean should pull mass onto that mode.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from rewardiff.models.base import DiffusionModel
from rewardiff.processes.flow import SDE, FlowProcess
from rewardiff.processes.gaussian import GaussianProcess, Prediction
from rewardiff.rewards.base import RewardFn

NUM_MODES = 8
RADIUS = 2.0
STD = 0.15
TARGET = (RADIUS, 0.0)  # the mode at angle 0 of the default ring


def ring_means(k: int = NUM_MODES, radius: float = RADIUS) -> Tensor:
    """``k`` points equally spaced on a circle, the first at angle 0. -> [k, 2] float64"""
    angle = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
    return radius * torch.stack([angle.cos(), angle.sin()], 1)


class GaussianMixture:
    """A mixture of isotropic 2-D Gaussians.

    Args:
        means: component means [K, 2] (default: ``ring_means()``).
        std: component standard deviation, one for all or one per component [K]; > 0.
        weights: mixture weights [K], normalised here (default: equal).
    """

    def __init__(
        self,
        means: Tensor | Sequence[Sequence[float]] | None = None,
        std: float | Tensor | Sequence[float] = STD,
        weights: Tensor | Sequence[float] | None = None,
    ):
        mu = ring_means() if means is None else torch.as_tensor(means, dtype=torch.float64).clone()
        if mu.dim() != 2 or mu.shape[1] != 2 or mu.shape[0] == 0:
            raise ValueError(f"means must have shape [K, 2] with K >= 1, got {tuple(mu.shape)}")
        K = mu.shape[0]
        s = torch.as_tensor(std, dtype=torch.float64).clone()
        s = s.expand(K).clone() if s.dim() == 0 else s
        if s.shape != (K,) or not bool((s > 0).all()):
            raise ValueError(f"std must be positive, one value or one per component ({K}); got {std!r}")
        w = torch.ones(K, dtype=torch.float64) if weights is None else torch.as_tensor(weights, dtype=torch.float64).clone()
        if w.shape != (K,) or bool((w < 0).any()) or float(w.sum()) <= 0:
            raise ValueError(f"weights must be {K} non-negative numbers with a positive sum; got {weights!r}")
        self.means, self.stds, self.weights = mu, s, w / w.sum()

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def mean(self) -> Tensor:
        """The mixture's mean sum_k w_k mu_k [2] float64 (the posterior mean at zero SNR)."""
        return self.weights @ self.means

    def sample(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """``n`` independent draws from the mixture. -> [n, 2] float32"""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, 2, dtype=torch.float64, generator=generator)
        return (self.means[k] + self.stds[k, None] * eps).float()

    def nearest(self, x: Tensor) -> Tensor:
        """Index of the mean nearest to each point. x [B, 2] -> [B] long"""
        return torch.cdist(x.detach().double(), self.means.to(x.device)).argmin(1)

    def log_prob(self, x: Tensor) -> Tensor:
        """Log-density of the mixture at each point. x [B, 2] -> [B] float64"""
        one = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
        return _log_joint(x.double(), self.means.to(x.device), self.stds.to(x.device) ** 2,
                          self.weights.to(x.device).log(), one, one, 1 - one).logsumexp(1)

    def posterior_mean(self, x_t: Tensor, abar: Tensor | float) -> Tensor:
        """E[x0 | x_t] under ``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``.

        Args:
            x_t: noisy points [B, 2].
            abar: the signal fraction, one for all or one per point [B], in [0, 1].

        Returns:
            the posterior mean [B, 2] float64.
        """
        dev = x_t.device
        a = torch.as_tensor(abar, dtype=torch.float64, device=dev).expand(x_t.shape[0])
        return _posterior_mean(x_t.double(), a, self.means.to(dev), self.stds.to(dev) ** 2, self.weights.to(dev).log())

    def velocity(self, x_t: Tensor, sigma: Tensor | float) -> Tensor:
        """The exact flow velocity E[eps - x0 | x_t] under ``x_t = (1 - sigma) x0 + sigma eps``.

        Args:
            x_t: noisy points [B, 2].
            sigma: the noise level, one for all or one per point [B], in [0, 1].

        Returns:
            the velocity [B, 2] float64.
        """
        dev = x_t.device
        s = torch.as_tensor(sigma, dtype=torch.float64, device=dev).expand(x_t.shape[0])
        return _flow_velocity(x_t.double(), s, self.means.to(dev), self.stds.to(dev) ** 2, self.weights.to(dev).log())


def _log_joint(x: Tensor, mu: Tensor, s2: Tensor, logw: Tensor, c: Tensor, c2: Tensor, n2: Tensor) -> Tensor:
    """log w_k + log N(x; c mu_k, (c2 s_k^2 + n2) I) for x = c x0 + sqrt(n2) eps, c2 = c^2 (passed
    apart so that DDPM's c2 = abar is exact). x [B, 2], c, c2, n2 [B] -> [B, K]"""
    var = c2[:, None] * s2[None] + n2[:, None]  # [B, K]
    diff = x[:, None, :] - c[:, None, None] * mu[None]  # [B, K, 2]
    sq = (diff**2).sum(-1)
    return logw[None] - sq / (2 * var) - var.log() - math.log(2 * math.pi)


def _flow_velocity(x: Tensor, s: Tensor, mu: Tensor, s2: Tensor, logw: Tensor) -> Tensor:
    """The closed-form E[eps - x0 | x_t] of rectified flow (module docstring); all float64. x [B, 2], s [B] -> [B, 2]"""
    c = 1 - s
    r = _log_joint(x, mu, s2, logw, c, c**2, s**2).softmax(1)  # responsibilities [B, K]
    var = (c**2)[:, None] * s2[None] + (s**2)[:, None]  # [B, K]
    resid = x[:, None, :] - c[:, None, None] * mu[None]  # x_t - c mu_k [B, K, 2]
    gain = (s[:, None] - c[:, None] * s2[None]) / var  # E[eps | k] - E[x0 | k] = gain (x_t - c mu_k) - mu_k
    per_k = gain[..., None] * resid - mu[None]  # [B, K, 2]
    return (r[..., None] * per_k).sum(1)


def _posterior_mean(x: Tensor, a: Tensor, mu: Tensor, s2: Tensor, logw: Tensor) -> Tensor:
    """The closed-form E[x0 | x_t] (module docstring); all float64. x [B, 2], a [B] -> [B, 2]"""
    r = _log_joint(x, mu, s2, logw, a.sqrt(), a, 1 - a).softmax(1)  # responsibilities [B, K]
    sa = a.sqrt()[:, None]
    var = a[:, None] * s2[None] + (1 - a)[:, None]  # [B, K]
    gain = sa * s2[None] / var  # [B, K]
    per_k = mu[None] + gain[..., None] * (x[:, None, :] - sa[..., None] * mu[None])  # [B, K, 2]
    return (r[..., None] * per_k).sum(1)


class _ExactMixture(nn.Module):
    """What the exact denoiser and the exact velocity of a ``GaussianMixture`` hold: the mixture,
    its frozen component means (a parameter, so that ``DiffusionModel.device`` finds where it
    lives), their variances and log-weights."""

    def __init__(self, means, std, weights):
        super().__init__()
        self.mixture = GaussianMixture(means, std, weights)
        self.means = nn.Parameter(self.mixture.means.clone(), requires_grad=False)  # [K, 2]
        self.register_buffer("variances", self.mixture.stds**2)  # [K]
        self.register_buffer("log_weights", self.mixture.weights.log())  # [K]


class MixtureDenoiser(_ExactMixture):
    """The exact denoiser of a ``GaussianMixture`` under a given Gaussian process.

    ``forward`` returns the prediction (epsilon, v or x0, as the process wants) whose
    ``process.split`` gives back the exact posterior mean E[x0 | x_t]. It has nothing to
    train: its only parameter, the frozen component means, tells ``DiffusionModel.device``
    where it lives. It is differentiable in ``x_t`` (for gradient guidance).

    The posterior is computed in float64 and the output rounded to float32; with epsilon
    prediction, ``split`` divides by sqrt(abar_t), so near the end of the schedule the x0 it
    recovers carries that rounding magnified (about 1e-3 at the clamped abar = 2^-24).

    Args:
        process: the diffusion process the denoiser serves (schedule and prediction type).
        means: component means [K, 2] (default: 8 on a circle of radius 2).
        std: component standard deviation, one for all or per component [K].
        weights: mixture weights [K] (default: equal).
    """

    def __init__(
        self,
        process: GaussianProcess,
        means: Tensor | Sequence[Sequence[float]] | None = None,
        std: float | Tensor | Sequence[float] = STD,
        weights: Tensor | Sequence[float] | None = None,
    ):
        super().__init__(means, std, weights)
        self.prediction: Prediction = process.prediction
        # the posterior uses the float64 schedule; the conversion to the prediction type uses
        # the float32 abar that ``process.split`` reads, so that split inverts it exactly
        self.register_buffer("abar", process.abar.double().clone())  # [N]
        self.register_buffer("abar_split", process.alpha_bar(torch.arange(process.num_train_timesteps)).double())  # [N]

    def x0(self, x_t: Tensor, t: Tensor) -> Tensor:
        """The exact posterior mean E[x0 | x_t]. x_t [B, 2], t [B] (or scalar) long -> [B, 2] float64"""
        t = torch.as_tensor(t, device=self.abar.device).long().expand(x_t.shape[0])
        a = self.abar[t].to(x_t.device)
        return _posterior_mean(x_t.double(), a, self.means.double(), self.variances.double(), self.log_weights.double())

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The process's prediction at (x_t, t); ``cond`` is ignored.

        Args:
            x_t: noisy points [B, 2].
            t: training timesteps [B] (or one scalar) long, 0 .. N-1.
            cond: anything (the toy world is unconditional).

        Returns:
            epsilon, v or x0 [B, 2] float32, per ``process.prediction``.
        """
        x0 = self.x0(x_t, t)
        if self.prediction == "sample":
            return x0.float()
        t = torch.as_tensor(t, device=self.abar.device).long().expand(x_t.shape[0])
        a = self.abar_split[t].to(x_t.device)[:, None]
        sa, s1a = a.sqrt(), (1 - a).sqrt()  # s1a > 0: abar_0 < 1 on every schedule
        x = x_t.double()
        if self.prediction == "epsilon":  # split: x0 = (x_t - s1a eps) / sa
            return ((x - sa * x0) / s1a).float()
        return ((sa * x - x0) / s1a).float()  # split: x0 = sa x_t - s1a v


def toy2d_model(prediction: Prediction = "v_prediction", zero_snr: bool = True, **mixture: Any) -> DiffusionModel:
    """The toy world's model: an exact mixture denoiser on the cosine schedule (1000 steps).

    Args:
        prediction: the process's prediction type: ``epsilon``, ``v_prediction`` or ``sample``.
        zero_snr: rescale the schedule to zero terminal SNR (abar_999 = 0).
        **mixture: ``means``, ``std``, ``weights`` of the data (see ``GaussianMixture``).

    Returns:
        a ``DiffusionModel`` with sample shape (2,), prompt-independent condition
        (zeros [B, 1]) and identity decode; its net's ``mixture`` is the data distribution.
    """
    process = GaussianProcess.from_config("cosine", 1000, zero_snr, prediction)
    net = MixtureDenoiser(process, **mixture).eval()
    return DiffusionModel(net, process, lambda prompts: torch.zeros(len(prompts), 1), (2,), name="toy2d", output_range=None)


class MixtureVelocity(_ExactMixture):
    """The exact velocity of a ``GaussianMixture`` under a rectified-flow process:
    ``forward(x_t, t)`` is E[eps - x0 | x_t] at sigma = t / N, so that the process's ``split``
    gives back the exact posterior mean E[x0 | x_t]. Like :class:`MixtureDenoiser` it has nothing
    to train (its frozen means tell ``DiffusionModel.device`` where it lives) and is
    differentiable in ``x_t``.

    Args:
        process: the flow process the velocity serves (its N).
        means: component means [K, 2] (default: 8 on a circle of radius 2).
        std: component standard deviation, one for all or per component [K].
        weights: mixture weights [K] (default: equal).
    """

    def __init__(
        self,
        process: FlowProcess,
        means: Tensor | Sequence[Sequence[float]] | None = None,
        std: float | Tensor | Sequence[float] = STD,
        weights: Tensor | Sequence[float] | None = None,
    ):
        super().__init__(means, std, weights)
        self.num_train_timesteps = process.num_train_timesteps

    def forward(self, x_t: Tensor, t: Tensor, cond: Any = None) -> Tensor:
        """The velocity at (x_t, t); ``cond`` is ignored.

        Args:
            x_t: noisy points [B, 2].
            t: timesteps N sigma [B] (or one scalar), float, 0 .. N.
            cond: anything (the toy world is unconditional).

        Returns:
            the velocity [B, 2] float32.
        """
        s = (torch.as_tensor(t, device=x_t.device).double() / self.num_train_timesteps).expand(x_t.shape[0])
        v = _flow_velocity(x_t.double(), s, self.means.double(), self.variances.double(), self.log_weights.double())
        return v.float()


def toy2d_flow_model(shift: float = 1.0, sde: SDE = "flow-grpo", **mixture: Any) -> DiffusionModel:
    """The toy world as a flow: the exact mixture velocity under rectified flow (N = 1000).

    Args:
        shift: the schedule's shift (1: none; SD3: 3.0).
        sde: the stochastic step for eta > 0: ``flow-grpo`` or ``cps``.
        **mixture: ``means``, ``std``, ``weights`` of the data (see ``GaussianMixture``).

    Returns:
        a ``DiffusionModel`` with sample shape (2,), prompt-independent condition (zeros
        [B, 1]) and identity decode; its net's ``mixture`` is the data distribution.
    """
    process = FlowProcess(1000, shift, sde=sde)
    net = MixtureVelocity(process, **mixture).eval()
    return DiffusionModel(net, process, lambda prompts: torch.zeros(len(prompts), 1), (2,), name="toy2d-flow", output_range=None)


def _target_fn(target: Sequence[float]):
    goal = torch.as_tensor(target, dtype=torch.float32)
    if goal.shape != (2,):
        raise ValueError(f"target must be a 2-D point, got {target!r}")

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        """-||x - target||^2. x [B, 2] -> [B]"""
        return -((x - goal.to(x.device, x.dtype)) ** 2).sum(-1)

    return fn


def target_reward(target: Sequence[float] = TARGET, name: str = "toy2d-target") -> RewardFn:
    """Differentiable reward ``-||x - target||^2`` [B], highest (0) at ``target``.

    Args:
        target: the 2-D point to reach (default: the ring's mode at angle 0, (2, 0)).
        name: the reward's name.
    """
    desc = f"minus the squared distance to ({target[0]:g}, {target[1]:g})"
    return RewardFn(name, True, None, desc, _target_fn(target))


def target_reward_blackbox(target: Sequence[float] = TARGET, name: str = "toy2d-target-blackbox") -> RewardFn:
    """``target_reward``'s values with no gradient (``differentiable=False``), for black-box methods.

    Args:
        target: the 2-D point to reach (default (2, 0)).
        name: the reward's name.
    """
    desc = f"minus the squared distance to ({target[0]:g}, {target[1]:g}), black-box"
    return RewardFn(name, False, None, desc, _target_fn(target))


__all__ = [
    "GaussianMixture", "MixtureDenoiser", "MixtureVelocity", "ring_means", "toy2d_model", "toy2d_flow_model",
    "target_reward", "target_reward_blackbox",
]
