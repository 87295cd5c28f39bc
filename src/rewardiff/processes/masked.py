"""Masked (absorbing-state) discrete diffusion over token ids; holds no model.

Notation (Austin et al. 2021, "Structured Denoising Diffusion Models in Discrete State-Spaces",
D3PM absorbing; Sahoo et al. 2024, "Simple and Effective Masked Diffusion Language Models",
MDLM; Shi et al. 2024, "Simplified and Generalized Masked Diffusion for Discrete Data", MD4):
    m        the mask id; V the vocabulary size, m included
    s        = (t + 1) / N, the continuous time of training timestep t (t = -1: s = 0, clean)
    alpha_t  the probability that a token is still unmasked at t: 1 - s (``linear``, MDLM's
             log-linear schedule) or 1 - cos(pi (1 - s) / 2) (``cosine``, MD4)
    q(x_t | x_0)          each token kept with prob alpha_t, else replaced by m
    p(x_s | x_t), s < t   a masked token stays masked with prob (1 - alpha_s) / (1 - alpha_t),
                          else becomes a token drawn from x0_hat; an unmasked token is carried
                          over unchanged (MDLM's "carry-over unmasking")

The step contract is the Gaussian process's (``rewardiff.processes.gaussian``), read for
categorical states: ``mean`` is the transition's probability vector over V outcomes (the mask
id is the "stay masked" outcome), ``std`` is a scalar 1 that only marks the step as stochastic
(the transition has no scale), and ``log_prob`` is the log-probability of the drawn tokens.
The step's randomness is uniform numbers [B, L, V], turned into categorical draws by the
Gumbel-max trick (:meth:`MaskedProcess.draw`), or into their Gumbel-softmax relaxations
(:meth:`MaskedProcess.relax`, for reward gradients through the chain). A state is token ids
[B, L], or token probabilities [B, L, V] along a relaxed chain (its tokens are their argmax).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.categorical import RELAXATIONS, TINY, gumbel_max, gumbel_noise, probs_kl
from rewardiff.types import Draw, StepOut

Schedule = Literal["linear", "cosine"]


class MaskedProcess:
    """Absorbing-state forward masking and the reverse unmasking step.

    Args:
        vocab_size: V, the number of token ids (the mask id included).
        mask_id: the id of the absorbing mask token.
        schedule: alpha(s): ``linear`` (1 - s) or ``cosine`` (1 - cos(pi (1 - s) / 2)).
        num_train_timesteps: N, the training timesteps 0 .. N-1 (alpha = 0 at N-1).
    """

    def __init__(self, vocab_size: int, mask_id: int, schedule: Schedule = "linear", num_train_timesteps: int = 1000):
        if schedule not in ("linear", "cosine"):
            raise ValueError(f"unknown masking schedule {schedule!r}; choose linear or cosine")
        if not 0 <= mask_id < vocab_size:
            raise ValueError(f"mask id {mask_id} outside the vocabulary of size {vocab_size}")
        self.vocab_size, self.mask_id, self.schedule = int(vocab_size), int(mask_id), schedule
        self.num_train_timesteps = int(num_train_timesteps)

    # ------------------------------------------------------------------ schedule

    def alpha(self, t: int | Tensor) -> Tensor:
        """alpha_t (float64): the probability a token is unmasked at t; t = -1 gives 1."""
        s = (torch.as_tensor(t, dtype=torch.float64) + 1) / self.num_train_timesteps
        s = s.clamp(0.0, 1.0)
        return 1 - s if self.schedule == "linear" else 1 - torch.sin(s * (math.pi / 2))  # = 1 - cos(pi (1 - s) / 2)

    def timesteps(self, n: int) -> list[int]:
        """The n training timesteps a sampler visits, largest (all masked) first, evenly spaced."""
        N = self.num_train_timesteps
        if not 1 <= n <= N:
            raise ValueError(f"num_inference_steps must be in [1, {N}], got {n}")
        return [int(t) for t in np.round(np.arange(N, 0, -N / n)).astype(np.int64) - 1]

    @staticmethod
    def prev_timesteps(ts: list[int]) -> list[int]:
        """The timestep after each step: the next one in ``ts``, and -1 (clean) after the last."""
        return ts[1:] + [-1]

    def elbo_weight(self, t: Tensor) -> Tensor:
        """N (alpha_{t-1} - alpha_t) / (1 - alpha_t): the discrete-time ELBO weight of the
        masked-token cross-entropy at t when t is drawn uniformly (MDLM eq. 10, MD4 eq. 5;
        1 / s for the linear schedule)."""
        a, ap = self.alpha(t), self.alpha(t - 1)
        return (self.num_train_timesteps * (ap - a) / (1 - a)).float()

    # ------------------------------------------------------------------ randomness

    @staticmethod
    def is_stochastic(eta: float) -> bool:
        """Every step draws tokens, whatever eta (eta is ignored)."""
        return True

    def prior(self, shape: tuple[int, ...], generator: torch.Generator | None = None) -> Tensor:
        """x_T for one sample of ``shape`` (L,): every token masked (no randomness)."""
        return torch.full(shape, self.mask_id, dtype=torch.long)

    @staticmethod
    def tokens(x: Tensor) -> Tensor:
        """The token ids [B, L] of a state: ids [B, L] themselves, or the argmax of probabilities [B, L, V]."""
        return x.argmax(-1) if x.is_floating_point() else x

    def noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """The randomness of one step for states ``x`` [B, L] (or [B, L, V]): uniform numbers [B, L, V]."""
        device = "cpu" if generator is None else generator.device
        shape = tuple(self.tokens(x).shape) + (self.vocab_size,)
        return torch.rand(shape, generator=generator, device=device).to(x.device)

    @staticmethod
    def draw(mean: Tensor, std: Tensor, noise: Tensor) -> Tensor:
        """Tokens [B, L] drawn from the categorical ``mean`` [B, L, V] with uniform ``noise``
        [B, L, V]: argmax(log p + g), g = -log(-log u) Gumbel (``std`` is unused)."""
        return gumbel_max(mean.float().log(), gumbel_noise(noise.to(mean.device)))

    def relax(self, out: StepOut, x_t: Tensor, noise: Tensor, draw: Draw) -> StepOut:
        """The step ``out`` with its tokens picked by ``draw`` from the same ``noise``: the
        relaxation softmax((log p + g) / tau) or the straight-through one-hot (see
        :mod:`rewardiff.categorical`), [B, L, V], where x_t is masked; x_t's own rows (and
        their gradient) elsewhere (carry-over). The argmax is ``out.prev``, and so is the
        log-probability."""
        if draw.kind == "hard":
            return out
        y = RELAXATIONS[draw.kind](out.mean.clamp(min=TINY).log(), gumbel_noise(noise.to(out.mean.device)), draw.tau)
        ids = self.tokens(x_t)
        rows = x_t if x_t.is_floating_point() else F.one_hot(ids, self.vocab_size).to(y)
        return out._replace(prev=torch.where((ids == self.mask_id).unsqueeze(-1), y, rows))

    # ------------------------------------------------------------------ forward process

    def add_noise(self, x0: Tensor, noise: Tensor | torch.Generator | None, t: Tensor | int) -> Tensor:
        """x_t: each token of x0 [B, L] replaced by the mask with prob 1 - alpha_t.

        Args:
            x0: clean token ids [B, L].
            noise: uniform numbers [B, L] (a token is masked where u < 1 - alpha_t), or a
                generator (or None: the global one) to draw them from.
            t: timesteps [B] or one int.
        """
        if not isinstance(noise, Tensor):
            noise = torch.rand(x0.shape, generator=noise, device="cpu" if noise is None else noise.device)
        a = self.alpha(t).float().to(x0.device).reshape(-1, *([1] * (x0.dim() - 1)))
        return torch.where(noise.to(x0.device) < 1 - a, torch.full_like(x0, self.mask_id), x0)

    def split(self, model_out: Tensor, x_t: Tensor, t: int | Tensor) -> tuple[Tensor, None]:
        """(x0_hat, None): x0_hat [B, L, V] the predicted clean-token probabilities from the
        logits ``model_out`` [B, L, V] (the mask logit set to -inf), one-hot at the token on
        unmasked positions (carry-over)."""
        logits = model_out.float().clone()
        logits[..., self.mask_id] = -math.inf
        probs = logits.softmax(-1)
        ids = self.tokens(x_t)
        keep = F.one_hot(ids, self.vocab_size).to(probs)
        return torch.where((ids == self.mask_id).unsqueeze(-1), probs, keep), None

    # ------------------------------------------------------------------ reverse step

    def transition(self, model_out: Tensor, t: int, t_prev: int, x_t: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 1-3 of :meth:`step`: (x0_hat [B, L, V], the transition's probabilities [B, L, V])."""
        B, L = self.tokens(x_t).shape
        assert model_out.shape == (B, L, self.vocab_size), (model_out.shape, (B, L, self.vocab_size))
        # 1. the schedule at both ends
        a, a_s = self.alpha(t), self.alpha(t_prev)
        stay = float((1 - a_s) / (1 - a))
        # 2. predicted clean tokens, carried over where unmasked
        x0_hat, _ = self.split(model_out, x_t, t)
        # 3. the transition's probabilities over the V outcomes
        e_mask = F.one_hot(torch.tensor(self.mask_id), self.vocab_size).to(x0_hat)
        masked = (self.tokens(x_t) == self.mask_id).unsqueeze(-1)
        return x0_hat, torch.where(masked, (1 - stay) * x0_hat + stay * e_mask, x0_hat)

    def step(self, model_out: Tensor, t: int, t_prev: int, x_t: Tensor, eta: float = 1.0, noise: Tensor | None = None) -> StepOut:
        """One unmasking step x_t -> x_{t_prev} (MDLM eq. 7 with carry-over; D3PM absorbing).

        1. alpha_t and alpha_s at both ends of the step (s = t_prev; alpha_{-1} = 1).
        2. x0_hat = softmax(logits) with the mask logit at -inf; unmasked positions one-hot.
        3. For a masked token: p(x_s = m) = (1 - alpha_s) / (1 - alpha_t) and
           p(x_s = v) = (alpha_s - alpha_t) / (1 - alpha_t) * x0_hat[v], v != m;
           an unmasked token stays: p(x_s = x_t) = 1. At the last step (alpha_s = 1) every
           mask is filled.
        4. Draw x_s from these probabilities (Gumbel-max on ``noise``, uniform [B, L, V];
           drawn here when None) and take log p(x_s | x_t), summed over positions.

        Args:
            model_out: logits [B, L, V] at x_t.
            t, t_prev: training timesteps of x_t and x_s (-1: clean).
            x_t: token ids [B, L] (or token probabilities [B, L, V]: their argmax).
            eta: ignored; the step is always stochastic.
            noise: uniform numbers [B, L, V] (see :meth:`noise_like`).

        Returns:
            StepOut(prev [B, L], x0_hat [B, L, V], mean [B, L, V], std = 1, log_prob [B]).
        """
        x0_hat, mean = self.transition(model_out, t, t_prev, x_t)  # 1.-3.
        # 4. the draw and its log-probability
        std = torch.ones((), device=x_t.device)
        noise = self.noise_like(x_t) if noise is None else noise
        prev = self.draw(mean, std, noise)
        return StepOut(prev, x0_hat, mean, std, self.log_prob(prev, mean, std))

    def divergence(self, model_out: Tensor, ref_out: Tensor, x_t: Tensor, t: int, t_prev: int) -> Tensor:
        """KL(p_theta(x_s | x_t) || p_ref(x_s | x_t)) of the two models' transition probabilities
        (logits ``model_out`` and ``ref_out`` [B, L, V] at x_t), summed over positions [B]."""
        _, p = self.transition(model_out, t, t_prev, x_t)
        _, q = self.transition(ref_out, t, t_prev, x_t)
        return probs_kl(p, q).sum(1)

    @staticmethod
    def log_prob(x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """log p(x | x_t) = sum over positions of log mean[x] for tokens x [B, L] -> [B]."""
        return mean.gather(-1, x.long().unsqueeze(-1)).squeeze(-1).log().sum(1)
