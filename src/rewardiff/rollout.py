"""THE sampling loop. Every sampler, fine-tuning method and guidance method runs through here.

One loop, with these as arguments rather than copies of it:
    - classifier-free guidance (``guidance_scale`` and an unconditional ``uncond``),
    - a gradient window (``grad_steps``): steps outside it run under ``torch.no_grad``,
      so gradients reach the parameters only through the steps inside (truncated backprop,
      DRaFT-K, AlignProp),
    - gradient checkpointing of each step inside the window (memory flat in the number of
      steps: activations are recomputed in the backward pass),
    - an optional frozen ``reference`` model whose outputs give a KL-style penalty (DRaFT+),
    - a guidance ``hook`` called after every step,
    - exact counting of denoiser evaluations (NFE) per batch element.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from rewardiff.processes.gaussian import GaussianProcess
from rewardiff.types import Denoiser, StepContext, StepHook, Trajectory


def _cat_cond(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        return {k: _cat_cond(uncond[k], v) for k, v in cond.items()}
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__}")


def guided_output(model: Denoiser, x: Tensor, t: int, cond: Any, uncond: Any | None, scale: float) -> tuple[Tensor, int]:
    """The (classifier-free guided) model output at (x, t) and its NFE per batch element.

    With ``uncond`` and ``scale != 1``: out_u + scale * (out_c - out_u) from one batched
    call on [uncond; cond] (2 NFE per element); otherwise one plain call (1 NFE).
    """
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=torch.long)
    if uncond is None or scale == 1.0:
        return model(x, tt, cond), 1
    out_u, out_c = model(torch.cat([x, x]), torch.cat([tt, tt]), _cat_cond(uncond, cond)).chunk(2)
    return out_u + scale * (out_c - out_u), 2


def rollout(
    model: Denoiser,
    process: GaussianProcess,
    x_T: Tensor,
    cond: Any,
    timesteps: list[int],
    *,
    eta: float = 0.0,
    guidance_scale: float = 1.0,
    uncond: Any | None = None,
    grad_steps: Collection[int] = (),
    checkpoint: bool = True,
    reference: Denoiser | None = None,
    hook: StepHook | None = None,
    generator: torch.Generator | None = None,
    keep_states: bool = False,
    prompts: list[str] | None = None,
    t_final: int = -1,
) -> Trajectory:
    """Run the reverse process from ``x_T`` through ``timesteps`` (largest first).

    Args:
        model: the denoiser ``model(x_t, t[B], cond) -> prediction``.
        process: the diffusion math (DDIM steps).
        x_T: the starting state [B, ...] (pure noise, or a re-noised sample).
        cond: the model condition for the batch; ``uncond`` the unconditional one.
        timesteps: training timesteps to visit, in sampling order.
        eta: DDIM stochasticity, 0 (deterministic) to 1 (DDPM-like).
        guidance_scale: classifier-free guidance scale (1 disables it).
        grad_steps: indices (0 .. T-1, sampling order) of steps that carry gradient.
        checkpoint: recompute each gradient step's activations in the backward pass.
        reference: frozen model for the KL-style penalty on gradient steps.
        hook: a guidance method called after every step.
        generator: random source of the eta > 0 noise.
        keep_states: return every state x_T ... x_0 in ``Trajectory.xs``.
        prompts: the batch's prompts, passed on to the hook.
        t_final: timestep after the last step (-1: the clean sample).
    """
    x = x_T
    B = x.shape[0]
    prevs = timesteps[1:] + [t_final]
    log_probs, xs = [], [x_T] if keep_states else []
    kl = torch.zeros(B, device=x.device)
    nfe = 0
    for i, (t, t_prev) in enumerate(zip(timesteps, prevs)):
        noise = None
        if eta > 0:
            noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is None else generator.device).to(x.device, x.dtype)
        step = _Step(model, process, cond, uncond, guidance_scale, t, t_prev, eta, reference)
        if i in grad_steps:
            ref_out = step.reference_output(x) if reference is not None else None
            res = _checkpoint(step, x, noise, ref_out, use_reentrant=False) if checkpoint else step(x, noise, ref_out)
            kl = kl + res[-1]
        else:
            with torch.no_grad():
                res = step(x.detach(), noise, None)
        out, n = res[0], res[1]
        nfe += n * B + step.ref_nfe * B
        if hook is not None:
            replaced = hook(StepContext(i, t, t_prev, x, out, cond, prompts or []))
            out = out._replace(prev=replaced) if replaced is not None else out
        x = out.prev
        log_probs.append(out.log_prob)
        if keep_states:
            xs.append(x)
    nfe += hook.nfe if hook is not None else 0
    return Trajectory(x, xs, torch.stack(log_probs, 1), list(timesteps), nfe, kl)


class _Step:
    """One guided DDIM step as a function of (x_t, noise), the unit of checkpointing."""

    def __init__(self, model, process, cond, uncond, scale, t, t_prev, eta, reference):
        self.model, self.process, self.cond, self.uncond, self.scale = model, process, cond, uncond, scale
        self.t, self.t_prev, self.eta, self.reference = t, t_prev, eta, reference
        self.ref_nfe = 0

    def reference_output(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out, n = guided_output(self.reference, x.detach(), self.t, self.cond, self.uncond, self.scale)
        self.ref_nfe = n
        return out

    def __call__(self, x: Tensor, noise: Tensor | None, ref_out: Tensor | None):
        model_out, n = guided_output(self.model, x, self.t, self.cond, self.uncond, self.scale)
        out = self.process.step(model_out, self.t, self.t_prev, x, self.eta, noise)
        sq = ((model_out - ref_out) ** 2).flatten(1).mean(1) if ref_out is not None else torch.zeros(x.shape[0], device=x.device)
        return out, n, sq


def last_k(num_steps: int, k: int) -> range:
    """Indices of the last ``k`` of ``num_steps`` steps (the DRaFT-K gradient window)."""
    if not 0 <= k <= num_steps:
        raise ValueError(f"k must be in [0, {num_steps}], got {k}")
    return range(num_steps - k, num_steps)

