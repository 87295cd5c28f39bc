"""Score distillation sampling (SDS), for every continuous process of rewardiff.

DreamFusion (Poole et al. 2022, arXiv 2209.14988, eq. 3): render x = g(theta), noise it to
x_t = add_noise(x, eps, t) at a random t, and push

    grad_theta L_SDS = E_{t, eps} [ w(t) (eps_hat(x_t, t, y) - eps) dx/dtheta ]

back through the render only, skipping the denoiser's Jacobian. eps_hat is the classifier-free
guided noise estimate, with the large scales SDS needs (DreamFusion: 100).

The process turns the model's output into (x0_hat, eps_hat) (``Process.split``), so the same
gradient serves an epsilon-, v- or x0-predicting DDIM model and a velocity-predicting flow
model: nothing here asks which one it has. For a flow model x_t = (1 - sigma) x + sigma eps and
eps_hat - eps = (1 - sigma) (v_hat - v), the velocity error scaled to the noise.

The weight w(t) is DreamFusion's sigma_t^2, the variance of the noise in x_t relative to the
whole: written through the signal-to-noise ratio as w = 1 / (1 + snr(t)), which is 1 - abar_t
for a DDIM process (DreamFusion's own) and sigma^2 / ((1 - sigma)^2 + sigma^2) for a flow one.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rewardiff.rollout import _cat_cond

WEIGHTINGS = ("sds", "uniform")


def weight(process: Any, t: Tensor, weighting: str = "sds") -> Tensor:
    """w(t) per timestep [B] (float32): ``sds`` 1 / (1 + snr(t)) (DreamFusion's sigma_t^2), ``uniform`` 1."""
    if weighting == "uniform":
        return torch.ones(t.shape, dtype=torch.float32)
    if weighting != "sds":
        raise ValueError(f"unknown weighting {weighting!r}; choose {' or '.join(WEIGHTINGS)}")
    snr = process.snr(t).double()
    return (1.0 / (1.0 + snr)).float()


def t_range_at(step: int, steps: int, t_min: float, t_max: float, anneal_to: float | None) -> tuple[float, float]:
    """The range of noise fractions SDS draws from at ``step`` of ``steps``: [t_min, t_max], with
    the upper end annealed linearly down to ``anneal_to`` over the run when given (DreamFusion
    draws U(0.02, 0.98); later work anneals the upper end so that late steps refine detail)."""
    if anneal_to is None or steps <= 1:
        return t_min, t_max
    frac = min(max(step / (steps - 1), 0.0), 1.0)
    hi = t_max + (anneal_to - t_max) * frac
    return t_min, max(hi, t_min)


def sds_gradient(
    model: Any,
    x: Tensor,
    cond: Any,
    uncond: Any,
    tau: Tensor,
    noise: Tensor,
    guidance_scale: float,
    weighting: str = "sds",
) -> tuple[Tensor, dict[str, float]]:
    """The SDS gradient with respect to ``x`` (samples in the net's space [B, ...]), detached.

    Args:
        model: a :class:`~rewardiff.models.base.DiffusionModel` (its ``net`` and ``process``).
        x: the renders in the net's space (latents for a latent model), [B, ...].
        cond / uncond: the encoded prompts and their unconditional ones (``uncond`` unused at
            ``guidance_scale`` 1).
        tau: noise fractions [B] in [0, 1] (``process.at_fraction`` turns them into timesteps).
        noise: the noise eps [B, ...], standard normal.
        guidance_scale: classifier-free guidance scale s: out = out_u + s (out_c - out_u).

    Returns:
        (w(t) (eps_hat - eps), stats): the gradient [B, ...] and its mean timestep fraction and norm.
    """
    process = model.process
    t = process.at_fraction(tau).to(x.device)
    with torch.no_grad():
        x = x.detach()
        x_t = process.add_noise(x, noise, t)
        if guidance_scale == 1.0:
            out = model.net(x_t, t, cond)
        else:
            both = model.net(torch.cat([x_t, x_t]), torch.cat([t, t]), _cat_cond(uncond, cond))
            out_u, out_c = both.chunk(2)
            out = out_u + guidance_scale * (out_c - out_u)
        _, eps_hat = process.split(out, x_t, t)
        w = weight(process, t.cpu(), weighting).to(x)
        grad = w.view(-1, *([1] * (x.dim() - 1))) * (eps_hat - noise)
    stats = {"t": float(tau.float().mean()), "grad_norm": float(grad.flatten(1).norm(dim=1).mean())}
    if not math.isfinite(stats["grad_norm"]):
        from rewardiff.errors import NonFiniteError

        raise NonFiniteError(f"the SDS gradient is not finite (t fraction {stats['t']:.3f})")
    return grad, stats


def sds_loss(x: Tensor, grad: Tensor) -> Tensor:
    """A scalar whose gradient with respect to ``x`` is ``grad`` / B (the reparameterisation of
    DreamFusion's appendix: the denoiser's Jacobian is not differentiated)."""
    return (grad.detach() * x).flatten(1).sum(1).mean()

