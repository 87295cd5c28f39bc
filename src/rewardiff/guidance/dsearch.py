"""DSearch (Li et al. 2025, arXiv 2503.02039): beam search over the denoising tree with the SVDD-PM value.

Notation: b requests of one prompt in a batch, oversample o, B0 = b * o, T steps, states
x_{t_0} = x_T .. x_{t_{T-1}}; M candidates per particle, widening factor w.

1. The beam of a prompt group starts with B0 particles at x_T (each request's own seed first,
   then fresh ones) and shrinks on a schedule to b at the last state:
   exponential n_i = max(b, floor(B0 (b / B0)^(i / (T-1)))); also ``linear``
   (B0 - (B0 - b) u), ``quadratic`` (b + (B0 - b)(1 - u)^2) and ``sigmoid``
   (b + (B0 - b) s(u), s a logistic from 1 to 0), u = i / (T-1), each floored and >= b.
2. Step i (i < T-1) searches with probability p_i = 1 - exp(-3 i / (T-1)); one coin per step
   for the whole batch, drawn from the seed up front, so a run's cost is known before it starts.
3. Each of the n_i particles draws e_i candidates of x_{t_{i+1}} from the base transition
   (its own draw first): e_i = int(w M B0 / n_i) when the step searches, else M.
4. Every candidate is valued by r(decode(x0_hat)) from one look-ahead call; each particle keeps
   its best candidate, then the n_{i+1} best particles of the group survive (ties: lower index).
5. DSearch-R (``replace`` > 0): that fraction of the group's survivors (stochastically rounded),
   the worst ones, is replaced by draws with softmax(v / temperature) over all of the group's
   candidates of the step; not at the last selection, so that the returned samples are distinct.
6. After the last step each request of the group takes one of the group's b particles, the best
   ranked first, in request order.

Prompt groups (named deviation). The paper's batch shares one beam. Here a batch holds requests
with prompts: requests with the same prompt share one beam of b * o particles (b of them in the
batch), and a particle never leaves its prompt's group, so the sample returned for a request is
always of its own prompt. (The reference code draws a prompt per particle and lets particles of
different prompts compete in one beam, returning whichever prompts survive; requests here cannot
change their prompt.) With distinct prompts every group has b = 1: a beam per request, o wide.
An unconditional model (every prompt "") shares one beam across the batch, as in the paper.

Cost: a step's look-ahead outputs of the kept candidates are reused by the next step, so one
batch costs c * sum over groups of (B0 + sum_{i < T-1} n_i e_i) NFE (:meth:`DSearch.batch_cost`);
per sample c * (o + sum_i n_i e_i) for distinct prompts (:meth:`DSearch.cost`). o = M = w = 1 is
the base sampler exactly.

Settings. ``dsearch`` is the paper's DSearch: o = 5, M = 5, w = 5 (their image runs, batch 12).
``dsearch-r`` is the paper's DSearch-R: o = 1 (no beam shrink), M = 5, w = 5, replace 0.03. Under
``--nfe-budget`` (:meth:`DSearch.plan`) the paper's setting rarely fits (a searching step alone
costs about w M o look-aheads a sample), so the planner keeps M and w and shrinks the beam
first, and only when even o = 1 does not fit lowers w and M in turn; ``options()["setting"]``
says ``paper`` (the authors' numbers), ``budget`` (reduced by the planner) or ``custom``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method
from rewardiff.types import Reward, Selection, StepContext

SCHEDULES = ("exp", "linear", "quadratic", "sigmoid")
PAPER = {"dsearch": (5, 5, 5), "dsearch-r": (1, 5, 5)}  # (oversample, m, w) of the authors' runs


def shrink(u: float, schedule: str) -> float:
    """The fraction of the extra particles (B0 - b) still in the beam at progress u in [0, 1]
    (exp is handled by :func:`beam_width`)."""
    if schedule == "linear":
        return 1 - u
    if schedule == "quadratic":
        return (1 - u) ** 2
    s = lambda z: 1 / (1 + math.exp(10 * (z - 0.5)))  # noqa: E731  logistic, from ~1 to ~0
    return (s(u) - s(1)) / (s(0) - s(1))


def beam_width(b: int, o: int, i: int, T: int, schedule: str = "exp") -> int:
    """n_i for a group of ``b`` requests with oversample ``o`` at state i of T (n_0 = b o, n_{T-1} = b)."""
    B0 = b * o
    if T == 1:
        return B0
    u = i / (T - 1)
    if schedule == "exp":
        n = B0 * (b / B0) ** u
    else:
        n = b + (B0 - b) * shrink(u, schedule)
    return max(b, math.floor(n + 1e-9))


class DSearch(Method):
    """Args:
        reward: the reward (black-box is fine).
        oversample: o, initial particles per request (the beam of a prompt group is b * o).
        m: M, candidates per particle on steps that do not search.
        w: widening factor on steps that search.
        schedule: how the beam shrinks: ``exp``, ``linear``, ``quadratic`` or ``sigmoid``.
        replace: DSearch-R's replaced fraction (0 for plain DSearch; 0.01 to 0.05 in the paper).
        temperature: softmax temperature of DSearch-R's resampling.
        seed: coins, candidates and resampling.
    """

    width_name = "oversample"
    default_eta = 1.0
    needs_stochastic = True

    def __init__(self, reward: Reward, oversample: int = 5, m: int = 5, w: int = 5, schedule: str = "exp",
                 replace: float = 0.0, temperature: float = 1.0, seed: int = 0):
        super().__init__(reward, seed)
        if m < 1 or w < 1:
            raise UserError(f"dsearch: m and w must be at least 1, got m={m}, w={w}")
        if schedule not in SCHEDULES:
            raise UserError(f"dsearch: schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if not 0 <= replace < 1:
            raise UserError(f"dsearch: replace must be in [0, 1), got {replace}")
        if temperature <= 0:
            raise UserError(f"dsearch: temperature must be > 0, got {temperature}")
        self.m, self.w, self.schedule, self.replace, self.temperature = int(m), int(w), schedule, float(replace), float(temperature)
        self.name = "dsearch-r" if replace > 0 else "dsearch"
        self.set_width(oversample)
        self.planned = False

    def set_width(self, width: int) -> None:
        if width < 1:
            raise UserError(f"{self.name}: oversample must be at least 1, got {width}")
        self.oversample = int(width)

    @property
    def particles(self) -> int:
        return self.oversample

    @property
    def setting(self) -> str:
        """``paper`` (the authors' o, M, w), ``budget`` (reduced by :meth:`plan`) or ``custom``."""
        if self.planned:
            return "budget"
        return "paper" if (self.oversample, self.m, self.w) == PAPER[self.name] else "custom"

    # ------------------------------------------------------------------ the plan of a run

    def beams(self, T: int, group: int = 1) -> list[int]:
        """Beam width n_i of a group of ``group`` requests at each state i = 0 .. T-1."""
        return [beam_width(group, self.oversample, i, T, self.schedule) for i in range(T)]

    def coins(self, T: int) -> list[bool]:
        """Whether step i searches, drawn from the seed: p_i = 1 - exp(-3 i / (T - 1))."""
        g = torch.Generator().manual_seed(self.seed * 1000003 + 7)
        u = torch.rand(T, generator=g, dtype=torch.float64).tolist()
        return [u[i] < 1 - math.exp(-3 * i / max(T - 1, 1)) for i in range(T)]

    def expansions(self, T: int, group: int = 1) -> list[int]:
        """Candidates per particle e_i at each step i = 0 .. T-2: int(w M B0 / n_i) or M."""
        n, coin, B0 = self.beams(T, group), self.coins(T), group * self.oversample
        return [max(1, int(self.w * self.m * B0 / n[i])) if coin[i] else self.m for i in range(T - 1)]

    def group_calls(self, T: int, group: int) -> int:
        """Denoiser calls of one prompt group's beam: B0 + sum_{i < T-1} n_i e_i."""
        n, e = self.beams(T, group), self.expansions(T, group)
        return group * self.oversample + sum(n[i] * e[i] for i in range(T - 1))

    def cost(self, T: int, c: int) -> int:
        """NFE per sample for requests of distinct prompts: c (o + sum_i n_i e_i)."""
        return c * self.group_calls(T, 1)

    def batch_cost(self, T: int, c: int, prompts: list[str]) -> int:
        """NFE of one batch: c * sum over its prompt groups of (B0 + sum_i n_i e_i)."""
        sizes: dict[str, int] = {}
        for p in prompts:
            sizes[p] = sizes.get(p, 0) + 1
        return c * sum(self.group_calls(T, b) for b in sizes.values())

    def bound(self, T: int, c: int) -> float:
        """The most NFE per sample any grouping of prompts can cost (floors dropped):
        c (o + sum_i (w M o if step i searches, else M max(1, n_i / b)))."""
        o, coin = self.oversample, self.coins(T)
        u = [i / max(T - 1, 1) for i in range(T)]
        share = [o ** (1 - x) if self.schedule == "exp" else 1 + (o - 1) * shrink(x, self.schedule) for x in u]  # n_i / b
        return c * (o + sum(self.w * self.m * o if coin[i] else self.m * max(1.0, share[i]) for i in range(T - 1)))

    def plan(self, budget: int, T: int, c: int) -> None:
        """Fit ``budget`` NFE per sample whatever the prompts: the widest beam (o up to 64) at the
        configured M and w; when even o = 1 does not fit, lower w, then M, in turn and retry."""
        m, w = self.m, self.w
        while True:
            self.m, self.w = m, w
            fits = [o for o in range(1, 65) if self._bound_at(o, T, c) <= budget]
            if fits:
                self.oversample, self.planned = max(fits), True
                return
            if m == w == 1:
                self.oversample = 1
                raise UserError(f"{self.name} cannot meet --nfe-budget {budget}: its smallest setting costs "
                                f"{self.cost(T, c)} NFE per sample ({T} steps, {c} evaluation(s) per denoiser call)")
            if w >= m and w > 1:
                w -= 1
            else:
                m -= 1

    def _bound_at(self, o: int, T: int, c: int) -> float:
        keep, self.oversample = self.oversample, o
        try:
            return self.bound(T, c)
        finally:
            self.oversample = keep

    def options(self) -> dict:
        return {"oversample": self.oversample, "m": self.m, "w": self.w, "schedule": self.schedule,
                "replace": self.replace, "setting": self.setting, "beam": "shared by the requests of one prompt"}

    def begin(self, num_samples: int, model, eta: float) -> None:
        super().begin(num_samples, model, eta)
        self.num_samples = num_samples
        self.groups: list[tuple[list[int], list[int], list[int]]] = []  # (requests, beams, expansions)
        self.members: list[Tensor] = []  # the current rows of each group, best ranked first once selected

    # ------------------------------------------------------------------ the step

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        T, i = ctx.num_steps, ctx.index
        if i == 0:
            self._group(ctx)
        if i == T - 1:
            return self._finish(ctx)
        counts = [(e[i], n[i + 1]) for _, n, e in self.groups]
        if all(ei == 1 and len(rows) == na for (ei, na), rows in zip(counts, self.members)):
            return None  # nothing to choose: one child each and all survive
        cands, parents, first = self._expand(ctx, [ei for ei, _ in counts])
        assert ctx.predict is not None
        model_out, x0 = ctx.predict(cands, ctx.t_prev, parents)
        v = self.score(x0, ctx.prompts, parents).double().cpu()
        keep, members = [], []
        for g, (rows, (ei, na)) in enumerate(zip(self.members, counts)):
            flat = first[rows].unsqueeze(1) + torch.arange(ei)  # [n_i, e_i] this group's candidates
            best = flat.gather(1, v[flat].argmax(1, keepdim=True)).squeeze(1)  # [n_i] best per particle
            top = best[torch.sort(v[best], descending=True, stable=True).indices[:na]]  # [n_{i+1}]
            if self.replace > 0 and i < T - 2:
                top = self._replace_worst(top, flat.flatten(), v)
            members.append(torch.arange(na) + sum(len(k) for k in keep))
            keep.append(top)
        idx = torch.cat(keep).to(cands.device)
        self.members = members
        return Selection(cands[idx], parents[idx], model_out[idx])

    def _group(self, ctx: StepContext) -> None:
        """Prompt groups from the first step's particles (request-major, o per request)."""
        o, T = self.oversample, ctx.num_steps
        B = ctx.x_t.shape[0]
        if B != self.num_samples * o:
            raise RuntimeError(f"dsearch expects {o} particles per request at x_T, got {B} for {self.num_samples} requests")
        by_prompt: dict[str, list[int]] = {}
        for r in range(self.num_samples):
            by_prompt.setdefault(ctx.prompts[r * o], []).append(r)
        self.groups = [(reqs, self.beams(T, len(reqs)), self.expansions(T, len(reqs))) for reqs in by_prompt.values()]
        self.members = [torch.cat([torch.arange(r * o, r * o + o) for r in reqs]) for reqs in by_prompt.values()]
        self.stats["beam_groups"] = len(self.groups)

    def _expand(self, ctx: StepContext, per_group: list[int]) -> tuple[Tensor, Tensor, Tensor]:
        """e_g draws of the base transition per particle of group g, the rollout's own first.

        Returns (cands [N, ...] particle-major, parents [N], first [B]: the flat index of each
        particle's first candidate)."""
        out, B = ctx.out, ctx.out.prev.shape[0]
        counts = torch.zeros(B, dtype=torch.long)
        for rows, e in zip(self.members, per_group):
            counts[rows] = e
        parents = torch.arange(B).repeat_interleave(counts)  # [N]
        first = torch.cumsum(counts, 0) - counts  # [B]
        own = torch.zeros(parents.shape[0], dtype=torch.bool)
        own[first] = True
        cands = out.prev[parents.to(out.prev.device)].clone()
        extra = parents[~own].to(out.prev.device)
        if len(extra):
            z = self.process.noise_like(out.prev[extra], self.gen)
            cands[(~own).to(cands.device)] = self.process.draw(out.mean[extra], out.std, z)
        return cands, parents.to(out.prev.device), first

    def _replace_worst(self, top: Tensor, pool: Tensor, v: Tensor) -> Tensor:
        """DSearch-R: the worst r of the kept ``top`` replaced by softmax draws over ``pool``."""
        na = top.shape[0]
        r = min(na, int(math.floor(self.replace * na + float(torch.rand(1, generator=self.gen)))))
        if r == 0:
            return top
        p = torch.softmax(v[pool] / self.temperature, 0).float()
        draws = pool[torch.multinomial(p, r, replacement=True, generator=self.gen)]
        self.stats["replaced"] = self.stats.get("replaced", 0) + r
        return torch.cat([top[: na - r], draws])  # top is sorted best first: the last r are the worst

    def _finish(self, ctx: StepContext) -> Selection | None:
        """One particle per request, in request order: the group's best ranked first."""
        x = ctx.out.prev
        idx = torch.empty(self.num_samples, dtype=torch.long)
        for (reqs, _, _), rows in zip(self.groups, self.members):
            if len(rows) > len(reqs):  # T = 1: no step shrank the beam; rank the final samples
                r = self.score(x[rows.to(x.device)], [ctx.prompts[int(j)] for j in rows]).double().cpu()
                rows = rows[torch.sort(r, descending=True, stable=True).indices]
            idx[torch.tensor(reqs)] = rows[: len(reqs)]
        if torch.equal(idx, torch.arange(x.shape[0])):
            return None
        return Selection(x[idx.to(x.device)], idx.to(x.device))
