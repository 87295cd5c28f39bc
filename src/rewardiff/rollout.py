"""THE sampling loop. Every sampler, fine-tuning method and guidance method runs through here.

One loop, with these as arguments rather than copies of it:
    - classifier-free guidance (``guidance_scale`` and an unconditional ``uncond``),
    - a gradient window (``grad_steps``): steps outside it run under ``torch.no_grad``,
      so gradients reach the parameters only through the steps inside (truncated backprop,
      DRaFT-K, AlignProp),
    - gradient checkpointing of each step inside the window (memory flat in the number of
      steps: activations are recomputed in the backward pass),
    - an optional frozen ``reference`` model whose outputs give a penalty, the process's
      ``divergence`` (DRaFT+'s squared distance; the transition KL of masked diffusion),
    - how a categorical step's tokens are drawn (``draw``): hard ids, or their Gumbel-softmax
      relaxation or straight-through one-hot, so reward gradients pass through the draws,
    - a guidance ``hook`` called after every step, which may shift the particles or select
      a new set of them (best-of-N, SVDD, DSearch, SMC all run here, not in loops of their own),
    - exact counting of denoiser evaluations (NFE) per batch element.
"""

from __future__ import annotations

import copy
from collections.abc import Collection, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint as _checkpoint

from rewardiff.types import Denoiser, Draw, Process, Selection, StepContext, StepHook, StepOut, Timestep, Trajectory


def _cat_cond(uncond: Any, cond: Any) -> Any:
    if isinstance(cond, Tensor):
        return torch.cat([uncond, cond])
    if isinstance(cond, dict):
        return {k: _cat_cond(uncond[k], v) for k, v in cond.items()}
    raise TypeError(f"cannot batch a condition of type {type(cond).__name__}")


def evaluations_per_call(guidance_scale: float) -> int:
    """NFE per batch element of one denoiser call: 2 with classifier-free guidance, else 1."""
    return 1 if guidance_scale == 1.0 else 2


def timestep_batch(t: Timestep, n: int, device: Any) -> Tensor:
    """One timestep for ``n`` rows, as the denoiser reads it: long [n] for an integer
    timestep, float32 [n] for a float one (a flow process's N sigma)."""
    if torch.as_tensor(t).is_floating_point():
        return torch.full((n,), float(t), device=device, dtype=torch.float32)
    return torch.full((n,), int(t), device=device, dtype=torch.long)


def timestep_tensor(ts: list[Timestep]) -> Tensor:
    """Timesteps as one tensor [T]: long for integer timesteps, float32 for float ones."""
    floats = any(torch.as_tensor(t).is_floating_point() for t in ts)
    return torch.tensor([float(t) for t in ts]) if floats else torch.tensor([int(t) for t in ts], dtype=torch.long)


def plain_timestep(t: Timestep) -> Timestep:
    """A timestep as a plain Python int or float (for JSON)."""
    return float(t) if torch.as_tensor(t).is_floating_point() else int(t)


def guided_output(model: Denoiser, x: Tensor, t: Timestep, cond: Any, uncond: Any | None, scale: float) -> tuple[Tensor, int]:
    """The (classifier-free guided) model output at (x, t) and its NFE per batch element.

    With ``uncond`` and ``scale != 1``: out_u + scale * (out_c - out_u) from one batched
    call on [uncond; cond] (2 NFE per element); otherwise one plain call (1 NFE).
    """
    tt = timestep_batch(t, x.shape[0], x.device)
    if uncond is None or scale == 1.0:
        return model(x, tt, cond), 1
    out_u, out_c = model(torch.cat([x, x]), torch.cat([tt, tt]), _cat_cond(uncond, cond)).chunk(2)
    return out_u + scale * (out_c - out_u), 2


