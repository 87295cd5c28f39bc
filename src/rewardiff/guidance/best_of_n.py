"""Best-of-N: N independent samples per request, keep the one the reward likes most.

The baseline every inference-time method must beat at equal NFE. It runs as a hook that does
nothing until the last step, then keeps the best of each group of N particles
(:meth:`BestOfN.select`, which autoregressive sampling uses too).
"""

from __future__ import annotations

from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method, pick_per_parent
from rewardiff.types import Reward, Selection, StepContext


class BestOfN(Method):
    """Args:
        reward: scores the final samples (black-box is fine).
        n: samples drawn per request (N >= 1).
        seed: randomness of the method itself (none is used by argmax).
    """

    name = "best-of-n"
    width_name = "n"
    requires = ()  # any generator: it only draws and scores whole samples

    def __init__(self, reward: Reward, n: int = 4, seed: int = 0):
        super().__init__(reward, seed)
        self.set_width(n)

    def set_width(self, width: int) -> None:
        if width < 1:
            raise UserError(f"best-of-n: n must be at least 1, got {width}")
        self.n = int(width)

    @property
    def particles(self) -> int:
        return self.n

    def cost(self, T: int, c: int) -> int:
        return c * T * self.n

    def options(self) -> dict:
        return {"n": self.n}

    def select(self, x0: Tensor, prompts: list[str]) -> Tensor:
        """The one best-of-N selection: for final samples ``x0`` [B*n, ...] in groups of n per
        request (request-major) and their ``prompts``, the flat index [B] of each group's
        highest-scoring sample. Used by the diffusion hook and by autoregressive sampling."""
        return pick_per_parent(self.score(x0, prompts, group=self.n), self.n, 0.0, self.gen)

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        if self.n == 1 or ctx.index != ctx.num_steps - 1:
            return None
        x0 = ctx.out.prev
        best = self.select(x0, ctx.prompts)  # groups of n, in order
        return Selection(x0[best.to(x0.device)], best)
