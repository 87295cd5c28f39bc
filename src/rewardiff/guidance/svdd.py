"""SVDD: soft value-based decoding (Li et al. 2024, arXiv 2408.08252).

At every step but the last, draw M candidates x_{t-1} from the pretrained transition, score
each with a soft value and keep one per particle: the argmax (alpha = 0, as the reference
code) or a draw with p ∝ exp(v / alpha).

- SVDD-PM: v = r(decode(x0_hat(x_{t-1}))), one look-ahead denoiser call per candidate. The
  kept candidate's denoiser output is handed to the next step, so a step costs M calls, not
  M + 1: c * (1 + M * (T - 1)) NFE per sample.
- SVDD-MC: v = a learned value net of (x_{t-1}, t_{t-1}, prompt) (``rewardiff train-value``);
  no extra denoiser calls: c * T NFE per sample.

One candidate (M = 1) is the base sampler exactly: candidate 0 is the sampler's own draw.

``guide_from`` (a deviation, default 0 = the paper's): the first steps, where the look-ahead
reads too little to choose by (measured on the masked molecules model: the Spearman correlation
of the look-ahead with what a candidate leads to is about 0.02 over the first 3 of 15 steps,
``benchmarks/results/molecules/svdd/``), run unguided; SVDD-PM then costs
c * (guide_from + 1 + M * (T - 1 - guide_from)), so a budget buys a larger M on the steps that count.

``final=True`` (a deviation; the paper leaves the last step unguided): where the last step
draws (masked diffusion always does), M candidates of the final sample are drawn and the one
the reward scores highest is kept; they are final samples, so scoring them costs no denoiser
evaluation. Where the last step is deterministic (DDIM's to t = -1) there is nothing to choose.

``lookahead`` says what SVDD-PM scores: ``mean`` (the paper's; for masked diffusion the
argmax decode of the predicted clean tokens) or ``sample`` (a deviation, token processes
only: one draw of the clean tokens from the predicted probabilities, an unbiased one-sample
estimate of the expected reward instead of the reward of the most likely completion).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method, candidates, pick_per_parent
from rewardiff.rollout import gather_rows
from rewardiff.types import TOKENS, Reward, Selection, StepContext, ValueFn


class SVDD(Method):
    """Args:
        reward: the reward (black-box is fine for PM; MC uses it only for reports).
        m: candidates per step (M >= 1).
        alpha: selection temperature (0: argmax).
        value: a learned value function; given, the method is SVDD-MC.
        lookahead: ``mean`` (the paper's) or ``sample`` (see the module doc).
        guide_from: the first step that selects (0, the paper's, selects from the first).
        final: also select among M draws of the final sample, by the reward itself (see the module doc).
        seed: randomness of the candidates and of soft selection.
    """

    width_name = "m"
    default_eta = 1.0
    needs_stochastic = True

    def __init__(self, reward: Reward | None, m: int = 20, alpha: float = 0.0, value: ValueFn | None = None,
                 lookahead: str = "mean", guide_from: int = 0, final: bool = False, seed: int = 0):
        super().__init__(reward, seed)
        if alpha < 0:
            raise UserError(f"svdd: alpha must be >= 0, got {alpha}")
        if lookahead not in ("mean", "sample"):
            raise UserError(f"svdd: lookahead must be mean or sample, got {lookahead!r}")
        if guide_from < 0:
            raise UserError(f"svdd: guide_from must be >= 0, got {guide_from}")
        self.alpha, self.value, self.lookahead, self.guide_from = float(alpha), value, lookahead, int(guide_from)
        self.final = bool(final)
        self.name = "svdd-mc" if value is not None else "svdd-pm"
        self.set_width(m)

    def set_width(self, width: int) -> None:
        if width < 1:
            raise UserError(f"{self.name}: m must be at least 1, got {width}")
        self.m = int(width)

    def cost(self, T: int, c: int) -> int:
        guided = max(0, T - 1 - self.guide_from)  # steps that select: guide_from .. T-2
        if self.value is not None or self.m == 1 or guided == 0:
            return c * T
        return c * (T - guided + self.m * guided)

    def plan(self, budget: int, T: int, c: int) -> None:
        if self.value is not None:  # width is free in NFE: keep M, check the floor
            if budget < c * T:
                raise UserError(f"svdd-mc cannot meet --nfe-budget {budget}: it costs {c * T} NFE per sample")
            return
        super().plan(budget, T, c)

    def options(self) -> dict:
        return {"m": self.m, "alpha": self.alpha, **({"lookahead": "sample"} if self.lookahead == "sample" else {}),
                **({"guide_from": self.guide_from} if self.guide_from else {}), **({"final": True} if self.final else {})}

    def begin(self, num_samples: int, model, eta: float) -> None:
        if self.lookahead == "sample" and TOKENS not in model.capabilities:
            raise UserError(f"{self.name}: lookahead=sample draws clean tokens; {model.name} does not sample tokens")
        super().begin(num_samples, model, eta)

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        if self.m == 1 or ctx.index < self.guide_from:
            return None
        if ctx.index == ctx.num_steps - 1:
            draws = ctx.noise is not None and float(torch.as_tensor(ctx.out.std).max()) > 0
            return self._final(ctx) if self.final and draws else None
        cands, rows = candidates(ctx, self.m, self.gen, self.process)
        if self.value is None:
            assert ctx.predict is not None
            model_out, x0 = ctx.predict(cands, ctx.t_prev, rows)
            if self.lookahead == "sample":  # one draw of the clean tokens [N, L] from x0_hat [N, L, V]
                x0 = self.process.draw(x0, ctx.out.std, self.process.noise_like(cands, self.gen))
            v = self.score(x0, ctx.prompts, rows, group=self.m)
        else:
            model_out, v = None, self.value(cands, ctx.t_prev, gather_rows(ctx.cond, rows)).float()
        keep = pick_per_parent(v, self.m, self.alpha, self.gen).to(cands.device)
        return Selection(cands[keep], rows[keep], None if model_out is None else model_out[keep])

    def _final(self, ctx: StepContext) -> Selection:
        """The best of M draws of the final sample by the reward itself (no denoiser call)."""
        cands, rows = candidates(ctx, self.m, self.gen, self.process)
        keep = pick_per_parent(self.score(cands, ctx.prompts, rows, group=self.m), self.m, self.alpha, self.gen).to(cands.device)
        return Selection(cands[keep], rows[keep])
