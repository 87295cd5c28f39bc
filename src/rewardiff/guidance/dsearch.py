"""DSearch (arXiv 2503.02039): beam search over the denoising tree with the SVDD-PM value.

Per request, a beam of k0 particles at x_T shrinks on a schedule to 1 at the last step:
n_i = max(1, floor(k0 ** (1 - i / (T - 1)))) (exponential; ``linear`` also). At step i the
method searches with probability p_i = 1 - exp(-3 i / (T - 1)) (one coin per step, drawn from
the seed up front, so a run's cost is known before it starts); each particle expands
int(w * m * k0 / n_i) candidates of x_{t-1} when searching, else m. Every candidate is valued
by r(decode(x0_hat)) from one look-ahead call; each particle keeps its best candidate, then
the n_{i+1} best particles of the beam survive. DSearch-R (``replace`` > 0) then replaces that
fraction of the beam's worst survivors (stochastically rounded) by candidates resampled with
softmax(v / temperature) over all of the beam's candidates.

Cost per sample: c * (k0 + sum_{i < T-1} n_i * e_i) NFE (the kept candidates' look-ahead
outputs are reused by the next step). k0 = m = 1 is the base sampler exactly.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method, candidates, pick_per_parent
from rewardiff.types import Reward, Selection, StepContext


class DSearch(Method):
    """Args:
        reward: the reward (black-box is fine).
        k0: initial beam width per request.
        m: candidates per particle on steps that do not search.
        w: widening factor on steps that search.
        schedule: how the beam shrinks: ``exp`` or ``linear``.
        replace: DSearch-R's replaced fraction (0 for plain DSearch; 0.01 to 0.05 in the paper).
        temperature: softmax temperature of DSearch-R's resampling.
        seed: coins, candidates and resampling.
    """

    width_name = "k0"
    default_eta = 1.0
    needs_stochastic = True

    def __init__(self, reward: Reward, k0: int = 4, m: int = 5, w: int = 5, schedule: str = "exp", replace: float = 0.0,
                 temperature: float = 1.0, seed: int = 0):
        super().__init__(reward, seed)
        if m < 1 or w < 1:
            raise UserError(f"dsearch: m and w must be at least 1, got m={m}, w={w}")
        if schedule not in ("exp", "linear"):
            raise UserError(f"dsearch: schedule must be exp or linear, got {schedule!r}")
        if not 0 <= replace < 1:
            raise UserError(f"dsearch: replace must be in [0, 1), got {replace}")
        if temperature <= 0:
            raise UserError(f"dsearch: temperature must be > 0, got {temperature}")
        self.m, self.w, self.schedule, self.replace, self.temperature = int(m), int(w), schedule, float(replace), float(temperature)
        self.name = "dsearch-r" if replace > 0 else "dsearch"
        self.set_width(k0)

    def set_width(self, width: int) -> None:
        if width < 1:
            raise UserError(f"{self.name}: k0 must be at least 1, got {width}")
        self.k0 = int(width)

    @property
    def particles(self) -> int:
        return self.k0

    # ------------------------------------------------------------------ the plan of a run

    def beams(self, T: int) -> list[int]:
        """Beam width per request at each state x_{t_i}, i = 0 .. T-1 (n_0 = k0, n_{T-1} = 1)."""
        if T == 1:
            return [1]
        if self.schedule == "exp":
            return [max(1, math.floor(self.k0 ** (1 - i / (T - 1)) + 1e-9)) for i in range(T)]
        return [max(1, math.floor(self.k0 - (self.k0 - 1) * i / (T - 1) + 1e-9)) for i in range(T)]

    def coins(self, T: int) -> list[bool]:
        """Whether step i searches, drawn from the seed: p_i = 1 - exp(-3 i / (T - 1))."""
        g = torch.Generator().manual_seed(self.seed * 1000003 + 7)
        u = torch.rand(T, generator=g, dtype=torch.float64).tolist()
        return [u[i] < 1 - math.exp(-3 * i / max(T - 1, 1)) for i in range(T)]

    def expansions(self, T: int) -> list[int]:
        """Candidates per particle at each step i = 0 .. T-2."""
        n, coin = self.beams(T), self.coins(T)
        return [max(1, int(self.w * self.m * self.k0 / n[i])) if coin[i] else self.m for i in range(T - 1)]

    def cost(self, T: int, c: int) -> int:
        n, e = self.beams(T), self.expansions(T)
        return c * (self.k0 + sum(n[i] * e[i] for i in range(T - 1)))

    def plan(self, budget: int, T: int, c: int) -> None:
        """The widest initial beam k0 that fits ``budget``, then the largest spend at that beam
        (m and w from the authors' values down): a beam of one would be SVDD-PM."""
        best, m0, w0 = None, self.m, self.w
        for m in range(m0, 0, -1):
            for w in range(w0, 0, -1):
                for k0 in range(1, 65):
                    self.m, self.w, self.k0 = m, w, k0
                    cost = self.cost(T, c)
                    if cost > budget:
                        break
                    if best is None or (k0, cost) > (best[3], best[0]):
                        best = (cost, m, w, k0)
        if best is None:
            self.m, self.w, self.k0 = 1, 1, 1
            raise UserError(f"{self.name} cannot meet --nfe-budget {budget}: its smallest setting costs {self.cost(T, c)} NFE per sample")
        _, self.m, self.w, self.k0 = best

    def options(self) -> dict:
        return {"k0": self.k0, "m": self.m, "w": self.w, "schedule": self.schedule, "replace": self.replace}

    def begin(self, num_samples: int, model, eta: float) -> None:
        super().begin(num_samples, model, eta)
        self._plan: tuple[list[int], list[int]] | None = None

    # ------------------------------------------------------------------ the step

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        T, i = ctx.num_steps, ctx.index
        if self._plan is None:
            self._plan = (self.beams(T), self.expansions(T))
        n, e = self._plan
        if i == T - 1:
            return None
        B = ctx.out.prev.shape[0]
        G, nb, na, ei = B // n[i], n[i], n[i + 1], e[i]
        if ei * nb == na:  # nothing to choose: every particle has one child and all survive
            return None
        cands, rows = candidates(ctx, ei, self.gen, self.process)
        assert ctx.predict is not None
        model_out, x0 = ctx.predict(cands, ctx.t_prev, rows)
        v = self.score(x0, ctx.prompts, rows).double().cpu()
        best = pick_per_parent(v, ei, 0.0, self.gen)  # [B] flat candidate index per particle
        top = v[best].view(G, nb).topk(na, 1).indices  # [G, na] particles kept per request
        keep = best.view(G, nb).gather(1, top)  # [G, na] flat candidate indices
        if self.replace > 0:
            keep = self._replace_worst(keep, v.view(G, nb * ei), nb * ei)
        keep = keep.flatten()
        keep_d = keep.to(cands.device)
        return Selection(cands[keep_d], rows[keep_d], model_out[keep_d])

    def _replace_worst(self, keep: Tensor, v: Tensor, per_group: int) -> Tensor:
        """DSearch-R: the worst kept particles of each beam replaced by softmax draws over its candidates."""
        G, na = keep.shape
        keep = keep.clone()
        for g in range(G):
            r = int(math.floor(self.replace * na + float(torch.rand(1, generator=self.gen))))
            if r == 0:
                continue
            p = torch.softmax(v[g] / self.temperature, 0).float()
            draws = torch.multinomial(p, r, replacement=True, generator=self.gen) + g * per_group
            keep[g, na - r :] = draws  # topk sorted descending: the last r are the worst
        return keep
