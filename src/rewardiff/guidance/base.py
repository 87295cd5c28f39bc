"""What every inference-time method shares: particles in groups, scoring, selection, budgets.

A method runs inside the one rollout loop (``rewardiff.rollout``) as a hook. The rollout
starts with ``particles`` particles per requested sample (sample-major: rows s*K .. s*K+K-1
belong to sample s); the hook may propose candidates, score them, and select a new particle
set after any step, always keeping the groups contiguous, in request order and of equal
size; by the last step it has narrowed every group to one particle, so the rollout returns
one sample per request. Denoiser evaluations the hook makes go through
``ctx.predict`` and are counted by the rollout, so NFE is exact by construction.

Costs are in NFE per sample with ``c`` evaluations a denoiser call (2 with classifier-free
guidance) and ``T`` steps; ``cost(T, c)`` states each method's formula and the tests hold the
rollout's count to it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.processes.gaussian import GaussianProcess
from rewardiff.rewards.ensemble import call
from rewardiff.types import CHAIN, Process, Reward, Selection, StepContext, missing

MAX_WIDTH = 4096
"""The largest width (best-of-n N, svdd M, ...) a method takes: candidates of one sample are
denoised in one batch, and wider would not fit a machine's memory."""


class Method:
    """Base class of guidance methods (a ``StepHook`` once :meth:`begin` has run).

    Subclasses set ``name``, ``width_name`` (what ``--width`` sets) and implement
    :meth:`cost` and :meth:`step`; ``plan`` picks the width for an NFE budget.

    Attributes:
        nfe: evaluations spent outside ``ctx.predict`` (none of ours do; kept for the
            ``StepHook`` contract).
        needs_grad: the rollout builds the step with autograd (gradient guidance only).
        default_eta: the DDIM eta the method is meant for (stochastic methods need eta > 0).
        requires: the generator capabilities it needs (:mod:`rewardiff.types`); steering a
            chain needs one, best-of-N needs nothing.
    """

    name = "method"
    width_name = "width"
    needs_grad = False
    default_eta = 0.0
    needs_stochastic = False
    black_box_ok = True
    requires: tuple[str, ...] = (CHAIN,)

    def __init__(self, reward: Reward | None = None, seed: int = 0):
        self.reward = reward
        self.seed = seed
        self.nfe = 0
        self.decode = self.output = lambda x: x
        self.gen = torch.Generator().manual_seed(seed)
        self.stats: dict[str, float] = {}

    # ------------------------------------------------------------------ set-up

    @property
    def particles(self) -> int:
        """Particles per requested sample at the start of the rollout."""
        return 1

    def begin(self, num_samples: int, model: Any, eta: float) -> None:
        """Reset per-run state: ``num_samples`` groups of :attr:`particles` particles of
        ``model`` (a DiffusionModel: its decode and process) sampled with DDIM ``eta``."""
        self.nfe = 0
        self.decode, self.output, self.process, self.eta = model.decode, model.output, model.process, eta
        self.gen = torch.Generator().manual_seed(self.seed)
        self.stats = {"reward_calls": 0}

    def fits(self, model: Any) -> None:
        """Raise UserError when ``model`` lacks a capability the method requires."""
        lacking = missing(model, self.requires)
        if lacking:
            raise UserError(self.refusal(lacking[0], model))

    def refusal(self, capability: str, model: Any) -> str:
        """The one line that refuses ``model``, which lacks ``capability``."""
        if capability == CHAIN:
            return (f"method {self.name} steers a diffusion sampler; the autoregressive model {model.name} "
                    "samples with --method base or best-of-n")
        return f"method {self.name} needs a model with capability {capability!r}; {model.name} has {sorted(model.capabilities)}"

    def check(self, eta: float, process: Process | None = None) -> None:
        """Raise UserError when the method cannot run with this reward, eta and process.

        Whether the sampler draws at each step is the process's to say
        (``process.is_stochastic(eta)``): DDIM draws only with eta > 0, masked diffusion draws
        at every step whatever eta. Without a process the Gaussian rule (eta > 0) applies.
        """
        stochastic = (process if process is not None else GaussianProcess).is_stochastic(eta)
        if self.needs_stochastic and not stochastic:
            raise UserError(f"{self.name} draws candidates from the stochastic sampler: it needs --eta > 0 (got {eta})")
        if self.reward is not None and not self.black_box_ok and not self.reward.differentiable:
            raise UserError(f"{self.name} needs a differentiable reward; {self.reward.name!r} is black-box")

    def cost(self, T: int, c: int) -> int:
        """NFE per sample of this configuration."""
        raise NotImplementedError

    def batch_cost(self, T: int, c: int, prompts: list[str]) -> int:
        """NFE of one batch of requests with these ``prompts``: ``cost`` per request unless the
        method's particles interact across requests (DSearch's shared beam of a prompt)."""
        return self.cost(T, c) * len(prompts)

    def plan(self, budget: int, T: int, c: int) -> None:
        """Set the width to the largest that spends at most ``budget`` NFE per sample (the
        cost grows with the width)."""
        self.set_width(1)
        if self.cost(T, c) > budget:
            raise UserError(
                f"{self.name} cannot meet --nfe-budget {budget}: its smallest setting costs {self.cost(T, c)} "
                f"NFE per sample ({T} steps, {c} evaluation(s) per denoiser call)"
            )
        w = 1
        while w < MAX_WIDTH:
            self.set_width(w + 1)
            if self.cost(T, c) > budget:
                break
            w += 1
        self.set_width(w)
        if w == MAX_WIDTH and self.cost(T, c) < budget:
            raise UserError(f"--nfe-budget {budget} is more than {self.name} can spend: at its largest width ({MAX_WIDTH}) it costs "
                            f"{self.cost(T, c)} NFE per sample; give at most that")

    def set_width(self, width: int) -> None:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:
        """The method's settings, for summaries."""
        return {}

    # ------------------------------------------------------------------ the hook

    def __call__(self, ctx: StepContext) -> Tensor | Selection | None:
        return self.step(ctx)

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers

    def score(self, x0: Tensor, prompts: list[str], rows: Tensor | None = None, group: int | None = None) -> Tensor:
        """The reward of clean-sample estimates ``x0`` [N, ...] (decoded, clamped) -> [N];
        with ``rows`` [N], row n is scored against ``prompts[rows[n]]``. ``group``: the rows
        come in contiguous groups of candidates that compete (a relative reward, such as
        Free2Guide's normalized sum or consensus, compares each group's rows among themselves;
        None: the whole call is one group)."""
        if rows is not None:
            prompts = [prompts[int(r)] for r in rows]
        assert self.reward is not None
        self.stats["reward_calls"] = self.stats.get("reward_calls", 0) + x0.shape[0]
        with torch.no_grad():
            return call(self.reward, self.output(x0), prompts, group).float()