def rollout(
    model: Denoiser,
    process: Process,
    x_T: Tensor,
    cond: Any,
    timesteps: list[Timestep],
    *,
    eta: float | Sequence[float] = 0.0,
    guidance_scale: float = 1.0,
    uncond: Any | None = None,
    grad_steps: Collection[int] = (),
    checkpoint: bool = True,
    reference: Denoiser | None = None,
    hook: StepHook | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    keep_states: bool = False,
    prompts: list[str] | None = None,
    t_final: Timestep | None = None,
    draw: Draw | None = None,
) -> Trajectory:
    """Run the reverse process from ``x_T`` through ``timesteps`` (largest first).

    Args:
        model: the denoiser ``model(x_t, t[B], cond) -> prediction``.
        process: the diffusion math (DDIM steps, flow steps, or masked-diffusion unmasking steps).
        x_T: the starting particles [B, ...] (pure noise, or a re-noised sample).
        cond: the model condition for the batch; ``uncond`` the unconditional one.
        timesteps: training timesteps to visit, in sampling order (from ``process.timesteps``).
        eta: the step's stochasticity, 0 deterministic (DDIM, the flow ODE); DDIM's eta up to
            1 (DDPM-like), the flow SDE's noise scale. One number for every step, or one per
            step (:func:`step_etas`): an SDE window inside an ODE chain (Flow-GRPO-Fast, MixGRPO).
        guidance_scale: classifier-free guidance scale (1 disables it).
        grad_steps: indices (0 .. T-1, sampling order) of steps that carry gradient.
        checkpoint: recompute each gradient step's activations in the backward pass.
        reference: frozen model for the KL-style penalty on gradient steps.
        hook: a guidance method called after every step; it may shift the particles or
            select a new set of them (:class:`~rewardiff.types.Selection`).
        generator: random source of the step noise (``process.noise_like``; eta > 0 for a
            Gaussian process, always for a masked one): one generator for the batch, or one
            per particle (then a particle's noise does not depend on the rest of the batch).
        keep_states: return every state x_T ... x_0 in ``Trajectory.xs``.
        prompts: the batch's prompts, passed on to the hook.
        t_final: timestep after the last step (None: the clean sample, as
            ``process.prev_timesteps`` ends a chain).
        draw: how a categorical process picks each step's tokens (``process.relax``); None
            or ``hard`` keeps the process's own draw. A relaxed or straight-through chain
            carries token probabilities [B, L, V] as its states, so ``model`` must read them
            (e.g. :class:`~rewardiff.finetune.gumbel.SoftTokenInputs`).

    When a hook selects particles, the batch of the returned trajectory is the final
    particle set and the kept history (``xs``, ``log_probs``, ``kl``) follows each particle's
    ancestry.
    """
    if draw is not None and draw.kind != "hard" and not hasattr(process, "relax"):
        raise ValueError(f"a {draw.kind} draw needs a categorical process; {type(process).__name__} has none")
    x = x_T
    B = x.shape[0]
    T = len(timesteps)
    prevs = process.prev_timesteps(timesteps) if t_final is None else list(timesteps[1:]) + [t_final]
    log_probs, xs = [], [x_T] if keep_states else []
    kl = torch.zeros(B, device=x.device)
    prompts = list(prompts) if prompts is not None else [""] * B
    particles = _Particles(cond, uncond, prompts, generator)
    counter = [0]
    needs_grad = bool(getattr(hook, "needs_grad", False))
    cached: Tensor | None = None
    etas = step_etas(eta, T)
    for i, (t, t_prev) in enumerate(zip(timesteps, prevs)):
        noise = particles.noise(x, process) if process.is_stochastic(etas[i]) else None
        step = _Step(model, process, particles.cond, particles.uncond, guidance_scale, t, t_prev, etas[i], reference, draw)
        if i in grad_steps:
            ref_out = step.reference_output(x) if reference is not None else None
            res = _checkpointed(step, x, noise, ref_out) if checkpoint else step(x, noise, ref_out)
            kl = kl + res[-1]
        elif hook is not None and needs_grad:
            with torch.enable_grad():
                x = x.detach().requires_grad_(True)
                res = step(x, noise, None, cached)
        else:
            with torch.no_grad():
                res = step(x.detach(), noise, None, cached)
        out, n = res[0], res[1]
        counter[0] += n * x.shape[0] + step.ref_nfe * x.shape[0]
        cached = None
        if hook is not None:
            predict = _Predictor(model, process, particles.cond, particles.uncond, guidance_scale, counter)
            ctx = StepContext(i, t, t_prev, x, out, particles.cond, particles.prompts, predict, noise, T)
            answer = hook(ctx)
            if isinstance(answer, Selection):
                parents = answer.parents.to(x.device)
                out = _reselect(process, out, answer.prev, parents)
                particles.select(parents, i)
                log_probs = [lp[parents] for lp in log_probs]
                xs = [s[parents] for s in xs]
                kl = kl[parents]
                cached = answer.model_out
            elif answer is not None:
                out = _reselect(process, out, answer, None)
        x = out.prev.detach() if needs_grad and i not in grad_steps else out.prev
        log_probs.append(out.log_prob.detach() if needs_grad and i not in grad_steps else out.log_prob)
        if keep_states:
            xs.append(x)
    nfe = counter[0] + (hook.nfe if hook is not None else 0)
    return Trajectory(x, xs, torch.stack(log_probs, 1), list(timesteps), nfe, kl)


