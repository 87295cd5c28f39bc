"""Free2Guide (Kim et al. 2024, arXiv 2411.17041): gradient-free path-integral control on the first steps.

On the first ``window`` steps of a stochastic DDIM sampler (eta = 1) draw n candidates, score
each on a one-step look-ahead x0 estimate and keep one: the argmax (lam = 0, as the paper and
its code) or a draw with p ∝ exp(r / lam), the path-integral weighting. Later steps run unguided.
The reference code (``path_integral_video.py``, ``ddim_sampling``) guides steps i = 0 .. 5:

1. Step 0 (``start = "noise"``) chooses among n initial noises x_T: the rollout starts with n
   particles per request (the request's own seed first), each takes its own first step, and
   each is scored on x0_hat(x_T), which that step computed anyway; the chosen particle (its
   x_T, its first step and that step's log-probability) is kept, the others dropped.
2. Steps i = 1 .. window-1 draw n candidates of x_{t_{i+1}} from the base transition (the
   sampler's own draw first) and score each on x0_hat(candidate) from one look-ahead call; the
   kept candidate's look-ahead output is reused by the next step.
3. Steps from ``window`` on, and always the last step, run unguided.

``offset`` moves the guided steps to i = offset .. offset+window-1 (no initial-noise choice
when offset > 0): the paper's ablation of guiding later (offset > 0) or longer (a wider
window), both of which it found worse than steps T .. T-5.

Zero terminal SNR (named deviation, ``start = "step"``). When the signal-to-noise ratio at the
first timestep (``process.snr``: abar / (1 - abar) for DDPM, ((1 - sigma) / sigma)^2 for flow)
is below ``MIN_START_SNR``, x_T = sqrt(abar) x0 + sqrt(1 - abar) eps holds (almost) nothing of x0,
so the Bayes answer x0_hat(x_T) = E[x0 | x_T] is E[x0 | prompt] whatever x_T, for every
prediction type: with v-prediction x0_hat = sqrt(abar) x_T - sqrt(1 - abar) v_hat = -v_hat at
abar = 0, and the regression target there is v = -x0, independent of x_T; with x0-prediction the
output is E[x0 | x_T] itself; with epsilon-prediction (abar clamped to 2^-24)
x0_hat = (x_T - sqrt(1 - abar) eps_hat) / sqrt(abar) is E[x0] plus the network's error times
2^12. Scores of initial noises then rank the network's errors (on the shipped shapes model they
correlated -0.05 with the final reward over 64 noises). So on such a process step 0 instead
draws n candidates of x_{t_1} from the sampler's own x_T and scores them on a look-ahead, like
steps 1 .. window-1; with eta = 1 and abar = 0 the DDIM step x_{t_1} = sqrt(abar_1) x0_hat +
sqrt(1 - abar_1) z does not depend on x_T at all, so these candidates are n fresh starts at the
first state that carries signal. A flow process starts at sigma = 1, where x_T is pure noise
and x0_hat(x_T) = x_T - v_hat is E[x0 | prompt] likewise. ``start = "auto"`` (the default)
picks ``noise`` or ``step`` from the process; ``options()["start"]`` reports the choice made.

Cost per sample: c * (T + (n - 1) * D) NFE with D = min(offset + window, T - 1) - offset guided decisions (at
T = 1 the noise choice is the only one: D = 1; the step choice has none: D = 0); both starts
spend the same. n = 1, or lam = inf (uniform selection among exchangeable draws, so keeping the
sampler's own draw is that selection), is the base sampler exactly.
"""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method, candidates, pick_per_parent
from rewardiff.types import CHAIN, GAUSSIAN, Process, Reward, Selection, StepContext

MIN_START_SNR = 1e-4  # below it x_T's clean part is under 1 % of its noise's amplitude: no initial-noise choice
STARTS = ("auto", "noise", "step")


def informative_start(process: Any) -> bool:
    """Whether x0_hat at the sampler's first timestep can tell initial noises apart."""
    t0 = process.timesteps(1)[0]
    return float(process.snr(t0)) >= MIN_START_SNR


