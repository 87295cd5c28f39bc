"""VARD: value-based dense supervision with a KL penalty (arXiv 2505.15791).

A value model V_phi(x_t, t, c) predicts the final reward from an intermediate state. It is
fitted by regression on sampled trajectories, so the reward itself may be a black box.
Fine-tuning then backpropagates V_phi at every step of the chain instead of the reward at
the end of it:

1. sample a batch with the current weights (eta > 0, no gradient), keeping every state
   x_T .. x_0, and score the final samples with the reward;
2. regress V_phi on (x_t, t, c) -> r for every state of the batch (``vard_value_steps`` Adam
   steps of :func:`~rewardiff.rewards.value.fit_value`, the loop ``train_value`` fits with too),
   so the value follows the policy as it moves;
3. for every step j: recompute the step's mean mu_theta(x_j) with gradient, form the next state
   x_{j+1}^theta = x_{j+1} + (mu_theta - sg(mu_theta)) (the sampled state in the forward pass;
   the reparameterized gradient in the backward pass), and minimize

       L_j = -V_phi(x_{j+1}^theta, t_{j+1}, c) + kl_weight * ||mu_theta - mu_base||^2 / (2 sigma_j^2),

   the second term the step's KL to the frozen base model (sigma_j^2 floored as in
   :func:`~rewardiff.finetune.diagnostics.step_variances`); the gradient is accumulated over the
   steps and the trainer takes one optimizer step.

Before the first update the value is fitted on ``vard_warmup`` trajectories of the base model
(or loaded from ``vard_value``, a directory written by ``rewardiff train-value``). Gradients never
pass through more than one step of the chain, so memory stays that of one step.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.diagnostics import step_kl, step_variances
from rewardiff.finetune.draft import PromptConditions
from rewardiff.io import atomic_write
from rewardiff.models.base import DiffusionModel
from rewardiff.rewards.value import ValueNet, fit_value, load_value, pool_cond, scored_rollout
from rewardiff.rollout import evaluations_per_call, guided_output
from rewardiff.types import LossOut, Reward, Timestep, Trajectory

WARMUP_BATCH = 32


class VARD:
    """The VARD method: owns the value model and its optimizer; yields one loss per step.

    Args:
        cfg: the run's configuration (kl_weight, eta, vard_* fields).
        model: the model being fine-tuned (its state shape and condition size fix the value's).
        acc: the run's accelerator; with several processes the value's gradients are averaged
            across them, so every process holds the same value model.
    """

    def __init__(self, cfg: FinetuneConfig, model: DiffusionModel, acc=None):
        if cfg.eta <= 0:
            raise UserError("method 'vard' needs a stochastic sampler: set eta > 0 (e.g. eta=1)")
        self.acc = acc
        self.warm = False
        if cfg.vard_value:
            self.value = load_value(cfg.vard_value).net.to(model.device)
            self.warm = True
        else:
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(cfg.seed + 911)  # the value's initial weights: a function of the seed only
            cond_dim = pool_cond(model.encode([_probe_prompt(cfg, model)])).shape[-1]
            self.value = ValueNet(model.shape, cond_dim).to(model.device)
            torch.random.set_rng_state(gen_state)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=cfg.vard_value_lr)
        self.last_value_loss = float("nan")

    # ------------------------------------------------------------------ state

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous() for k, v in self.value.state_dict().items()}
        atomic_write(directory / "value.safetensors", lambda p: save_file(state, str(p)))
        atomic_write(directory / "value_optimizer.pt", lambda p: torch.save(self.value_opt.state_dict(), p))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        self.value.load_state_dict(load_file(str(directory / "value.safetensors")))
        self.value_opt.load_state_dict(torch.load(directory / "value_optimizer.pt", weights_only=True))
        self.warm = True

    # ------------------------------------------------------------------ the value

    def _fit(self, states: list[Tensor], timesteps: list[Timestep], cond: Tensor, rewards: Tensor, steps: int, gen: torch.Generator) -> float:
        return fit_value(self.value, self.value_opt, states, timesteps, cond, rewards, steps, gen, self._sync_grads)

    def _sync_grads(self) -> None:
        acc = self.acc
        if acc is None or acc.num_processes == 1:
            return
        for p in self.value.parameters():
            if p.grad is not None:
                p.grad = acc.reduce(p.grad, "mean")

    def _rollout(self, model: DiffusionModel, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig):
        return scored_rollout(model, reward_fn, prompts, seeds, cfg.num_inference_steps, cfg.guidance_scale, cfg.eta)

    def _warmup(self, model: DiffusionModel, reward_fn: Reward, cfg: FinetuneConfig, gen: torch.Generator) -> tuple[int, int]:
        """Fit the value on base-model trajectories before the first update; (queries, nfe) spent."""
        n_proc = self.acc.num_processes if self.acc is not None else 1
        rank = self.acc.process_index if self.acc is not None else 0
        n = -(-cfg.vard_warmup // n_proc)
        wgen = torch.Generator().manual_seed(cfg.seed * 7_919 + 104_729 + rank)
        batches = self._warmup_rollouts(model, reward_fn, cfg, n, wgen)
        self._standardize(torch.cat([b[1] for b in batches]), [b[0] for b in batches])
        ts = batches[0][0].timesteps
        per = max(1, cfg.vard_warmup_steps // len(batches))
        final = model.process.prev_timesteps(ts)[-1:]  # the clean sample's timestep
        for traj, r, c in batches:
            self._fit(traj.xs, ts + final, c, r, per, wgen)
        self.warm = True
        return n, sum(b[0].nfe for b in batches)

    def _warmup_rollouts(self, model: DiffusionModel, reward_fn: Reward, cfg: FinetuneConfig, n: int,
                         wgen: torch.Generator) -> list[tuple[Trajectory, Tensor, Tensor]]:
        """``n`` scored base-model trajectories in batches of ``WARMUP_BATCH``: (trajectory, rewards [B],
        pooled condition [B, D]) each; prompts drawn from the run's training prompts, seeds from ``wgen``."""
        from rewardiff.prompts import EVAL_SEED, prompt_set

        train = prompt_set(cfg.prompts)
        idx = torch.randint(0, len(train), (n,), generator=wgen)
        seeds = torch.randint(0, EVAL_SEED, (n,), generator=wgen).tolist()
        batches = []
        for i in range(0, n, WARMUP_BATCH):
            p = [train[int(k)] for k in idx[i : i + WARMUP_BATCH]]
            traj, r = self._rollout(model, reward_fn, p, seeds[i : i + WARMUP_BATCH], cfg)
            batches.append((traj, r, pool_cond(model.encode(p)).detach()))
        return batches

    def _standardize(self, rewards: Tensor, trajs: list[Trajectory]) -> None:
        """The value's target standardization from the warm-up rewards [N], and for images its
        input statistics over every state x_T .. x_1 of the warm-up trajectories."""
        self.value.target_mean.fill_(float(rewards.mean()))
        self.value.target_std.fill_(float(rewards.std()) + 1e-6 if len(rewards) > 1 else 1.0)
        if self.value.image:
            states = torch.cat([torch.cat(traj.xs[:-1]) for traj in trajs])
            stats = self.value.input_stats(states)
            self.value.stat_mean.copy_(stats.mean(0))
            self.value.stat_std.copy_(stats.std(0) + 1e-6)

    # ------------------------------------------------------------------ one training step

    def __call__(self, model: DiffusionModel, reward_fn: Reward, prompts: list[str], seeds: list[int],
                 cfg: FinetuneConfig, gen: torch.Generator) -> Iterator[LossOut]:
        extra_q, extra_nfe = self._warmup(model, reward_fn, cfg, gen) if not self.warm and cfg.vard_warmup > 0 else (0, 0)
        self.warm = True
        traj, rewards = self._rollout(model, reward_fn, prompts, seeds, cfg)
        ts = traj.timesteps
        prevs = model.process.prev_timesteps(ts)
        pooled = pool_cond(model.encode(prompts)).detach()
        if cfg.vard_value_steps > 0:  # 2. the value follows the policy
            self.last_value_loss = self._fit(traj.xs, ts + prevs[-1:], pooled, rewards, cfg.vard_value_steps, gen)
        variances = step_variances(model, ts, cfg.eta)
        per_call = evaluations_per_call(cfg.guidance_scale)
        T, B = len(ts), len(prompts)
        conds = PromptConditions(model, prompts, cfg.guidance_scale)
        every = torch.arange(B)
        for j in range(T):  # 3. dense value gradients, one step at a time
            cond, uncond = conds.rows(every)
            loss, kl, v = self._step_loss(model, traj.xs[j], traj.xs[j + 1], ts[j], prevs[j], cond, uncond, pooled, variances[j], cfg)
            first = j == 0
            nfe = per_call * B * (2 if model.reference is not None and cfg.kl_weight > 0 else 1) + ((traj.nfe + extra_nfe) if first else 0)
            extra = {"value": float(v.mean()), "value_loss": self.last_value_loss}
            yield LossOut(loss / T, rewards, kl, nfe, 0, step=j == T - 1, extra=extra, queries=(B + extra_q) if first else 0)

    def _step_loss(self, model: DiffusionModel, x_t: Tensor, x_next: Tensor, t: Timestep, t_prev: Timestep, cond, uncond,
                   pooled: Tensor, var: float, cfg: FinetuneConfig) -> tuple[Tensor, Tensor, Tensor]:
        zeros = torch.zeros_like(x_t)
        out, _ = guided_output(model.net, x_t, t, cond, uncond, cfg.guidance_scale)
        mean = model.process.step(out, t, t_prev, x_t, cfg.eta, zeros).mean
        x_theta = x_next + (mean - mean.detach())
        v = self.value(x_theta, t_prev, pooled)
        kl = torch.zeros(x_t.shape[0], device=x_t.device)
        if model.reference is not None and cfg.kl_weight > 0:
            with torch.no_grad():
                ref_out, _ = guided_output(model.reference, x_t, t, cond, uncond, cfg.guidance_scale)
                ref_mean = model.process.step(ref_out, t, t_prev, x_t, cfg.eta, zeros).mean
            kl = step_kl(mean, ref_mean, var)
        return -v.mean() + cfg.kl_weight * kl.mean(), kl.detach(), v.detach()


def _probe_prompt(cfg: FinetuneConfig, model: DiffusionModel) -> str:
    """A prompt whose condition has the width of every other: a training prompt (one of an
    image-conditioned model carries its image; "" names none), "" for unconditional models."""
    if not getattr(model, "conditional", True):
        return ""
    from rewardiff.prompts import prompt_set

    return prompt_set(cfg.prompts)[0]
