"""GRPO on diffusion and flow models: Flow-GRPO and its cheaper SDE windows.

Flow-GRPO (Liu et al. 2025, arXiv 2505.05470; their code yifan123/flow_grpo) samples a group of
G images per prompt with a stochastic step (the flow SDE with the ODE's marginals, CPS, or
DDIM with eta > 0 on Gaussian models), scores them, and takes PPO steps on the transitions with
group-relative advantages. One training step of :class:`GRPO`:

1. the SDE window: the steps that draw noise and are trained (every step; or ``sde_window``
   of them, the ODE elsewhere: at a random place within the first ``sde_window_range`` steps,
   Flow-GRPO-Fast; or sliding down the chain as training goes on, MixGRPO, arXiv 2507.21802);
2. sample the batch (the trainer makes it of groups: each prompt ``group_size`` times) with
   the current weights, no gradient, keeping every state and each step's log-probability;
3. advantages within each prompt's group, over the global batch of every process:
   A = (r - mean_group) / (std + 1e-4), the std of the whole batch (``global_std``, the
   authors' default) or of the group, clipped to [-adv_clip, adv_clip]; a group whose rewards
   are all equal carries no signal: its rows are dropped and counted (``zero_std_ratio``);
4. for ``ppo_epochs`` passes over ``ppo_minibatches`` minibatches of the kept rows, and every
   trained step j (the first ``timestep_fraction`` of the window, in order, as the authors
   do), minimize

       L = mean( max(-A r, -A clip(r, 1 - eps, 1 + eps)) ) + beta * mean( ||mu_theta - mu_ref||^2 ) / (2 s_j^2),

   r = exp(log pi_theta - log pi_old) with log-probabilities averaged over the sample's
   dimensions, mu the transition means of the policy and of the frozen base model at the
   same state, beta = ``kl_weight``; one optimizer step per minibatch, its gradient
   accumulated over the trained steps.

Named deviations. s_j in the KL is what flow_grpo divides by: for the flow SDE its diffusion
coefficient a sqrt(sigma / (1 - sigma)), not the transition's standard deviation (which has a
further sqrt(-dt)), so their beta carries over unchanged; for CPS and DDIM steps it is the
transition's standard deviation, as theirs. No EMA of the weights (flow_grpo evaluates an EMA
of decay 0.9): evaluations read the trained weights. Minibatches are slices of the kept rows;
a minibatch left with no row takes one row at weight 0, so that every process takes the
same number of backward passes (flow_grpo instead re-admits dropped rows until the count
divides); when no group of the global batch has a signal, one pass at weight 0 is taken and
no optimizer step (so Adam's momentum does not move the weights on a batch with nothing to
learn). MixGRPO's window stops at the end of the chain rather than starting over.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.ddpo import gather_batch, policy_step, ppo_loss
from rewardiff.finetune.draft import PromptConditions
from rewardiff.io import atomic_write_text
from rewardiff.models.base import DiffusionModel
from rewardiff.rollout import evaluations_per_call
from rewardiff.types import LossOut, Reward, Timestep

STD_EPS = 1e-4  # added to the advantages' std, as flow_grpo


def group_advantages(prompts: list[str], rewards: Tensor, global_std: bool = True) -> tuple[Tensor, Tensor]:
    """GRPO's advantages and which groups carry no signal. [B] -> ([B], [B] bool)

    The group of a row is every row with its prompt. A = (r - mean_group) / (std + 1e-4) with
    the population std of the whole batch (``global_std``) or of the group; the second tensor
    marks rows whose group's rewards are all equal (their advantages are exactly 0).
    """
    r = rewards.detach().double().cpu()
    adv = torch.zeros_like(r)
    flat = torch.zeros(len(prompts), dtype=torch.bool)
    batch_std = float(r.std(unbiased=False)) if len(r) > 1 else 0.0
    for p in dict.fromkeys(prompts):
        rows = torch.tensor([i for i, q in enumerate(prompts) if q == p])
        group = r[rows]
        std = batch_std if global_std else float(group.std(unbiased=False)) if len(group) > 1 else 0.0
        adv[rows] = (group - group.mean()) / (std + STD_EPS)
        flat[rows] = bool((group == group[0]).all())
    adv[flat] = 0.0
    return adv.float().to(rewards.device), flat


def gathered_advantages(acc, prompts: list[str], rewards: Tensor, global_std: bool) -> tuple[Tensor, Tensor, float]:
    """:func:`group_advantages` over the global batch of every process (``acc``; None: this
    one alone): this process's rows of it, and the share of groups with no signal."""
    every, r, mine = gather_batch(acc, prompts, rewards)
    adv, flat = group_advantages(every, r.cpu(), global_std)
    groups = dict(zip(every, flat.tolist()))
    zero_std = sum(groups.values()) / len(groups)
    if mine is not None:
        adv, flat = adv[mine], flat[mine]
    return adv.to(rewards.device), flat, zero_std


