"""Sequential Monte Carlo with value increments (the family of TDS and FK steering).

K particles per request run the stochastic base sampler (eta > 0: after resampling, copies
of a particle must draw their own noise to become different particles). Each carries a log-weight that grows by
(v(x_t) - v(x_{t+1})) / alpha along its path, with v the soft value: r(decode(x0_hat(x_t)))
from the step's own denoiser call (no extra NFE), or a learned value net. When a group's
effective sample size (sum w)^2 / sum w^2 drops below ``ess`` * K, the group is resampled
(systematic resampling) and its weights reset. After the last step the weight gets the
final increment r(x_0) - v(x_1), and one particle per request is kept: the highest reward
(``final="max"``) or a draw by weight (``final="sample"``, the tilted distribution's sample).

Cost per sample: c * T * K NFE.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method
from rewardiff.types import Reward, Selection, StepContext, ValueFn


def systematic(w: Tensor, gen: torch.Generator) -> Tensor:
    """Systematic resampling of each row of normalized weights ``w`` [G, K] -> indices [G, K]."""
    G, K = w.shape
    u = (torch.rand(G, 1, generator=gen, dtype=torch.float64) + torch.arange(K, dtype=torch.float64)) / K
    c = w.double().cumsum(1)
    c[:, -1] = 1.0
    return torch.searchsorted(c, u).clamp(max=K - 1)


class SMC(Method):
    """Args:
        reward: the reward (black-box is fine).
        k: particles per request (K >= 1).
        alpha: temperature of the potentials exp(v / alpha) (> 0).
        ess: resample a group when its effective sample size falls below ess * K (0 .. 1).
        final: ``max`` keeps the best final particle, ``sample`` draws one by weight.
        value: a learned value net to use instead of the reward of x0_hat.
        seed: randomness of resampling.
    """

    name = "smc"
    width_name = "k"
    default_eta = 1.0
    needs_stochastic = True  # resampled copies must draw their own noise to diverge

    def __init__(self, reward: Reward, k: int = 4, alpha: float = 0.1, ess: float = 0.5, final: str = "max",
                 value: ValueFn | None = None, seed: int = 0):
        super().__init__(reward, seed)
        if alpha <= 0:
            raise UserError(f"smc: alpha must be > 0, got {alpha}")
        if not 0 <= ess <= 1:
            raise UserError(f"smc: ess must be in [0, 1], got {ess}")
        if final not in ("max", "sample"):
            raise UserError(f"smc: final must be max or sample, got {final!r}")
        self.alpha, self.ess, self.final, self.value = float(alpha), float(ess), final, value
        self.set_width(k)

    def set_width(self, width: int) -> None:
        if width < 1:
            raise UserError(f"smc: k must be at least 1, got {width}")
        self.k = int(width)

    @property
    def particles(self) -> int:
        return self.k

    def cost(self, T: int, c: int) -> int:
        return c * T * self.k

    def options(self) -> dict:
        return {"k": self.k, "alpha": self.alpha, "ess": self.ess, "final": self.final}

    def begin(self, num_samples: int, model, eta: float) -> None:
        super().begin(num_samples, model, eta)
        self.logw = torch.zeros(num_samples * self.k, dtype=torch.float64)
        self.v_prev: Tensor | None = None
        self.stats["resamples"] = 0

    def _value(self, ctx: StepContext) -> Tensor:
        if self.value is not None:
            return self.value(ctx.x_t, ctx.t, ctx.cond).double().cpu()
        return self.score(ctx.out.x0_hat, ctx.prompts, group=self.k).double().cpu()

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        if self.k == 1:
            return None
        K = self.k
        v = self._value(ctx)
        if self.v_prev is not None:
            self.logw += (v - self.v_prev) / self.alpha
        x = ctx.out.prev
        G = x.shape[0] // K
        if ctx.index == ctx.num_steps - 1:
            r = self.score(x, ctx.prompts, group=self.k).double().cpu()
            self.logw += (r - v) / self.alpha
            if self.final == "max":
                j = r.view(G, K).argmax(1)
            else:
                j = torch.multinomial(torch.softmax(self.logw.view(G, K), 1).float(), 1, generator=self.gen).squeeze(1)
            keep = torch.arange(G) * K + j
            return Selection(x[keep.to(x.device)], keep)
        self.v_prev = v
        w = torch.softmax(self.logw.view(G, K), 1)
        low = 1.0 / (w**2).sum(1) < self.ess * K
        if not bool(low.any()):
            return None
        idx = torch.arange(G * K).view(G, K).clone()
        idx[low] = systematic(w[low], self.gen) + (torch.arange(G)[low] * K).unsqueeze(1)
        parents = idx.flatten()
        self.stats["resamples"] += int(low.sum())
        self.logw = self.logw[parents]
        self.logw.view(G, K)[low] = 0.0
        self.v_prev = v[parents]
        return Selection(x[parents.to(x.device)], parents)
