"""Rectified flow (flow matching, as Stable Diffusion 3 and FLUX): three reverse steps behind
the Gaussian process's step contract; holds no model.

Notation (Esser et al. 2024, "Scaling Rectified Flow Transformers", arXiv 2403.03206):
    sigma    the noise level of x_t in [0, 1] (1: pure noise, 0: clean); the training
             timestep is t = N sigma, a float (N = ``num_train_timesteps``)
    x_t      = (1 - sigma) x_0 + sigma eps
    v        = eps - x_0, the velocity the denoiser predicts (dx_t / dsigma)
    x0_hat   = x_t - sigma v,     eps_hat = x_t + (1 - sigma) v
    s, s'    sigma at the start and at the end of a step (s' < s), dt = s' - s < 0
    a        the stochastic steps' noise scale, the sampler's ``eta``

The clean sample is t = 0 (sigma = 0): :meth:`FlowProcess.prev_timesteps` ends every chain
there, as the Gaussian process ends its chains at t = -1.

The schedules are diffusers' ``FlowMatchEulerDiscreteScheduler``'s: sigmas evenly spaced in
t from sigma_max = 1 to sigma_min (the smallest training sigma), then shifted, either by a
fixed ``shift`` (s -> shift s / (1 + (shift - 1) s); SD3: 3.0) or, with
``use_dynamic_shifting``, by the exponential time shift of FLUX with a resolution-dependent
``mu`` (s -> e^mu / (e^mu + 1 / s - 1)). With ``sigma_grid="flux"`` the unshifted sigmas are
instead FluxPipeline's, evenly spaced from 1 to 1/n (``np.linspace(1, 1/n, n)``), then shifted
the same way.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from rewardiff.processes.gaussian import GaussianProcess
from rewardiff.types import StepOut

SDE = Literal["flow-grpo", "cps"]
SDES = ("flow-grpo", "cps")
SigmaGrid = Literal["scheduler", "flux"]
SIGMA_GRIDS = ("scheduler", "flux")
CLEAN = 0.0  # the timestep of the clean sample (sigma = 0)
_UNSUPPORTED = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "invert_sigmas",
                "stochastic_sampling")


def flow_grpo_mean(x_t: Tensor, v: Tensor, s: float, s_next: float, std_t: float) -> Tensor:
    """The Flow-GRPO SDE step's mean (Liu et al. 2025, arXiv 2505.05470; discretised as in their code):

        mean = x_t (1 + std_t^2 dt / (2 s)) + v (1 + std_t^2 (1 - s) / (2 s)) dt,  dt = s' - s

    the Euler step of dx = [v + std_t^2 / (2 s) (x + (1 - s) v)] dsigma, whose drift adds
    std_t^2 / 2 times the score -(x + (1 - s) v) / s = -eps_hat / s to the ODE's velocity."""
    dt = s_next - s
    return x_t * (1 + std_t**2 * dt / (2 * s)) + v * ((1 + std_t**2 * (1 - s) / (2 * s)) * dt)


def cps_mean(x0_hat: Tensor, eps_hat: Tensor, s_next: float, std: float) -> Tensor:
    """The coefficients-preserving step's mean (Wang & Yu 2025, arXiv 2509.05952):

        mean = (1 - s') x0_hat + sqrt(s'^2 - std^2) eps_hat

    so that mean + std z carries x0_hat with coefficient 1 - s' and noise of total variance
    (s'^2 - std^2) + std^2 = s'^2: exactly the noise level of x_{t'}."""
    return x0_hat * (1 - s_next) + eps_hat * math.sqrt(max(s_next**2 - std**2, 0.0))


