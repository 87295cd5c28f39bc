"""Gradient guidance (DPS-style): shift every step along the reward's gradient.

x_{t-1} <- x_{t-1} + s * grad_{x_t} r(decode(x0_hat(x_t))), with x0_hat Tweedie's estimate
from the step's own denoiser call: no extra NFE, one backward pass a step (reported as
``backward_per_sample``). Needs a differentiable reward. Scale 0 is the base sampler.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method
from rewardiff.types import Reward, StepContext


class GradientGuidance(Method):
    """Args:
        reward: a differentiable reward.
        scale: step size s (0 gives the base sampler back exactly).
        normalize: divide each sample's gradient by its RMS, so that ``scale`` is a step in
            units of the state's per-pixel scale (robust across rewards of different scales;
            on the shapes world scale 0.05 normalized raised the judge's counting accuracy
            from 0.81 to 0.98 on 48 samples, 0.2 overshot to 0.67).
        seed: unused (the method draws nothing).
    """

    name = "gradient"
    width_name = "scale"
    black_box_ok = False

    def __init__(self, reward: Reward, scale: float = 0.05, normalize: bool = True, seed: int = 0):
        super().__init__(reward, seed)
        if scale < 0:
            raise UserError(f"gradient: scale must be >= 0, got {scale}")
        self.scale, self.normalize = float(scale), bool(normalize)
        self.needs_grad = self.scale != 0

    def set_width(self, width: int) -> None:
        pass  # no width: the cost is the base sampler's whatever the scale

    def plan(self, budget: int, T: int, c: int) -> None:
        if budget < self.cost(T, c):
            raise UserError(f"gradient cannot meet --nfe-budget {budget}: it costs {self.cost(T, c)} NFE per sample (and a backward pass a step)")

    def cost(self, T: int, c: int) -> int:
        return c * T

    def options(self) -> dict:
        return {"scale": self.scale, "normalize": self.normalize}

    def step(self, ctx: StepContext) -> Tensor | None:
        if self.scale == 0:
            return None
        assert self.reward is not None
        with torch.enable_grad():
            r = self.reward(self.decode(ctx.out.x0_hat), ctx.prompts)
            (g,) = torch.autograd.grad(r.sum(), ctx.x_t)
        self.stats["backward"] = self.stats.get("backward", 0) + ctx.x_t.shape[0]
        if self.normalize:
            rms = g.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-12)
            g = g / rms.view(-1, *([1] * (g.dim() - 1)))
        return (ctx.out.prev + self.scale * g).detach()