def _checkpointed(step: "_Step", x: Tensor, noise: Tensor | None, ref_out: Tensor | None) -> tuple[StepOut, int, Tensor]:
    """One step of the gradient window, its activations recomputed in the backward pass.

    Every step is checkpointed with torch's reentrant variant: its forward runs without
    recording a graph, so the chain keeps one autograd node a step. The non-reentrant variant
    records a node for every operation of the denoiser, about 0.7 MB a step on the shapes
    model, which made a 50-step window cost 2x the memory of one step (``benchmarks/memory.py``).
    The reentrant variant gives the parameters gradients only through inputs that need one, so
    the window's first state, which needs none, enters as a fresh leaf that does (its gradient
    is computed and dropped: one input gradient a window). The conditions are passed as
    inputs, so that a trained text encoder's graph is walked once, not once a step.

    The reentrant variant accumulates the parameters' gradients in a backward pass of its own
    per step; DDP does not allow that for parameters several steps use, so under a process
    group every step takes the non-reentrant variant, as does a step on token ids (no float
    state to make a leaf of).
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed or not x.is_floating_point():
        return _checkpoint(step, x, noise, ref_out, use_reentrant=False)
    if not x.requires_grad:
        x = x.detach().requires_grad_(True)
    flat, rebuild = _flatten_conditions(step.cond, step.uncond)
    meta: dict[str, Any] = {}

    def run(x: Tensor, noise: Tensor | None, ref_out: Tensor | None, *conds: Tensor):
        inner = copy.copy(step)
        inner.cond, inner.uncond = rebuild(conds)
        out, n, kl = inner(x, noise, ref_out)
        meta["n"], meta["std"] = n, out.std
        return out.prev, out.x0_hat, out.mean, out.log_prob, kl

    prev, x0_hat, mean, log_prob, kl = _checkpoint(run, x, noise, ref_out, *flat, use_reentrant=True)
    return StepOut(prev, x0_hat, mean, meta["std"], log_prob), meta["n"], kl


def _flatten_conditions(cond: Any, uncond: Any):
    """The tensors of two conditions (tensors, dicts of tensors or None) as one flat list, and
    the function that rebuilds the pair from such a list."""
    def parts(c: Any) -> list:
        if isinstance(c, Tensor):
            return [c]
        if isinstance(c, dict):
            return [c[k] for k in sorted(c)]
        return []

    def build(c: Any, items: list) -> Any:
        if isinstance(c, Tensor):
            return items[0]
        if isinstance(c, dict):
            return dict(zip(sorted(c), items))
        return c

    a, b = parts(cond), parts(uncond)

    def rebuild(flat: tuple) -> tuple[Any, Any]:
        return build(cond, list(flat[: len(a)])), build(uncond, list(flat[len(a):]))

    return a + b, rebuild


def _reselect(process: Process, out: StepOut, prev: Tensor, parents: Tensor | None) -> StepOut:
    """The step's output for replacement particles ``prev`` descending from rows ``parents``.

    The log-probability is the base transition's density of the new particle given its
    parent (zeros for a deterministic step).
    """
    x0_hat, mean = (out.x0_hat, out.mean) if parents is None else (out.x0_hat[parents], out.mean[parents])
    if float(out.std) == 0.0:
        lp = torch.zeros(prev.shape[0], dtype=prev.dtype, device=prev.device)
    else:
        lp = process.log_prob(prev, mean, out.std)
    return StepOut(prev, x0_hat, mean, out.std, lp)


def gather_rows(c: Any, rows: Tensor) -> Any:
    """Rows ``rows`` [N] of a condition (a tensor, or a dict of them); None stays None."""
    if c is None:
        return None
    if isinstance(c, Tensor):
        return c[rows.to(c.device)]
    if isinstance(c, dict):
        return {k: gather_rows(v, rows) for k, v in c.items()}
    raise TypeError(f"cannot select rows of a condition of type {type(c).__name__}")


class _Particles:
    """The per-particle state that follows a particle through selections: condition,
    unconditional condition, prompt and noise stream."""

    def __init__(self, cond: Any, uncond: Any, prompts: list[str], generator):
        self.cond, self.uncond, self.prompts = cond, uncond, prompts
        self.gens = generator

    def noise(self, like: Tensor, process: Process) -> Tensor:
        """The step's noise for particles ``like`` [B, ...], as ``process.noise_like`` draws it."""
        g = self.gens
        if isinstance(g, list):
            if len(g) != like.shape[0]:
                raise ValueError(f"{len(g)} generators for {like.shape[0]} particles")
            return torch.cat([process.noise_like(like[i : i + 1], gi) for i, gi in enumerate(g)])
        return process.noise_like(like, g)

    def select(self, parents: Tensor, step: int) -> None:
        rows = parents.cpu()
        self.cond, self.uncond = gather_rows(self.cond, parents), gather_rows(self.uncond, parents)
        self.prompts = [self.prompts[int(r)] for r in rows]
        if isinstance(self.gens, list):
            gens, copies = [], {}
            for r in rows.tolist():
                k = copies[r] = copies.get(r, -1) + 1
                if k == 0:
                    gens.append(self.gens[r])  # the first keeps its stream, untouched
                else:  # a copy: a fresh stream named by (parent's seed, step, copy number)
                    parent = self.gens[r]
                    seed = (parent.initial_seed() * 6364136223846793005 + (step + 1) * 1442695040888963407 + k) % 2**63
                    gens.append(torch.Generator(device=parent.device).manual_seed(seed))
            self.gens = gens


