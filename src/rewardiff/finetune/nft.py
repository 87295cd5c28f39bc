"""DiffusionNFT: online RL on the forward process (Zheng et al. 2025, arXiv 2509.16117).

No log-probabilities and no stochastic sampler: the policy is trained with the flow-matching
loss on its own clean samples, split by reward into what to move towards and what to move
away from. One training step of :class:`NFT`:

1. sample the batch (groups of ``group_size`` per prompt, as GRPO) with the slowly updated
   "old" weights, any sampler (eta 0: the ODE; the authors use a deterministic solver) and
   ``guidance_scale`` (the authors train CFG-free, 1), and score the clean samples x_0;
2. advantages as GRPO's (:func:`~rewardiff.finetune.grpo.group_advantages`), clipped to
   [-A, A] (A = ``adv_clip``), mapped to an optimality r = clamp(adv / A / 2 + 1/2, 0, 1);
   groups whose rewards are all equal carry no signal and are dropped (counted);
3. for each sample, the first ``timestep_fraction`` of the sampler's timesteps in a random
   order of its own; at each, x_t = (1 - t) x_0 + t eps with fresh noise, and the velocities
   v_theta (with gradient), v_old (the old weights, no gradient), v_ref (the base model);
   implicit policies v+ = beta v_theta + (1 - beta) v_old and v- = (1 + beta) v_old - beta v_theta
   (beta = ``nft_beta``), their clean estimates x0(v) = x_t - t v, and the loss

       L = A * mean( r ||x0(v+) - x_0||^2 / w+ + (1 - r) ||x0(v-) - x_0||^2 / w- ) / beta
           + kl_weight * mean( ||v_theta - v_ref||^2 ),

   with squared norms averaged over dimensions and w the detached mean absolute error of each
   estimate, floored at 1e-5 (their adaptive weighting); one optimizer step per minibatch, its
   gradient accumulated over the timesteps;
4. after the step's updates, old <- d old + (1 - d) theta with d = min(nft_decay_rate * step,
   nft_decay_max) (the authors' decay_type 1: min(0.001 step, 0.5); d = 0 copies theta).

The loss needs a velocity (a flow model); on a DDIM model it reads its ``x0_hat`` the same way
through the process (named deviation: the authors define it for flow models only). Other named
deviations: the old weights are a copy of the trainable parameters swapped into the net for
their evaluations (the authors keep a second LoRA adapter: the same numbers); no EMA of the
weights for evaluation; the decay counts trainer steps (theirs: optimizer steps).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.draft import PromptConditions
from rewardiff.finetune.grpo import gathered_advantages, minibatch_passes
from rewardiff.finetune.sharding import full, is_main, like
from rewardiff.io import atomic_write, atomic_write_text
from rewardiff.models.base import DiffusionModel
from rewardiff.rollout import timestep_tensor
from rewardiff.types import LossOut, Reward

WEIGHT_FLOOR = 1e-5  # the adaptive weights' floor, as the authors'


def optimality(adv: Tensor, clip: float) -> Tensor:
    """r = clamp(clamp(adv, -A, A) / A / 2 + 1/2, 0, 1): 1 for the best in a group, 0 for the worst. [B] -> [B]"""
    return (adv.clamp(-clip, clip) / clip / 2 + 0.5).clamp(0, 1)


def nft_loss(x0: Tensor, v: Tensor, v_old: Tensor, r: Tensor, beta: float, split) -> tuple[Tensor, Tensor, Tensor]:
    """The per-sample NFT loss (step 3 without the constant A) and the two estimates' squared
    errors, from the velocities at one x_t. -> [B], [B], [B]

    ``split(v)`` is the clean estimate the process reads off an output at that x_t
    (x_t - sigma v for a flow).
    """
    pos_v = beta * v + (1 - beta) * v_old
    neg_v = (1 + beta) * v_old - beta * v
    pos_err, neg_err = split(pos_v) - x0, split(neg_v) - x0
    w_pos = pos_err.detach().abs().flatten(1).mean(1).clamp(min=WEIGHT_FLOOR)
    w_neg = neg_err.detach().abs().flatten(1).mean(1).clamp(min=WEIGHT_FLOOR)
    pos = pos_err.pow(2).flatten(1).mean(1) / w_pos
    neg = neg_err.pow(2).flatten(1).mean(1) / w_neg
    return (r * pos + (1 - r) * neg) / beta, pos_err.detach().pow(2).flatten(1).mean(1), neg_err.detach().pow(2).flatten(1).mean(1)


class NFT:
    """The DiffusionNFT method: holds the old weights; yields one loss per (minibatch, timestep).

    Args:
        cfg: the run's configuration (group_size, global_std, adv_clip, nft_beta, nft_decay_*,
            kl_weight, ppo_epochs, ppo_minibatches, timestep_fraction).
        model: the model being fine-tuned, its trainable parameters already chosen (LoRA or all).
        acc: the run's accelerator; advantages over the gathered global batch as GRPO's.
    """

    def __init__(self, cfg: FinetuneConfig, model: DiffusionModel, acc=None):
        if cfg.group_size < 2:
            raise UserError("method 'nft' compares samples within a group: set group_size >= 2 (the authors use 24)")
        self.acc, self.updates = acc, 0
        self.old = [p.detach().clone() for p in _trainable(model.net)]

    # ------------------------------------------------------------------ state

    def save(self, directory: Path) -> None:
        """The old weights and the update counter (``nft_old.safetensors``, ``nft.json``)."""
        from safetensors.torch import save_file

        whole, self._whole = getattr(self, "_whole", None) or self.old, None
        state = {f"p{i}": t.contiguous() for i, t in enumerate(whole)}
        atomic_write(directory / "nft_old.safetensors", lambda p: save_file(state, str(p)))
        atomic_write_text(directory / "nft.json", json.dumps({"updates": self.updates}))

    def load(self, directory: Path) -> None:
        from safetensors.torch import load_file

        state = load_file(str(directory / "nft_old.safetensors"))
        self.old = [like(t, state[f"p{i}"]) for i, t in enumerate(self.old)]  # a sharded run: this process's slice
        self.updates = int(json.loads((directory / "nft.json").read_text())["updates"])

    def gather(self) -> None:
        """A sharded run, before a checkpoint (collective): the old weights whole, for :meth:`save`."""
        main, whole = is_main(), []
        for t in self.old:  # collective, one tensor at a time; only the main process keeps them
            w = full(t)
            if main:
                whole.append(w.cpu())
        self._whole = whole if main else None

    @contextmanager
    def old_weights(self, net):
        """The old weights in ``net`` for the duration (no gradient), the trained ones after."""
        params = _trainable(net)
        with torch.no_grad():
            kept = [p.detach().clone() for p in params]
            for p, o in zip(params, self.old):
                p.copy_(o)
            try:
                yield
            finally:
                for p, k in zip(params, kept):
                    p.copy_(k)

    def _decay(self, cfg: FinetuneConfig) -> float:
        """d of step 4 at the current update."""
        return min(cfg.nft_decay_rate * self.updates, cfg.nft_decay_max)

    def _update_old(self, net, cfg: FinetuneConfig) -> None:
        d = self._decay(cfg)
        with torch.no_grad():
            for o, p in zip(self.old, _trainable(net)):
                o.mul_(d).add_(p.detach(), alpha=1 - d)

    # ------------------------------------------------------------------ one step

    def __call__(self, model: DiffusionModel, reward_fn: Reward, prompts: list[str], seeds: list[int],
                 cfg: FinetuneConfig, gen: torch.Generator) -> Iterator[LossOut]:
        T, B = cfg.num_inference_steps, len(prompts)
        # 1. clean samples of the old weights, and their rewards
        with torch.no_grad(), self.old_weights(model.net):
            traj = model.sample(prompts, seeds, T, eta=cfg.eta, guidance_scale=cfg.guidance_scale)
            rewards = reward_fn(model.output(traj.x0), prompts).detach().float()
        # 2. optimality of each sample in its group; groups with no signal dropped
        adv, flat, zero_std = gathered_advantages(self.acc, prompts, rewards, cfg.global_std)
        r = optimality(adv, cfg.adv_clip)
        # 3. each sample's timesteps: the first fraction of a random order of the sampler's
        n_t = max(1, int(cfg.timestep_fraction * T))
        order = torch.stack([torch.randperm(T, generator=gen)[:n_t] for _ in range(B)])  # [B, n_t]
        ts = timestep_tensor(traj.timesteps)[order]  # [B, n_t], as the denoiser reads them
        return self._updates(model, traj.x0.detach(), traj.nfe, prompts, rewards, r, flat, zero_std, ts, cfg, gen)

    def _updates(self, model, x0, sample_nfe, prompts, rewards, r, flat, zero_std, ts, cfg, gen) -> Iterator[LossOut]:
        B, n_t = len(prompts), ts.shape[1]
        kept = torch.nonzero(~flat).reshape(-1)
        conds = PromptConditions(model, prompts, 1.0)
        n_ref = 1 if cfg.kl_weight > 0 and model.reference is not None else 0
        signal = zero_std < 1.0  # some group somewhere has a signal (the same answer on every process)
        if not signal:  # nothing to learn: one pass at weight 0 and no optimizer step, on every process alike
            n_t = 1
        first = True
        for rows, weight in minibatch_passes(kept, cfg, signal, gen):
            for j in range(n_t):
                loss, extra = self._loss(model, conds, x0[rows], ts[rows, j], r[rows], rows, cfg, gen)
                extra.update(zero_std_ratio=zero_std, kept=float(len(kept)) / B, old_decay=self._decay(cfg))
                nfe = (2 + n_ref) * len(rows) + (sample_nfe if first else 0)
                yield LossOut(loss * weight / n_t, rewards[rows], torch.zeros(len(rows)), nfe, 0, step=signal and j == n_t - 1,
                              extra=extra, queries=B if first else 0)
                first = False
        # 4. the old weights follow the trained ones (after the last optimizer step of this call)
        self._update_old(model.net, cfg)
        self.updates += 1

    def _loss(self, model, conds, x0, t, r, rows, cfg, gen) -> tuple[Tensor, dict]:
        """NFT's loss at timesteps ``t`` [b] for the clean samples ``x0`` [b, ...]."""
        process, net = model.process, model.net
        noise = torch.randn(x0.shape, generator=gen).to(x0.device)
        t = t.to(x0.device)
        x_t = process.add_noise(x0, noise, t)
        with torch.no_grad(), self.old_weights(net):  # first: the swap must not touch a graph being built
            v_old = net(x_t, t, conds.rows(rows)[0])  # a trained prompt encoder reads with its old weights too
        cond, _ = conds.rows(rows)
        v = net(x_t, t, cond)
        per, pos, neg = nft_loss(x0, v, v_old, r, cfg.nft_beta, lambda u: process.split(u, x_t, t)[0])
        loss = cfg.adv_clip * per.mean()
        kl = torch.zeros(())
        if cfg.kl_weight > 0 and model.reference is not None:
            with torch.no_grad():
                v_ref = model.reference(x_t, t, cond)
            kl = (v - v_ref).pow(2).flatten(1).mean(1).mean()
            loss = loss + cfg.kl_weight * kl
        extra = {"r_mean": float(r.mean()), "x0_err_pos": float(pos.mean()), "x0_err_neg": float(neg.mean()),
                 "v_to_old": float((v.detach() - v_old).pow(2).mean()), "v_to_ref": float(kl.detach())}
        return loss, extra


def _trainable(net) -> list[Tensor]:
    return [p for p in net.parameters() if p.requires_grad]