def sde_window(cfg: FinetuneConfig, num_steps: int, update: int) -> range:
    """The steps that draw noise and are trained at update ``update`` (0-based).

    Every step with ``sde_window`` 0; else a window of that many steps: starting at a point
    drawn uniformly so that it lies within the first ``sde_window_range`` steps (0: the first
    half of the chain; Flow-GRPO-Fast), or (``sliding``, MixGRPO) starting at 0 and moving by
    ``sde_window_stride`` every ``sde_window_every`` updates until it reaches the chain's end.
    The draw is a function of (seed, update) only, the same on every process.
    """
    w = cfg.sde_window
    if w == 0 or w >= num_steps:
        return range(num_steps)
    if cfg.sde_window_mode == "sliding":
        start = min((update // cfg.sde_window_every) * cfg.sde_window_stride, num_steps - w)
        return range(start, start + w)
    span = cfg.sde_window_range or max(w, num_steps // 2)
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + update + 7)
    start = int(torch.randint(0, span - w + 1, (1,), generator=gen))
    return range(start, start + w)


def eta_schedule(eta: float, num_steps: int, window: range) -> list[float]:
    """``eta`` on the steps of ``window``, 0 (the deterministic step: the ODE, DDIM) elsewhere."""
    return [eta if j in window else 0.0 for j in range(num_steps)]


def kl_scale(process, t: Timestep, t_prev: Timestep, eta: float) -> float:
    """s_j of the KL term (see the module's deviations): the flow SDE's diffusion coefficient
    std / sqrt(-dt), else the transition's standard deviation."""
    std = float(process.step_std(t, t_prev, eta))
    if getattr(process, "sde", None) == "flow-grpo":
        return std / math.sqrt(float(process.sigma_at(t) - process.sigma_at(t_prev)))
    return std


def trained_steps(process, ts: list[Timestep], window: range, cfg: FinetuneConfig) -> list[int]:
    """The steps trained on: the first ``timestep_fraction`` (at least one) of the window's
    stochastic steps, in sampling order (flow_grpo trains int(T * fraction) steps from the start)."""
    prevs = process.prev_timesteps(ts)
    steps = [j for j in window if float(process.step_std(ts[j], prevs[j], cfg.eta)) > 0]
    if not steps:
        raise UserError("method 'grpo' found no stochastic step in its SDE window; check eta and sde_window")
    return steps[: max(1, int(cfg.timestep_fraction * len(steps)))]


class GRPO:
    """The GRPO method: called once per trainer step, it yields one loss per (minibatch, step).

    Args:
        cfg: the run's configuration (group_size, global_std, eta, sde_window*, kl_weight,
            ppo_clip, adv_clip, ppo_epochs, ppo_minibatches, timestep_fraction).
        model: the model it trains (unused at construction).
        acc: the run's accelerator; with several processes the advantages are computed on the
            gathered global batch, so groups are normalized by the same statistics everywhere.
    """

    def __init__(self, cfg: FinetuneConfig, model=None, acc=None):
        if cfg.eta <= 0:
            raise UserError("method 'grpo' needs a stochastic sampler: set eta > 0 (the authors use eta=0.7 on flow models)")
        if cfg.group_size < 2:
            raise UserError("method 'grpo' compares samples within a group: set group_size >= 2 (the authors use 8 to 24)")
        self.acc, self.updates = acc, 0

    def save(self, directory: Path) -> None:
        """The update counter (it places the sliding window), into ``directory/grpo.json``."""
        atomic_write_text(directory / "grpo.json", json.dumps({"updates": self.updates}))

    def load(self, directory: Path) -> None:
        self.updates = int(json.loads((directory / "grpo.json").read_text())["updates"])

    def __call__(self, model: DiffusionModel, reward_fn: Reward, prompts: list[str], seeds: list[int],
                 cfg: FinetuneConfig, gen: torch.Generator) -> Iterator[LossOut]:
        T = cfg.num_inference_steps
        # 1. the SDE window of this update
        window = sde_window(cfg, T, self.updates)
        self.updates += 1
        etas = eta_schedule(cfg.eta, T, window)
        # 2. the groups' trajectories, with states and log-probabilities, and their rewards
        with torch.no_grad():
            traj = model.sample(prompts, seeds, T, eta=etas, guidance_scale=cfg.guidance_scale, keep_states=True)
            rewards = reward_fn(model.output(traj.x0), prompts).detach().float()
        # 3. group-relative advantages; groups with no signal dropped
        adv, flat, zero_std = gathered_advantages(self.acc, prompts, rewards, cfg.global_std)
        adv = adv.clamp(-cfg.adv_clip, cfg.adv_clip)
        trained = trained_steps(model.process, traj.timesteps, window, cfg)
        return self._updates(model, traj, prompts, rewards, adv, flat, zero_std, window, trained, cfg, gen)

    def _updates(self, model, traj, prompts, rewards, adv, flat, zero_std, window, trained, cfg, gen) -> Iterator[LossOut]:
        # 4. clipped-ratio updates with the KL of the transition means
        ts, B, d = traj.timesteps, len(prompts), traj.x0[0].numel()
        prevs = model.process.prev_timesteps(ts)
        kept = torch.nonzero(~flat).reshape(-1)
        per_call = evaluations_per_call(cfg.guidance_scale)
        conds = PromptConditions(model, prompts, cfg.guidance_scale)
        signal = zero_std < 1.0  # some group somewhere has a signal (the same answer on every process)
        if not signal:  # nothing to learn: one pass at weight 0 and no optimizer step, on every process alike
            trained = trained[:1]
        first = True
        for rows, weight in minibatch_passes(kept, cfg, signal, gen):
            for k, j in enumerate(trained):
                loss, extra, n_ref = self._loss(model, traj, conds, rows, adv, j, ts, prevs, d, cfg)
                nfe = (per_call + n_ref) * len(rows) + (traj.nfe if first else 0)
                extra.update(zero_std_ratio=zero_std, kept=float(len(kept)) / B, window_start=float(window.start))
                yield LossOut(loss * weight / len(trained), rewards[rows], torch.zeros(len(rows)), nfe, j,
                              step=signal and k == len(trained) - 1, extra=extra, queries=B if first else 0)
                first = False

    def _loss(self, model, traj, conds, rows, adv, j, ts, prevs, d, cfg) -> tuple[Tensor, dict, int]:
        """The clipped surrogate plus beta times the KL of the means, at step j for ``rows``."""
        cond, uncond = conds.rows(rows)
        x_t, x_prev = traj.xs[j][rows], traj.xs[j + 1][rows]
        new = policy_step(model.net, model, x_t, x_prev, ts[j], prevs[j], cond, uncond, cfg.guidance_scale, cfg.eta)
        old = traj.log_probs[rows, j] / d
        lp = new.log_prob / d
        ratio = torch.exp(lp - old)
        loss = ppo_loss(adv[rows], ratio, cfg.ppo_clip)
        kl, n_ref = torch.zeros(()), 0
        if cfg.kl_weight > 0 and model.reference is not None:
            with torch.no_grad():
                ref = policy_step(model.reference, model, x_t, x_prev, ts[j], prevs[j], cond, uncond, cfg.guidance_scale, cfg.eta)
            s = kl_scale(model.process, ts[j], prevs[j], cfg.eta)
            kl = ((new.mean - ref.mean) ** 2).flatten(1).mean(1).mean() / (2 * s**2)
            loss = loss + cfg.kl_weight * kl
            n_ref = evaluations_per_call(cfg.guidance_scale)
        with torch.no_grad():
            extra = {"clipfrac": float(((ratio - 1).abs() > cfg.ppo_clip).float().mean()),
                     "approx_kl": float(0.5 * ((lp - old) ** 2).mean()), "advantage_abs": float(adv[rows].abs().mean()),
                     "kl_means": float(kl)}
        return loss, extra, n_ref


def minibatch_passes(kept: Tensor, cfg: FinetuneConfig, signal: bool, gen: torch.Generator) -> Iterator[tuple[Tensor, float]]:
    """(rows, weight) of each minibatch: ``ppo_epochs`` passes over ``ppo_minibatches`` slices of
    the kept rows in a random order. An empty slice is one row at weight 0, and a batch with no
    signal anywhere is one pass of one slice, so every process takes the same backward passes."""
    for _ in range(cfg.ppo_epochs if signal else 1):
        order = kept[torch.randperm(len(kept), generator=gen)]
        for rows in _minibatches(order, cfg.ppo_minibatches if signal else 1):
            yield (rows, 1.0) if len(rows) else (torch.zeros(1, dtype=torch.long), 0.0)


def _minibatches(rows: Tensor, n: int) -> list[Tensor]:
    """``rows`` in ``n`` nearly equal consecutive slices (some may be empty)."""
    size = math.ceil(len(rows) / n) if len(rows) else 0
    return [rows[m * size : (m + 1) * size] for m in range(n)]