class _Predictor:
    """``ctx.predict``: the guided denoiser at arbitrary states, counting every evaluation."""

    chunk = 256

    def __init__(self, model, process, cond, uncond, scale, counter: list[int]):
        self.model, self.process, self.cond, self.uncond, self.scale = model, process, cond, uncond, scale
        self.counter = counter

    def __call__(self, x: Tensor, t: Timestep, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        if rows is None:
            rows = torch.arange(x.shape[0], device=x.device)
        outs = []
        for i in range(0, x.shape[0], self.chunk):  # bounded memory however many candidates
            r = rows[i : i + self.chunk]
            out, n = guided_output(self.model, x[i : i + self.chunk], t, gather_rows(self.cond, r), gather_rows(self.uncond, r), self.scale)
            self.counter[0] += n * r.shape[0]
            outs.append(out)
        out = torch.cat(outs)
        x0_hat, _ = self.process.split(out, x, t)
        return out, x0_hat


class _Step:
    """One guided reverse step as a function of (x_t, noise), the unit of checkpointing."""

    def __init__(self, model, process, cond, uncond, scale, t, t_prev, eta, reference, draw=None):
        self.model, self.process, self.cond, self.uncond, self.scale = model, process, cond, uncond, scale
        self.t, self.t_prev, self.eta, self.reference, self.draw = t, t_prev, eta, reference, draw
        self.ref_nfe = 0

    def reference_output(self, x: Tensor) -> Tensor:
        with torch.no_grad():
            out, n = guided_output(self.reference, x.detach(), self.t, self.cond, self.uncond, self.scale)
        self.ref_nfe = n
        return out

    def __call__(self, x: Tensor, noise: Tensor | None, ref_out: Tensor | None, cached: Tensor | None = None):
        if cached is not None:  # a hook already evaluated the denoiser at exactly (x, t)
            model_out, n = cached, 0
        else:
            model_out, n = guided_output(self.model, x, self.t, self.cond, self.uncond, self.scale)
        out = self.process.step(model_out, self.t, self.t_prev, x, self.eta, noise)
        if self.draw is not None:
            out = self.process.relax(out, x, noise, self.draw)
        if ref_out is None:
            return out, n, torch.zeros(x.shape[0], device=x.device)
        return out, n, self.process.divergence(model_out, ref_out, x, self.t, self.t_prev)


def step_etas(eta: float | Sequence[float], num_steps: int) -> list[float]:
    """The eta of each of ``num_steps`` steps: one number repeated, or a per-step schedule of
    exactly that length (a ValueError otherwise)."""
    if isinstance(eta, (int, float)):
        return [float(eta)] * num_steps
    etas = [float(e) for e in eta]
    if len(etas) != num_steps:
        raise ValueError(f"an eta schedule needs one value per step: {num_steps} steps, {len(etas)} values")
    return etas


def any_stochastic(process: Process, eta: float | Sequence[float], num_steps: int) -> bool:
    """Whether any step of the chain draws noise."""
    return any(process.is_stochastic(e) for e in step_etas(eta, num_steps))


def last_k(num_steps: int, k: int) -> range:
    """Indices of the last ``k`` of ``num_steps`` steps (the DRaFT-K gradient window)."""
    if not 0 <= k <= num_steps:
        raise ValueError(f"k must be in [0, {num_steps}], got {k}")
    return range(num_steps - k, num_steps)

