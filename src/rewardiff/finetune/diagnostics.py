"""The fine-tuned model's distance from its base model, along the sampling chain.

For two samplers with Gaussian steps that share the step variance sigma_t^2 (DDIM with eta > 0,
the flow SDE or CPS; ``process.step_std``), the KL divergence of one step's transitions is
||mu_theta - mu_base||^2 / (2 sigma_t^2), and the KL of the path measures is the expectation,
over the fine-tuned model's own trajectories, of the sum over steps. :class:`KLMeter` measures
that sum during an ordinary rollout (a guidance hook that changes nothing). A deterministic step
(sigma = 0: DDIM's last one when abar after it is 1, CPS's into the clean sample) has no finite
KL; it is read with the smallest non-zero variance of the chain instead (:func:`step_variances`),
which VARD's penalty shares.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewardiff.models.base import DiffusionModel
from rewardiff.rollout import guided_output
from rewardiff.types import StepContext, Timestep


def step_variances(model: DiffusionModel, timesteps: list[Timestep], eta: float) -> list[float]:
    """sigma_t^2 of each step at ``eta``, a zero variance replaced by the chain's smallest non-zero one."""
    prevs = model.process.prev_timesteps(timesteps)
    var = [float(model.process.step_std(t, tp, eta)) ** 2 for t, tp in zip(timesteps, prevs)]
    floor = min((v for v in var if v > 0), default=1.0)
    return [v if v > 0 else floor for v in var]


def step_kl(mean: Tensor, ref_mean: Tensor, var: float) -> Tensor:
    """KL(N(mean, var I) || N(ref_mean, var I)) per sample: ||mean - ref_mean||^2 / (2 var). [B, ...] -> [B]"""
    return ((mean - ref_mean) ** 2).flatten(1).sum(1) / (2 * var)


class KLMeter:
    """A rollout hook summing the per-step KL to a reference model over the chain; it never
    changes the particles.

    Args:
        model: the model being sampled (its process gives the step means).
        reference: the frozen base denoiser.
        uncond: the unconditional condition of the batch (None without CFG).
        guidance_scale: the CFG scale of both models.
        eta: the sampler's eta (> 0), the same for both models.
        variances: per-step sigma^2 from :func:`step_variances`.

    After the rollout, ``kl`` holds the per-sample sum [B] and ``nfe`` the reference's evaluations.
    """

    def __init__(self, model: DiffusionModel, reference, uncond, guidance_scale: float, eta: float, variances: list[float]):
        self.model, self.reference, self.uncond, self.scale, self.eta = model, reference, uncond, guidance_scale, eta
        self.variances = variances
        self.nfe = 0
        self.kl: Tensor | None = None

    def __call__(self, ctx: StepContext) -> None:
        with torch.no_grad():
            ref_out, n = guided_output(self.reference, ctx.x_t, ctx.t, ctx.cond, self.uncond, self.scale)
            ref = self.model.process.step(ref_out, ctx.t, ctx.t_prev, ctx.x_t, self.eta, torch.zeros_like(ctx.x_t))
            kl = step_kl(ctx.out.mean, ref.mean, self.variances[ctx.index])
        self.nfe += n * ctx.x_t.shape[0]
        self.kl = kl if self.kl is None else self.kl + kl
        return None


@torch.no_grad()
def kl_to_base(model: DiffusionModel, prompts: list[str], seeds: list[int], num_inference_steps: int, guidance_scale: float,
               eta: float = 1.0, batch_size: int = 64, progress=None) -> Tensor:
    """Per-sample KL of the fine-tuned sampler's path to the base model's [N] (zeros without a
    reference); ``progress(k)`` after each batch of k, when given."""
    if model.reference is None:
        return torch.zeros(len(prompts))
    variances = step_variances(model, model.process.timesteps(num_inference_steps), eta)
    out = []
    for i in range(0, len(prompts), batch_size):
        p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
        uncond = model.encode(model.unconditional(p)) if guidance_scale != 1.0 else None
        meter = KLMeter(model, model.reference, uncond, guidance_scale, eta, variances)
        model.sample(p, s, num_inference_steps, eta=eta, guidance_scale=guidance_scale, hook=meter)
        out.append(meter.kl.cpu())
        if progress is not None:
            progress(len(p))
    return torch.cat(out)
