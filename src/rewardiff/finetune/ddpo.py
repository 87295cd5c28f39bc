"""DDPO: policy-gradient fine-tuning for rewards with no gradient (Black et al. 2023, arXiv 2305.13301).

Each stochastic step (DDIM with eta > 0, the authors use 1; or a flow SDE or CPS step) is a
Gaussian policy pi_theta(x_{t-1} | x_t, c). One training step of :class:`DDPO`:

1. sample a batch of trajectories with the current weights, no gradient, keeping every
   state and each step's log-probability log pi_old;
2. score the final samples with the reward (a black box: only its values are used);
3. normalize the rewards per prompt with a running buffer (:class:`PerPromptStats`), clip
   the advantages to [-adv_clip, adv_clip];
4. for ``ppo_epochs`` passes over ``ppo_minibatches`` minibatches, and for every trained step
   j, recompute log pi_theta(x_{j+1} | x_j) and minimize the clipped surrogate

       L = mean( max(-A r, -A clip(r, 1 - eps, 1 + eps)) ),   r = exp(log pi_theta - log pi_old),

   accumulating the gradient over the steps of a minibatch and taking one optimizer step
   per minibatch (the trainer does the stepping; this module only yields losses).

Log-probabilities are averaged over the sample's dimensions, as the authors' code does: the
clip range 1e-4 is calibrated against that scale. Steps with a deterministic transition
(std 0, e.g. DDIM's last one when abar after it is 1) carry no probability ratio and are skipped.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.draft import PromptConditions
from rewardiff.io import atomic_write_text
from rewardiff.models.base import DiffusionModel
from rewardiff.rollout import evaluations_per_call, guided_output
from rewardiff.types import LossOut, Reward, StepOut, Timestep


def ppo_loss(advantages: Tensor, ratio: Tensor, clip: float) -> Tensor:
    """The clipped surrogate: mean over rows of max(-A r, -A clip(r, 1 - clip, 1 + clip)). [B], [B] -> scalar"""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped).mean()


class PerPromptStats:
    """Running reward statistics per prompt (DDPO's per-prompt normalization).

    Each prompt keeps its last ``buffer_size`` rewards. A prompt with fewer than ``min_count``
    of them is normalized with the current batch's mean and std instead.
    """

    def __init__(self, buffer_size: int = 16, min_count: int = 16):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        """(r - mean) / (std + 1e-6) for every row, after adding the batch to the buffers. [B] -> [B]"""
        r = rewards.detach().double().cpu()
        out = torch.empty_like(r)
        batch_mean, batch_std = float(r.mean()), float(r.std(unbiased=False))
        for p in dict.fromkeys(prompts):
            rows = torch.tensor([i for i, q in enumerate(prompts) if q == p])
            buf = self.buffers.setdefault(p, deque(maxlen=self.buffer_size))
            buf.extend(float(v) for v in r[rows])
            if len(buf) < self.min_count:
                mean, std = batch_mean, batch_std
            else:
                vals = torch.tensor(list(buf), dtype=torch.float64)
                mean, std = float(vals.mean()), float(vals.std(unbiased=False))
            out[rows] = (r[rows] - mean) / (std + 1e-6)
        return out.to(rewards.device, torch.float32)

    def state_dict(self) -> dict:
        return {"buffers": {p: list(b) for p, b in self.buffers.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.buffers = {p: deque(v, maxlen=self.buffer_size) for p, v in state.get("buffers", {}).items()}


def policy_step(net, model: DiffusionModel, x_t: Tensor, x_prev: Tensor, t: Timestep, t_prev: Timestep, cond, uncond,
                scale: float, eta: float) -> StepOut:
    """The step x_t -> x_prev under ``net`` (guidance ``scale``, stochasticity ``eta``): its mean,
    std and the log-probability of ``x_prev``, summed over dimensions [B]."""
    out, _ = guided_output(net, x_t, t, cond, uncond, scale)
    step = model.process.step(out, t, t_prev, x_t, eta, torch.zeros_like(x_t))
    return step._replace(log_prob=model.process.log_prob(x_prev, step.mean, step.std))


def step_log_prob(model: DiffusionModel, x_t: Tensor, x_prev: Tensor, t: Timestep, t_prev: Timestep, cond, uncond, cfg: FinetuneConfig) -> Tensor:
    """log pi_theta(x_prev | x_t) of one step at eta = ``cfg.eta``, summed over dimensions [B]."""
    return policy_step(model.net, model, x_t, x_prev, t, t_prev, cond, uncond, cfg.guidance_scale, cfg.eta).log_prob


def gather_batch(acc, prompts: list[str], values: Tensor) -> tuple[list[str], Tensor, slice | None]:
    """The prompts and values [B] of the global batch of every process (``acc``; None or one
    process: this batch alone), and this process's rows of it (None with one process)."""
    v = values.detach().float().reshape(-1)
    if acc is None or acc.num_processes == 1:
        return list(prompts), v, None
    from accelerate.utils import gather_object

    B = len(prompts)
    return gather_object(list(prompts)), acc.gather(v), slice(acc.process_index * B, (acc.process_index + 1) * B)


class DDPO:
    """The DDPO method: called once per trainer step, it yields one loss per (minibatch, step).

    Args:
        cfg: the run's configuration (ppo_clip, adv_clip, ppo_epochs, ppo_minibatches,
            stat_buffer, stat_min_count, timestep_fraction).
        model: the model it trains (unused at construction: the per-step call receives it).
        acc: the run's accelerator; with several processes the per-prompt statistics are
            computed on the gathered global batch, so every process holds the same state.
    """

    def __init__(self, cfg: FinetuneConfig, model=None, acc=None):
        if cfg.eta <= 0:
            raise UserError("method 'ddpo' needs a stochastic sampler: set eta > 0 (the authors use eta=1)")
        if cfg.ppo_minibatches < 1 or cfg.batch_size % cfg.ppo_minibatches:
            raise UserError(f"config field 'ppo_minibatches' must divide batch_size ({cfg.batch_size}), got {cfg.ppo_minibatches}")
        if not 0 < cfg.timestep_fraction <= 1:
            raise UserError(f"config field 'timestep_fraction' must be in (0, 1], got {cfg.timestep_fraction}")
        self.stats = PerPromptStats(cfg.stat_buffer, cfg.stat_min_count)
        self.acc = acc

    def save(self, directory: Path) -> None:
        """The per-prompt buffers, into ``directory/ddpo_stats.json`` (a checkpoint)."""
        atomic_write_text(directory / "ddpo_stats.json", json.dumps(self.stats.state_dict()))

    def load(self, directory: Path) -> None:
        self.stats.load_state_dict(json.loads((directory / "ddpo_stats.json").read_text()))

    def _advantages(self, prompts: list[str], rewards: Tensor) -> Tensor:
        every, r, mine = gather_batch(self.acc, prompts, rewards)
        adv = self.stats.advantages(every, r)
        return adv if mine is None else adv[mine]

    def __call__(self, model: DiffusionModel, reward_fn: Reward, prompts: list[str], seeds: list[int],
                 cfg: FinetuneConfig, gen: torch.Generator) -> Iterator[LossOut]:
        T, B = cfg.num_inference_steps, len(prompts)
        # 1. trajectories of the current policy, with states and log-probabilities
        with torch.no_grad():
            traj = model.sample(prompts, seeds, T, eta=cfg.eta, guidance_scale=cfg.guidance_scale, keep_states=True)
            rewards = reward_fn(model.output(traj.x0), prompts).detach().float()
        # 2. advantages, normalized per prompt and clipped
        adv = self._advantages(prompts, rewards).clamp(-cfg.adv_clip, cfg.adv_clip)
        d = traj.x0[0].numel()
        ts = traj.timesteps
        prevs = model.process.prev_timesteps(ts)
        stochastic = [j for j in range(T) if float(model.process.step_std(ts[j], prevs[j], cfg.eta)) > 0]
        n_train = max(1, round(cfg.timestep_fraction * len(stochastic)))
        steps = [stochastic[int(i)] for i in torch.randperm(len(stochastic), generator=gen)[:n_train]]
        per_call = evaluations_per_call(cfg.guidance_scale)
        size = B // cfg.ppo_minibatches
        conds = PromptConditions(model, prompts, cfg.guidance_scale)
        first = True
        # 3. clipped-ratio updates: one optimizer step per minibatch, accumulated over its steps
        for _ in range(cfg.ppo_epochs):
            order = torch.randperm(B, generator=gen)
            for m in range(cfg.ppo_minibatches):
                rows = order[m * size : (m + 1) * size]
                for k, j in enumerate(steps):
                    cond, uncond = conds.rows(rows)
                    lp = step_log_prob(model, traj.xs[j][rows], traj.xs[j + 1][rows], ts[j], prevs[j], cond, uncond, cfg) / d
                    old = traj.log_probs[rows, j] / d
                    ratio = torch.exp(lp - old)
                    loss = ppo_loss(adv[rows], ratio, cfg.ppo_clip) / len(steps)
                    with torch.no_grad():
                        extra = {"clipfrac": float(((ratio - 1).abs() > cfg.ppo_clip).float().mean()),
                                 "approx_kl": float(0.5 * ((lp - old) ** 2).mean()), "advantage_abs": float(adv[rows].abs().mean())}
                    nfe = per_call * len(rows) + (traj.nfe if first else 0)
                    yield LossOut(loss, rewards[rows], torch.zeros(len(rows)), nfe, j, step=k == len(steps) - 1,
                                  extra=extra, queries=B if first else 0)
                    first = False
