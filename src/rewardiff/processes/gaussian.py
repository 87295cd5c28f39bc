"""Gaussian diffusion: DDPM training noise and DDIM sampling; holds no model.

Notation (Song, Meng, Ermon 2021, "Denoising Diffusion Implicit Models", arXiv 2010.02502):
    abar_t   cumulative product of alphas, the signal fraction of x_t
    x_t      = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps
    v        = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0          (Salimans & Ho 2022)
    sigma_t  = eta * sqrt((1 - abar_prev) / (1 - abar_t)) * sqrt(1 - abar_t / abar_prev)
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from rewardiff.types import StepOut

Prediction = Literal["epsilon", "v_prediction", "sample"]
_LOG_2PI = math.log(2 * math.pi)
SPACINGS = ("trailing", "leading")  # diffusers' timestep spacings whose DDIM steps land on the next timestep


def make_betas(kind: str, n: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Beta schedule by name: ``linear``, ``scaled_linear`` (Stable Diffusion) or ``cosine``."""
    if kind == "linear":
        return torch.linspace(beta_start, beta_end, n, dtype=torch.float64)
    if kind == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, n, dtype=torch.float64) ** 2
    if kind == "cosine":  # Nichol & Dhariwal 2021, eq. 17, betas capped at 0.999
        f = lambda s: math.cos((s / n + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        return torch.tensor([min(1 - f(i + 1) / f(i), 0.999) for i in range(n)], dtype=torch.float64)
    raise ValueError(f"unknown beta schedule {kind!r}; choose linear, scaled_linear or cosine")


def rescale_zero_terminal_snr(betas: Tensor) -> Tensor:
    """Shift and scale sqrt(abar) so that the last step has zero SNR (Lin et al. 2023, Alg. 1)."""
    s = torch.cumprod(1 - betas, 0).sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    s = (s - sT) * s0 / (s0 - sT)
    abar = s**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1 - alphas


class GaussianProcess:
    """DDPM forward noising and the DDIM reverse step (eta in [0, 1]).

    Args:
        betas: [N] noise schedule over the N training timesteps.
        prediction: what the denoiser predicts: ``epsilon``, ``v_prediction`` or ``sample``.
        final_alpha_one: abar used after the last step is 1 (else abar_0), as diffusers'
            ``set_alpha_to_one``.
        spacing: the timesteps :meth:`timesteps` visits unless told: ``trailing`` or
            ``leading`` (diffusers' ``timestep_spacing``).
        steps_offset: added to ``leading`` timesteps (diffusers' ``steps_offset``; Stable
            Diffusion's and ModelScope's text-to-video configs have 1); ``trailing`` ignores it,
            as diffusers does.
    """

    def __init__(self, betas: Tensor, prediction: Prediction = "epsilon", final_alpha_one: bool = True,
                 spacing: str = "trailing", steps_offset: int = 0):
        if prediction not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"unknown prediction type {prediction!r}")
        if spacing not in SPACINGS:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose {' or '.join(SPACINGS)}")
        if not 0 <= steps_offset < len(betas):
            raise ValueError(f"steps_offset must be in [0, {len(betas)}), got {steps_offset}")
        self.spacing, self.steps_offset = spacing, int(steps_offset)
        self.betas = betas.double()
        self.abar = torch.cumprod(1 - self.betas, 0)
        if prediction == "epsilon":
            # x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar) needs abar > 0 on a zero-SNR schedule
            self.abar = self.abar.clamp(min=2.0**-24)
        self.num_train_timesteps = len(betas)
        self.prediction = prediction
        self.final_abar = 1.0 if final_alpha_one else float(self.abar[0])

    @classmethod
    def from_config(cls, schedule: str = "cosine", n: int = 1000, zero_snr: bool = True, prediction: Prediction = "v_prediction") -> GaussianProcess:
        betas = make_betas(schedule, n)
        return cls(rescale_zero_terminal_snr(betas) if zero_snr else betas, prediction)

    # ------------------------------------------------------------------ schedule

    def alpha_bar(self, t: int | Tensor) -> Tensor:
        """abar_t as float32; t = -1 means the clean sample (abar = final_abar)."""
        t = torch.as_tensor(t)
        out = torch.where(t >= 0, self.abar[t.clamp(min=0)], torch.tensor(self.final_abar, dtype=torch.float64))
        return out.float()

    def timesteps(self, n: int, spacing: str | None = None) -> list[int]:
        """The n training timesteps a DDIM sampler visits, largest first, as diffusers'
        ``DDIMScheduler.set_timesteps`` places them (``spacing``: the process's own unless told;
        ``leading`` shifted by ``steps_offset``)."""
        N, spacing = self.num_train_timesteps, spacing or self.spacing
        if not 1 <= n <= N:
            raise ValueError(f"num_inference_steps must be in [1, {N}], got {n}")
        if spacing == "trailing":
            ts = np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1
        elif spacing == "leading":
            ts = (np.arange(0, n) * (N // n)).round()[::-1].astype(np.int64) + self.steps_offset
        else:
            raise ValueError(f"unknown timestep spacing {spacing!r}; choose {' or '.join(SPACINGS)}")
        return [int(t) for t in ts]

    @staticmethod
    def prev_timesteps(ts: list[int]) -> list[int]:
        """The timestep after each step: the next one in ``ts``, and -1 (clean) after the last."""
        return ts[1:] + [-1]

    def snr(self, t: int | Tensor) -> Tensor:
        """The signal-to-noise ratio abar_t / (1 - abar_t) of x_t (inf for the clean sample when
        abar after the last step is 1)."""
        a = self.alpha_bar(t)
        return a / (1 - a)

    def at_fraction(self, tau: Tensor) -> Tensor:
        """The training timesteps at fractions ``tau`` in [0, 1] of the way to pure noise:
        round(tau (N - 1)), int64 (score distillation draws its noise levels so)."""
        n = self.num_train_timesteps - 1
        return torch.round(torch.as_tensor(tau, dtype=torch.float64) * n).long().clamp(0, n)

    def training_timesteps(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        """n timesteps to train a denoiser at: uniform over the training timesteps (DDPM)."""
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    # ------------------------------------------------------------------ randomness

    @staticmethod
    def is_stochastic(eta: float) -> bool:
        """Whether a step with this eta draws noise (DDIM with eta = 0 is deterministic)."""
        return eta > 0

    @staticmethod
    def prior(shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """x_T for one sample of ``shape``: standard normal."""
        return torch.randn(shape, generator=generator)

    @staticmethod
    def noise_like(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The randomness of one step for states ``x`` [B, ...]: standard normal of x's shape,
        drawn on the generator's device (the CPU without one), returned on x's device and dtype."""
        device = "cpu" if generator is None else generator.device
        return torch.randn(x.shape, generator=generator, device=device).to(x.device, x.dtype)

    @staticmethod
    def draw(mean: Tensor, std: Tensor, noise: Tensor) -> Tensor:
        """A sample of N(mean, std^2 I) from a standard normal ``noise`` of mean's shape."""
        return mean + std.to(mean) * noise

    # ------------------------------------------------------------------ forward process

    def add_noise(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with t of shape [B] or scalar."""
        a = self._bcast(self.alpha_bar(t), x0)
        return a.sqrt() * x0 + (1 - a).sqrt() * noise

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """The denoiser's regression target at (x0, noise, t)."""
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "sample":
            return x0
        a = self._bcast(self.alpha_bar(t), x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0

    def split(self, model_out: Tensor, x_t: Tensor, t: int | Tensor) -> tuple[Tensor, Tensor]:
        """(x0_hat, eps_hat) from the model output at x_t (Tweedie's estimate for x0_hat)."""
        a = self._bcast(self.alpha_bar(t), x_t)
        sa, s1a = a.sqrt(), (1 - a).sqrt()
        if self.prediction == "epsilon":
            return (x_t - s1a * model_out) / sa, model_out
        if self.prediction == "sample":
            return model_out, (x_t - sa * model_out) / s1a
        return sa * x_t - s1a * model_out, sa * model_out + s1a * x_t

    # ------------------------------------------------------------------ reverse step

    def sigma(self, t: int, t_prev: int, eta: float) -> Tensor:
        """sigma_t of the DDIM step t -> t_prev at ``eta`` (eq. 16), float32."""
        a, ap = self.alpha_bar(t), self.alpha_bar(t_prev)
        return eta * ((1 - ap) / (1 - a)).sqrt() * (1 - a / ap).sqrt()

    def step_std(self, t: int, t_prev: int, eta: float) -> Tensor:
        """The standard deviation of the step t -> t_prev at ``eta``: :meth:`sigma` (0 at eta = 0)."""
        return self.sigma(t, t_prev, eta)

    def step(self, model_out: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float = 0.0, noise: Tensor | None = None) -> StepOut:
        """One DDIM step x_t -> x_{t_prev} (Song et al. 2021, eq. 12).

        ``noise`` is the standard normal draw used when eta > 0 (drawn here when None).
        """
        # 1. abar at the end of the step
        ap = self.alpha_bar(t_prev)
        # 2. predicted clean sample and noise
        x0_hat, eps_hat = self.split(model_out, x_t, t)
        # 3. the step's standard deviation, eq. 16
        std = self.sigma(t, t_prev, eta)
        # 4. direction pointing to x_t, then the mean of the transition, eq. 12
        mean = ap.sqrt() * x0_hat + (1 - ap - std**2).clamp(min=0).sqrt() * eps_hat
        if float(std) == 0.0:
            zeros = torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
            return StepOut(mean, x0_hat, mean, std, zeros)
        # 5. sample and its log-density under N(mean, std^2)
        noise = torch.randn_like(x_t) if noise is None else noise
        prev = mean + std * noise
        return StepOut(prev, x0_hat, mean, std, self.log_prob(prev, mean, std))

    @staticmethod
    def log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """log N(x; mean, std^2 I) summed over all but the batch dimension [B]."""
        d = x[0].numel()
        sq = ((x - mean) ** 2).flatten(1).sum(1)
        return -sq / (2 * std**2) - d * (torch.log(std) + 0.5 * _LOG_2PI)

    @staticmethod
    def divergence(model_out: Tensor, ref_out: Tensor, x_t: Tensor, t: int, t_prev: int) -> Tensor:
        """The DRaFT+ penalty of one step: the mean squared distance of the model's and the
        reference model's outputs at (x_t, t), per sample [B] (x_t, t and t_prev are unused)."""
        return ((model_out - ref_out) ** 2).flatten(1).mean(1)

    @staticmethod
    def _bcast(v: Tensor, like: Tensor) -> Tensor:
        v = v.to(like.device, like.dtype)
        return v.reshape(v.shape + (1,) * (like.dim() - v.dim()))
