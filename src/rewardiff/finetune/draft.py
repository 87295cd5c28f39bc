"""Reward-backpropagation losses: DRaFT, DRaFT-K, DRaFT-LV, AlignProp and ReFL.

Each method is a loss over a trajectory sampled through the one rollout loop; they differ
only in which steps carry gradient and in where the reward is read:

    draft      Clark et al. 2023 (arXiv 2309.17400): gradient through every step.
    draft-k    the same paper: only the last K steps carry gradient.
    draft-lv   the same paper, K = 1 with lower variance: re-noise the final sample n times
               to the last step's noise level (the process's forward noising) and denoise
               each copy with gradient.
    alignprop  Prabhudesai et al. 2023 (arXiv 2310.03739): the truncation point is drawn
               once per trajectory (uniform, or Gaussian near the end of the chain).
    refl       Xu et al. 2023 (ImageReward): stop at a random late step and read the reward
               on the one-step estimate x0_hat with gradient.

The optional penalty ``kl_weight * ||out_theta - out_base||^2`` (DRaFT+, the process's
``divergence``) is computed by the rollout on the gradient steps against the frozen base model.
Nothing here reads the process's schedule: timesteps come from ``process.timesteps``, the
re-noising from ``process.add_noise``, so every method runs on a Gaussian or a flow process.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.models.base import DiffusionModel
from rewardiff.rollout import gather_rows, guided_output, last_k, rollout
from rewardiff.types import LossOut, Reward


def _needs_grad(c) -> bool:
    if isinstance(c, dict):
        return any(_needs_grad(v) for v in c.values())
    return isinstance(c, Tensor) and c.requires_grad


class PromptConditions:
    """The conditions of a batch's prompts, for methods that take many losses on one batch.

    When the prompt encoder is frozen (LoRA on the UNet), the prompts are encoded once and
    rows are taken from that; when it trains (full fine-tuning), each call encodes again,
    since every backward pass frees the graph of the encoding it used.
    """

    def __init__(self, model: DiffusionModel, prompts: list[str], guidance_scale: float):
        self.model, self.prompts, self.cfg_on = model, prompts, guidance_scale != 1.0
        with torch.enable_grad():
            self.trains = _needs_grad(model.encode(prompts[:1]))
        if not self.trains:
            with torch.no_grad():
                self.cond = model.encode(prompts)
                self.uncond = model.encode(model.unconditional(prompts)) if self.cfg_on else None

    def rows(self, rows: Tensor):
        """(cond, uncond) of the batch rows ``rows`` (uncond None without guidance)."""
        if self.trains:
            p = [self.prompts[int(i)] for i in rows]
            return self.model.encode(p), self.model.encode(self.model.unconditional(p)) if self.cfg_on else None
        return gather_rows(self.cond, rows), gather_rows(self.uncond, rows)


def _objective(reward: Tensor, kl: Tensor, cfg: FinetuneConfig) -> Tensor:
    return -reward.mean() + cfg.kl_weight * kl.mean()


def _window_loss(model: DiffusionModel, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig, k: int) -> LossOut:
    """Sample with gradient through the last ``k`` steps and return -reward (+ penalty)."""
    T = cfg.num_inference_steps
    traj = model.sample(
        prompts, seeds, T, eta=cfg.eta, guidance_scale=cfg.guidance_scale,
        grad_steps=last_k(T, k), checkpoint=cfg.checkpointing, kl=cfg.kl_weight > 0,
    )
    r = reward_fn(model.decode(traj.x0), prompts)
    return LossOut(_objective(r, traj.kl, cfg), r.detach(), traj.kl.detach(), traj.nfe, T - k)


def draft(model, reward_fn, prompts, seeds, cfg, gen) -> LossOut:
    """DRaFT: backpropagate through the whole chain (K = T)."""
    return _window_loss(model, reward_fn, prompts, seeds, cfg, cfg.num_inference_steps)


def draft_k(model, reward_fn, prompts, seeds, cfg, gen) -> LossOut:
    """DRaFT-K: the first T - K steps run without gradient."""
    return _window_loss(model, reward_fn, prompts, seeds, cfg, cfg.k)


def alignprop(model, reward_fn, prompts, seeds, cfg, gen) -> LossOut:
    """AlignProp: randomized truncation, the window drawn once per trajectory batch."""
    return _window_loss(model, reward_fn, prompts, seeds, cfg, truncation_k(cfg, gen))


def truncation_k(cfg: FinetuneConfig, gen: torch.Generator) -> int:
    """Number of gradient steps K in [1, T]: uniform, or T - start with start ~ N(mean T, std T)."""
    T = cfg.num_inference_steps
    if cfg.truncation == "uniform":
        return int(torch.randint(1, T + 1, (1,), generator=gen))
    if cfg.truncation == "gaussian":
        start = cfg.truncation_mean * T + cfg.truncation_std * T * float(torch.randn(1, generator=gen))
        return T - min(max(round(start), 1), T - 1)
    raise UserError(f"unknown truncation {cfg.truncation!r}; choose uniform or gaussian")


def draft_lv(model, reward_fn, prompts, seeds, cfg, gen) -> LossOut:
    """DRaFT-LV: K = 1 with ``lv_n`` re-noised copies of each final sample.

    1. sample x_0 with no gradient;
    2. n times: x_1^i = ``process.add_noise(x_0, eps_i, t_1)`` at the last step's level
       (sqrt(abar_1) x_0 + sqrt(1 - abar_1) eps_i for DDPM, (1 - sigma_1) x_0 + sigma_1 eps_i for flow);
    3. denoise each x_1^i one step with gradient and average the rewards of the results.
    """
    T, n = cfg.num_inference_steps, cfg.lv_n
    with torch.no_grad():
        base = model.sample(prompts, seeds, T, eta=cfg.eta, guidance_scale=cfg.guidance_scale)
    t_last = model.process.timesteps(T)[-1]
    x0 = base.x0.repeat(n, *[1] * (base.x0.dim() - 1))  # [n*B, ...]
    eps = torch.randn(x0.shape, generator=gen).to(x0)
    x1 = model.process.add_noise(x0, eps, torch.tensor(t_last))  # a long or float timestep
    rep = prompts * n
    cond = model.encode(rep)
    uncond = model.encode(model.unconditional(rep)) if cfg.guidance_scale != 1.0 else None
    ref = model.reference if cfg.kl_weight > 0 else None
    traj = rollout(model.net, model.process, x1, cond, [t_last], guidance_scale=cfg.guidance_scale, uncond=uncond,
                   grad_steps={0}, checkpoint=False, reference=ref)
    r = reward_fn(model.decode(traj.x0), rep)
    return LossOut(_objective(r, traj.kl, cfg), r.detach(), traj.kl.detach(), base.nfe + traj.nfe, T - 1)


def refl(model, reward_fn, prompts, seeds, cfg, gen) -> LossOut:
    """ReFL: run to a random late step s without gradient, then read r(x0_hat(x_s)) with gradient."""
    T = cfg.num_inference_steps
    ts = model.process.timesteps(T)
    lo = min(max(int(cfg.refl_start * T), 1), T - 1)
    s = int(torch.randint(lo, T, (1,), generator=gen))
    cond = model.encode(prompts)  # with gradient: a fully fine-tuned text encoder learns too
    uncond = model.encode(model.unconditional(prompts)) if cfg.guidance_scale != 1.0 else None
    with torch.no_grad():
        pre = rollout(model.net, model.process, model.noise(seeds), cond, ts[:s], eta=cfg.eta,
                      guidance_scale=cfg.guidance_scale, uncond=uncond, t_final=ts[s], generator=gen)
    out, n = guided_output(model.net, pre.x0, ts[s], cond, uncond, cfg.guidance_scale)
    x0_hat, _ = model.process.split(out, pre.x0, ts[s])
    kl = torch.zeros(len(prompts), device=x0_hat.device)
    if cfg.kl_weight > 0 and model.reference is not None:
        with torch.no_grad():
            ref_out, n_ref = guided_output(model.reference, pre.x0, ts[s], cond, uncond, cfg.guidance_scale)
        kl = model.process.divergence(out, ref_out, pre.x0, ts[s], model.process.prev_timesteps(ts)[s])
        n += n_ref
    r = reward_fn(model.decode(x0_hat), prompts)
    return LossOut(_objective(r, kl, cfg), r.detach(), kl.detach(), pre.nfe + n * len(prompts), s)


LOSSES = {"draft": draft, "draft-k": draft_k, "draft-lv": draft_lv, "alignprop": alignprop, "refl": refl}