class Free2Guide(Method):
    """Args:
        reward: black-box reward (ensembles welcome: ``0.5*z(a)+0.5*z(b)``).
        n: candidates per decision (n >= 1; the reference: 5 for LaVie, 10 for VideoCrafter2).
        window: guided steps from the start of the chain (0 .. window-1; the reference: 6).
        lam: selection temperature: 0 argmax, > 0 softmax, inf uniform (the base sampler).
        start: step 0's decision: ``noise`` (among n initial noises), ``step`` (among n
            candidates of x_{t_1}) or ``auto`` (noise unless the process has zero terminal SNR).
        offset: the first guided step (0, the paper's; > 0 guides later, its ablation).
        seed: randomness of the candidates and of soft selection.
    """

    name = "free2guide"
    width_name = "n"
    default_eta = 1.0
    needs_stochastic = True
    requires = (CHAIN, GAUSSIAN)

    def __init__(self, reward: Reward, n: int = 5, window: int = 6, lam: float = 0.0, start: str = "auto", offset: int = 0,
                 seed: int = 0):
        super().__init__(reward, seed)
        if window < 1:
            raise UserError(f"free2guide: window must be at least 1, got {window}")
        if offset < 0:
            raise UserError(f"free2guide: offset must be >= 0, got {offset}")
        self.offset = int(offset)
        if lam < 0:
            raise UserError(f"free2guide: lam must be >= 0, got {lam}")
        if start not in STARTS:
            raise UserError(f"free2guide: start must be one of {', '.join(STARTS)}, got {start!r}")
        self.window, self.lam, self.start = int(window), float(lam), start
        self.start_used = None if start == "auto" else start  # resolved from the process when auto
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

    def _resolve(self, process: Any) -> None:
        if self.start == "auto":
            self.start_used = "noise" if informative_start(process) else "step"

    def check(self, eta: float, process: Process | None = None) -> None:
        super().check(eta, process)
        if process is not None:
            self._resolve(process)  # before the rollout reads ``particles``

    @property
    def particles(self) -> int:
        return self.n if self._noise_start() else 1

    def _noise_start(self) -> bool:
        """Whether step 0 chooses among n initial noises."""
        return self.start_used == "noise" and self.offset == 0 and not self._off()

    def decisions(self, T: int) -> int:
        """D, the guided decisions of a T-step run."""
        if self._off():
            return 0
        if T == 1:
            return 1 if (self.start_used or "noise") == "noise" and self.offset == 0 else 0
        return max(0, min(self.offset + self.window, T - 1) - self.offset)

    def cost(self, T: int, c: int) -> int:
        return c * (T + (self.n - 1) * self.decisions(T))

    def options(self) -> dict:
        start = self.start_used or self.start
        if self.start == "auto" and self.start_used == "step":
            start = "step (zero terminal SNR: no initial-noise choice)"
        out = {"n": self.n, "window": self.window, "lam": self.lam, "start": start}
        if self.offset:
            out["offset"] = self.offset
        return out

    def begin(self, num_samples: int, model, eta: float) -> None:
        super().begin(num_samples, model, eta)
        self._resolve(model.process)
        self.num_samples = num_samples

    def step(self, ctx: StepContext) -> Tensor | Selection | None:
        i, T = ctx.index, ctx.num_steps
        if self._off() or not self.offset <= i < self.offset + self.window:
            return None
        if i == 0 and self._noise_start():
            return self._choose_start(ctx)
        if i == T - 1:  # no look-ahead after the last step
            return None
        cands, rows = candidates(ctx, self.n, self.gen, self.process)
        assert ctx.predict is not None
        model_out, x0 = ctx.predict(cands, ctx.t_prev, rows)
        v = self.score(x0, ctx.prompts, rows, group=self.n)
        keep = pick_per_parent(v, self.n, self.lam, self.gen).to(cands.device)
        return Selection(cands[keep], rows[keep], model_out[keep])

    def _choose_start(self, ctx: StepContext) -> Selection:
        """Step 0: the best of each request's n initial noises (particles, the sampler's own
        first), scored on x0_hat(x_T); the chosen particle keeps its own first step."""
        B = ctx.x_t.shape[0]
        if B != self.num_samples * self.n:
            raise RuntimeError(f"free2guide chooses among {self.n} initial noises: the rollout must start with "
                               f"{self.n} particles per request, got {B} for {self.num_samples} requests")
        v = self.score(ctx.out.x0_hat, ctx.prompts, group=self.n)  # [B], request-major groups of n
        keep = pick_per_parent(v, self.n, self.lam, self.gen).to(ctx.out.prev.device)
        return Selection(ctx.out.prev[keep], keep)