class FlowProcess:
    """Rectified-flow forward noising and the reverse step: Euler ODE (eta = 0), the Flow-GRPO
    SDE or coefficients-preserving sampling (eta > 0, per ``sde``).

    Args:
        num_train_timesteps: N; the timestep of noise level sigma is N sigma.
        shift: the fixed schedule shift (1: none; SD3: 3.0); unused with dynamic shifting.
        use_dynamic_shifting: shift by the exponential time shift with ``mu`` instead (FLUX).
        mu: the time shift's parameter (FLUX: ``calculate_shift`` of the image's sequence length).
        sde: the stochastic step for eta > 0: ``flow-grpo`` (the SDE with the ODE's marginals)
            or ``cps`` (coefficients-preserving sampling).
        sigma_grid: the unshifted sigmas of n sampling steps: ``scheduler``, the scheduler's
            ``set_timesteps(n)`` (evenly spaced in t from sigma = 1 to the smallest training
            sigma; SD3's pipeline), or ``flux``, FluxPipeline's (evenly spaced from 1 to 1/n,
            passed to ``set_timesteps(sigmas=...)``).
    """

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, use_dynamic_shifting: bool = False,
                 mu: float | None = None, sde: SDE = "flow-grpo", sigma_grid: SigmaGrid = "scheduler"):
        if num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be at least 1, got {num_train_timesteps}")
        if not shift > 0:
            raise ValueError(f"shift must be positive, got {shift}")
        if use_dynamic_shifting and mu is None:
            raise ValueError("dynamic shifting needs mu")
        if sde not in SDES:
            raise ValueError(f"unknown sde {sde!r}; choose {' or '.join(SDES)}")
        if sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"unknown sigma_grid {sigma_grid!r}; choose {' or '.join(SIGMA_GRIDS)}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.shift, self.use_dynamic_shifting, self.mu, self.sde = float(shift), bool(use_dynamic_shifting), mu, sde
        self.sigma_grid = sigma_grid

    @classmethod
    def from_scheduler_config(cls, config: dict, mu: float | None = None, sde: SDE = "flow-grpo",
                              sigma_grid: SigmaGrid = "scheduler") -> FlowProcess:
        """The process of a ``FlowMatchEulerDiscreteScheduler`` config, sampled on ``sigma_grid``
        (the scheduler's own, or the one its pipeline passes: ``flux`` for FluxPipeline); a
        schedule option it does not implement (a linear time shift, Karras/exponential/beta
        sigmas, a terminal stretch, inverted sigmas, the scheduler's own stochastic sampling) is
        refused."""
        if config.get("time_shift_type", "exponential") != "exponential":
            raise ValueError(f"unsupported time_shift_type {config['time_shift_type']!r}; only exponential")
        for key in _UNSUPPORTED:
            if config.get(key):
                raise ValueError(f"unsupported scheduler option {key}={config[key]!r}")
        return cls(int(config.get("num_train_timesteps", 1000)), float(config.get("shift", 1.0)),
                   bool(config.get("use_dynamic_shifting", False)), mu, sde, sigma_grid)

    # ------------------------------------------------------------------ schedule

    def sigma_at(self, t: float | Tensor) -> Tensor:
        """sigma = t / N (float64), of one timestep or of a tensor of them."""
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps

    def shifted(self, s: np.ndarray) -> np.ndarray:
        """The schedule's shift applied to unshifted sigmas ``s`` in (0, 1]."""
        if self.use_dynamic_shifting:
            assert self.mu is not None
            return math.exp(self.mu) / (math.exp(self.mu) + (1 / s - 1))
        return self.shift * s / (1 + (self.shift - 1) * s)

    def timesteps(self, n: int) -> list[float]:
        """The n timesteps N sigma a sampler visits, largest (sigma = 1) first: diffusers'
        ``set_timesteps(n)``, or with the ``flux`` grid ``set_timesteps(sigmas=linspace(1, 1/n, n))``
        (their float32 values to rounding)."""
        if n < 1:
            raise ValueError(f"num_inference_steps must be at least 1, got {n}")
        N = self.num_train_timesteps
        if self.sigma_grid == "flux":
            return [float(N * x) for x in self.shifted(np.linspace(1.0, 1.0 / n, n))]
        s_min = 1 / N if self.use_dynamic_shifting else float(self.shifted(np.float64(1 / N)))
        s = self.shifted(np.linspace(N, s_min * N, n) / N)
        return [float(N * x) for x in s]

    @staticmethod
    def prev_timesteps(ts: list[float]) -> list[float]:
        """The timestep after each step: the next one in ``ts``, and 0 (clean) after the last."""
        return list(ts[1:]) + [CLEAN]

    def snr(self, t: float | Tensor) -> Tensor:
        """The signal-to-noise ratio ((1 - sigma) / sigma)^2 of x_t (0 at sigma = 1, inf when clean)."""
        s = self.sigma_at(t)
        return ((1 - s) / s) ** 2

    # ------------------------------------------------------------------ randomness

    @staticmethod
    def is_stochastic(eta: float) -> bool:
        """Whether a step with this eta draws noise (eta = 0 is the Euler ODE step)."""
        return eta > 0

    prior = staticmethod(GaussianProcess.prior)
    noise_like = staticmethod(GaussianProcess.noise_like)
    draw = staticmethod(GaussianProcess.draw)

    # ------------------------------------------------------------------ forward process

    def at_fraction(self, tau: Tensor) -> Tensor:
        """The timesteps at fractions ``tau`` in [0, 1] of the way to pure noise: N tau, that is
        sigma = tau (score distillation draws its noise levels so)."""
        return torch.as_tensor(tau, dtype=torch.float64).clamp(0, 1).float() * self.num_train_timesteps

    def training_timesteps(self, n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0) -> Tensor:
        """n timesteps to train a denoiser at: sigma from the logit-normal of SD3 (Esser et al.
        2024, sec. 3.1: sigma = sigmoid(u), u ~ N(mean, std^2); 0 and 1 by default), as floats t = N sigma."""
        u = torch.randn(n, generator=generator, dtype=torch.float64) * std + mean
        return (torch.sigmoid(u) * self.num_train_timesteps).float()

    def add_noise(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        """x_t = (1 - sigma) x0 + sigma noise, with t of shape [B] or scalar."""
        s = self._bcast(self.sigma_at(t), x0)
        return (1 - s) * x0 + s * noise

    def target(self, x0: Tensor, noise: Tensor, t: float | Tensor) -> Tensor:
        """The denoiser's regression target, the velocity v = noise - x0 (whatever t)."""
        return noise - x0

    def split(self, model_out: Tensor, x_t: Tensor, t: float | Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) = (x_t - sigma v, x_t + (1 - sigma) v) from the velocity ``model_out``."""
        s = self._bcast(self.sigma_at(t), x_t)
        return x_t - s * model_out, x_t + (1 - s) * model_out

    # ------------------------------------------------------------------ reverse step

    def step_std(self, t: float, t_prev: float, eta: float) -> Tensor:
        """The standard deviation of the step t -> t_prev at ``eta`` (0 for the ODE step), float64.

        flow-grpo: std_t sqrt(-dt) with std_t = a sqrt(s / (1 - s)), where s = 1 in the
        denominator is replaced by the schedule's first sigma below 1 (the authors'
        ``sigmas[1]``), which is s' of the step that starts at s = 1.
        cps: s' sin(a pi / 2).
        """
        return torch.tensor(self._std(float(self.sigma_at(t)), float(self.sigma_at(t_prev)), eta), dtype=torch.float64)

    def _std(self, s: float, s_next: float, eta: float) -> float:
        if not self.is_stochastic(eta):
            return 0.0
        if self.sde == "cps":
            if eta > 1:
                raise ValueError(f"cps needs eta in [0, 1] (the noise fraction sin(eta pi / 2)), got {eta}")
            return s_next * math.sin(eta * math.pi / 2)
        return self._std_t(s, s_next, eta) * math.sqrt(s - s_next)

    @staticmethod
    def _std_t(s: float, s_next: float, eta: float) -> float:
        """Flow-GRPO's diffusion coefficient a sqrt(s / (1 - s)), s = 1 read as s' in the denominator."""
        return eta * math.sqrt(s / (1 - (s_next if s >= 1 else s)))

    def step(self, model_out: Tensor, t: float, t_prev: float, x_t: Tensor, eta: float = 0.0, noise: Tensor | None = None) -> StepOut:
        """One reverse step x_t -> x_{t_prev} from the velocity ``model_out`` at (x_t, t).

        1. sigma at both ends, s and s' (dt = s' - s < 0), and x0_hat, eps_hat (:meth:`split`).
        2. The transition's mean and standard deviation:
           - eta = 0, the Euler ODE step (diffusers' ``FlowMatchEulerDiscreteScheduler.step``):
             x_{t'} = x_t + dt v, deterministic;
           - ``sde = "flow-grpo"``, the SDE with the ODE's marginals in continuous time (Liu et
             al. 2025, "Flow-GRPO", arXiv 2505.05470; their ``sde_step_with_logprob``,
             yifan123/flow_grpo):
             mean as :func:`flow_grpo_mean`, std = a sqrt(s / (1 - s)) sqrt(-dt) (:meth:`step_std`);
           - ``sde = "cps"``, coefficients-preserving sampling (Wang & Yu 2025, arXiv 2509.05952,
             the DDIM-like update; the ``sde_type == "cps"`` branch of
             flow_grpo's ``sde_step_with_logprob`` and IamCreateAI/FlowCPS): std = s' sin(a pi / 2),
             mean as :func:`cps_mean`, so that given x0_hat = x0, x_{t'} has the noise level s'
             exactly. It keeps these coefficients, not the marginals: with the exact posterior-mean
             velocity its samples come out narrower than the data (about 15 % in std at a = 0.7,
             whatever the number of steps), since the fresh noise replaces a fixed fraction of
             the noise at every step however small the step.
        3. x_{t'} = mean + std z with ``noise`` z standard normal (drawn here when None), and
           log N(x_{t'}; mean, std^2 I) summed over all but the batch dimension, the exact
           Gaussian density. Named deviation: flow_grpo averages the log-density over the
           dimensions (and its cps branch keeps only -(x_{t'} - mean)^2); the sum is what this
           project's DDPO also uses, which divides by the dimension itself. A step with std = 0
           (the ODE, or CPS into the clean sample) is deterministic: log-probabilities zero.
        """
        # 1. noise levels at both ends; the clean and noise estimates
        s, s_next = float(self.sigma_at(t)), float(self.sigma_at(t_prev))
        x0_hat, eps_hat = self.split(model_out, x_t, t)
        # 2. the transition's mean and standard deviation
        std = self._std(s, s_next, eta)
        if not self.is_stochastic(eta):
            mean = x_t + (s_next - s) * model_out
        elif self.sde == "cps":
            mean = cps_mean(x0_hat, eps_hat, s_next, std)
        else:
            mean = flow_grpo_mean(x_t, model_out, s, s_next, self._std_t(s, s_next, eta))
        scale = torch.tensor(std, dtype=x_t.dtype if x_t.is_floating_point() else torch.float32)
        if std == 0.0:
            zeros = torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
            return StepOut(mean, x0_hat, mean, scale, zeros)
        # 3. the draw and its log-density
        noise = torch.randn_like(x_t) if noise is None else noise
        prev = mean + scale.to(x_t.device) * noise
        return StepOut(prev, x0_hat, mean, scale, self.log_prob(prev, mean, scale))

    log_prob = staticmethod(GaussianProcess.log_prob)
    divergence = staticmethod(GaussianProcess.divergence)

    @staticmethod
    def _bcast(v: Tensor, like: Tensor) -> Tensor:
        v = v.to(like.device, like.dtype)
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))