def candidates(ctx: StepContext, m: int, gen: torch.Generator, process: Any) -> tuple[Tensor, Tensor]:
    """``m`` draws of the base transition p(x_{t-1} | x_t) per particle, the rollout's own first.

    The draws are the process's own (``process.noise_like`` and ``process.draw``: Gaussian
    mean + std * z, or categorical tokens for masked diffusion).

    Returns (cands [B*m, ...] particle-major, rows [B*m]: the particle each came from).
    Candidate 0 of each particle is ``ctx.out.prev`` itself, so one candidate reproduces the
    base sampler exactly.
    """
    out = ctx.out
    B = out.prev.shape[0]
    rows = torch.arange(B, device=out.prev.device).repeat_interleave(m)
    if m == 1:
        return out.prev, rows
    like = out.prev.repeat_interleave(m - 1, 0)  # [B*(m-1), ...], particle-major
    z = process.noise_like(like, gen)
    extra = process.draw(out.mean.repeat_interleave(m - 1, 0), out.std, z).unflatten(0, (B, m - 1))
    cands = torch.cat([out.prev.unsqueeze(1), extra], 1).flatten(0, 1)
    return cands, rows


def pick_per_parent(values: Tensor, m: int, temperature: float, gen: torch.Generator) -> Tensor:
    """For ``values`` [B*m] of m candidates per parent (parent-major), one flat index per parent
    [B]: the argmax (temperature 0) or a draw with p ∝ exp(v / temperature)."""
    B = values.shape[0] // m
    v = values.reshape(B, m).double().cpu()
    if temperature == 0:
        j = v.argmax(1)
    else:
        logits = torch.zeros_like(v) if math.isinf(temperature) else v / temperature
        p = torch.softmax(logits - logits.amax(1, keepdim=True), 1)
        j = torch.multinomial(p.float(), 1, generator=gen).squeeze(1)
    return torch.arange(B) * m + j
