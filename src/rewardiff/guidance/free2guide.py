"""Free2Guide (arXiv 2411.17041): gradient-free path-integral control on the first steps.

At the first ``window`` decisions of a stochastic DDIM sampler (eta = 1), draw n candidates,
score each on a one-step look-ahead x0 estimate and keep one: the argmax (lam = 0, as the
paper and its code) or a draw with p ∝ exp(r / lam), the path-integral weighting. Decision 0
chooses among n initial noises x_T (scored on x0_hat(x_T), which the first step computes
anyway); decisions 1 .. window-1 choose among n draws of x_{t-1}. Later steps run unguided.

Cost per sample: c * (n * window + T - window) NFE (the kept candidate's look-ahead output is
reused by the next step). n = 1, or lam = inf (uniform selection among exchangeable draws, so
keeping the sampler's own draw is that selection), is the base sampler exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method, candidates, pick_per_parent
from rewardiff.types import CHAIN, GAUSSIAN, Reward, Selection, StepContext


class Free2Guide(Method):
    """Args:
        reward: black-box reward (ensembles welcome: ``0.5*z(a)+0.5*z(b)``).
        n: candidates per decision (n >= 1).
        window: number of guided decisions, from the start of the chain.
        lam: selection temperature: 0 argmax, > 0 softmax, inf uniform (the base sampler).
        seed: randomness of the candidates and of soft selection.
    """

    name = "free2guide"
    width_name = "n"
    default_eta = 1.0
    needs_stochastic = True
    requires = (CHAIN, GAUSSIAN)

    def __init__(self, reward: Reward, n: int = 5, window: int = 5, lam: float = 0.0, seed: int = 0):
        super().__init__(reward, seed)
        if window < 1:
            raise UserError(f"free2guide: window must be at least 1, got {window}")
        if lam < 0:
            raise UserError(f"free2guide: lam must be >= 0, got {lam}")
        self.window, self.lam = int(window), float(lam)
        self.set_width(n)

    def set_width(self, width: int) -> None:
        if width < 1:
            raise UserError(f"free2guide: n must be at least 1, got {width}")
        self.n = int(width)

    def refusal(self, capability: str, model) -> str:
        if capability == GAUSSIAN:
            return f"{self.name} chooses among Gaussian initial noises; it does not run on {type(model.process).__name__}"
        return super().refusal(capability, model)

    def _off(self) -> bool:
        return self.n == 1 or math.isinf(self.lam)

    def cost(self, T: int, c: int) -> int:
        if self._off():
            return c * T
        W = min(self.window, T)
        return c * (self.n * W + T - W)

    def options(self) -> dict:
        return {"n": self.n, "window": self.window, "lam": self.lam}

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        i = ctx.index
        if self._off() or i >= min(self.window, ctx.num_steps):
            return None
        if i == 0:
            ctx = self._choose_start(ctx)
        if i + 1 >= min(self.window, ctx.num_steps) or i == ctx.num_steps - 1:
            return ctx.out.prev if i == 0 else None
        cands, rows = candidates(ctx, self.n, self.gen, self.process)
        assert ctx.predict is not None
        model_out, x0 = ctx.predict(cands, ctx.t_prev, rows)
        v = self.score(x0, ctx.prompts, rows)
        keep = pick_per_parent(v, self.n, self.lam, self.gen).to(cands.device)
        return Selection(cands[keep], rows[keep], model_out[keep])

    def _choose_start(self, ctx: StepContext) -> StepContext:
        """Decision 0: the best of n initial noises (the sampler's own first), then its step."""
        x, B, n = ctx.x_t, ctx.x_t.shape[0], self.n
        z = torch.randn((B, n - 1) + tuple(x.shape[1:]), generator=self.gen).to(x)
        rows = torch.arange(B, device=x.device).repeat_interleave(n - 1)
        assert ctx.predict is not None
        out_z, x0_z = ctx.predict(z.flatten(0, 1), ctx.t, rows)
        v = torch.cat([self.score(ctx.out.x0_hat, ctx.prompts).view(B, 1),
                       self.score(x0_z, ctx.prompts, rows).view(B, n - 1)], 1)
        j = pick_per_parent(v.flatten(), n, self.lam, self.gen) - torch.arange(B) * n  # 0 .. n-1
        starts = torch.cat([x.unsqueeze(1), z], 1)[torch.arange(B), j]
        prev, mean, x0_hat = ctx.out.prev.clone(), ctx.out.mean.clone(), ctx.out.x0_hat.clone()
        chosen = (j > 0).nonzero().flatten()
        if len(chosen):
            o = out_z.view(B, n - 1, *out_z.shape[1:])[chosen, j[chosen] - 1]
            noise = None if ctx.noise is None else ctx.noise[chosen]
            s = self.process.step(o, ctx.t, ctx.t_prev, starts[chosen], self.eta, noise)
            prev[chosen], mean[chosen], x0_hat[chosen] = s.prev, s.mean, s.x0_hat
        out = ctx.out._replace(prev=prev, mean=mean, x0_hat=x0_hat)
        return ctx._replace(x_t=starts, out=out)
