"""``train_value``: fit a value model on a base model's own trajectories and save it.

    from rewardiff.rewards.value import train_value, load_value
    card = train_value(model, get_reward("brightness"), "runs/value-brightness")
    value = load_value("runs/value-brightness")
    v = value(x_t, t, model.encode(prompts))  # float [B], in reward units
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.optim import warmup_cosine_schedule
from rewardiff.prompts import prompt_set
from rewardiff.rewards.value.fit import Rollouts, collect, heldout_r2, regress, shuffled_states
from rewardiff.rewards.value.net import AnyValueNet, value_net_for
from rewardiff.rewards.value.store import save_value
from rewardiff.rollout import plain_timestep
from rewardiff.types import Reward

if TYPE_CHECKING:
    from rewardiff.models.base import DiffusionModel

HOLDOUT = 0.1  # fraction of trajectories held out for the metrics
LR_FLOOR = 0.1  # the cosine decay ends at this fraction of the peak learning rate
WEIGHT_DECAY = 1e-4  # AdamW's
CLIP = 1.0  # gradient norm clip


def train_value(
    model: DiffusionModel,
    reward: Reward | str,
    out_dir: str | Path,
    *,
    trajectories: int = 2048,
    steps: int = 1500,
    batch_size: int = 256,
    lr: float = 1e-3,
    num_inference_steps: int = 15,
    guidance_scale: float = 2.0,
    eta: float = 1.0,
    prompts: list[str] | None = None,
    seed: int = 0,
    progress: bool = True,
    model_name: str | None = None,
    widths: tuple[int, ...] | None = None,
) -> dict:
    """Fit a value model on the base model's own trajectories and save it to ``out_dir``.

    1. Sample ``trajectories`` rollouts (batches of 64, no gradient), keeping every state
       x_t at the T sampled timesteps (not x_0); score each decoded x_0 (clamped to [-1, 1]
       for images; token ids for a masked model) once with ``reward``. An unconditional
       model (``model.conditional`` False, e.g. molecules) samples with the prompt "" and
       no classifier-free guidance (scale 1, recorded so in the card), as ``rewardiff sample`` does.
    2. Hold out 10% of the trajectories (whole trajectories, so no state of a held-out
       chain is seen in training); standardize the training targets.
    3. Regress every (x_t, t, prompt) on its trajectory's reward: AdamW, MSE, cosine-decayed
       learning rate, shuffled minibatches from a generator seeded by ``seed``.
    4. Report held-out R^2 overall, per third of the chain (early = noisiest) and per step.
    5. Save the network and its card.

    The network follows the process: a ``TokenValueNet`` over token ids for masked discrete
    diffusion, else a ``ValueNet``. The same seed (and the same model, reward and arguments)
    gives the same value model.

    Args:
        model: the base model whose sampler the value describes.
        reward: the reward (or its spec, built with ``get_reward``), scored on images in [-1, 1].
        out_dir: where ``value.safetensors`` and ``value.json`` go (written atomically).
        trajectories: rollouts to sample (at least 2).
        steps: optimizer steps.
        batch_size: states per optimizer step.
        lr: peak learning rate.
        num_inference_steps: sampler steps T; the value is fitted at those timesteps.
        guidance_scale: classifier-free guidance scale of the sampler.
        eta: DDIM stochasticity of the sampler (1: DDPM-like, the setting SVDD assumes).
        prompts: prompts cycled over the trajectories (default: the ``train`` prompt set of
            ``plugins.PROMPT_SETS``, the shapes world's; ignored by unconditional models).
        seed: seeds the sampling noise, the split, the initialization and the minibatches.
        progress: show progress bars.
        model_name: recorded as ``model`` in the card (default ``model.name``).
        widths: the network's widths (default: ``ValueNet``'s, (32, 64, 64) for images;
            for token states the transformer width once per layer, all equal, default (64, 64)).

    Returns:
        The card written to ``value.json``: configuration, target mean/std and ``metrics``.

    Raises:
        UserError: arguments out of range (widths included), or no prompts.
        NonFiniteError: a non-finite reward or training loss.
    """
    from rewardiff.rewards.registry import get_reward

    _check_args(trajectories, steps, batch_size, lr, num_inference_steps, guidance_scale, eta)
    reward_fn: Reward = get_reward(reward) if isinstance(reward, str) else reward
    prompts, guidance_scale = _sampler_prompts(model, prompts, guidance_scale, widths)
    # 1. trajectories of the base model
    all_prompts = [prompts[i % len(prompts)] for i in range(trajectories)]
    seeds = [1_000_003 * seed + 7 + i for i in range(trajectories)]
    data = collect(model, reward_fn, all_prompts, seeds, num_inference_steps, guidance_scale, eta, progress=progress)
    # 2. split by trajectory, standardize
    gen = torch.Generator().manual_seed(int(seed))
    train_rows, val_rows = _split(len(data.rewards), gen)
    net = _standardized_net(model, data, train_rows, widths, seed).to(model.device)
    # 3. regression
    losses = _fit(net, data, train_rows, gen, steps, batch_size, lr, model.device, progress)
    # 4. held-out metrics
    metrics = {**heldout_r2(net, data, val_rows, model.device), **_fit_summary(data, losses, len(val_rows), steps)}
    # 5. save
    sampler = {"num_inference_steps": int(num_inference_steps), "guidance_scale": float(guidance_scale), "eta": float(eta)}
    fit = {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)}
    card = _card(net, str(getattr(reward_fn, "name", reward)), model_name or model.name, data, sampler, fit, metrics)
    return save_value(net, card, Path(out_dir))


def _check_args(trajectories: int, steps: int, batch_size: int, lr: float, num_inference_steps: int,
                guidance_scale: float, eta: float) -> None:
    if trajectories < 2:
        raise UserError(f"--trajectories must be at least 2 (some are held out), got {trajectories}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if batch_size < 1:
        raise UserError(f"batch_size must be at least 1, got {batch_size}")
    if not lr > 0:
        raise UserError(f"lr must be positive, got {lr}")
    if num_inference_steps < 1:
        raise UserError(f"--num-inference-steps must be at least 1, got {num_inference_steps}")
    if not guidance_scale > 0:
        raise UserError(f"--guidance-scale must be positive, got {guidance_scale}")
    if not 0.0 <= eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {eta}")


def _sampler_prompts(model: DiffusionModel, prompts: list[str] | None, guidance_scale: float,
                     widths: tuple[int, ...] | None) -> tuple[list[str], float]:
    """The prompts and guidance scale to sample with; refuses bad token widths before any sampling."""
    if not getattr(model, "conditional", True):  # prompts and CFG mean nothing to it
        prompts, guidance_scale = [""], 1.0
    if getattr(model.process, "vocab_size", None) is not None:  # token widths: refuse before sampling
        with torch.random.fork_rng(devices=[]):
            value_net_for(model, tuple(model.shape), 1, widths)
    if prompts is None:
        prompts = prompt_set("train")  # the registry's training prompts
    if not prompts:
        raise UserError("train_value needs at least one prompt")
    return prompts, guidance_scale


def _split(N: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Trajectory rows (train [N - n_val], held out [n_val]), each sorted; ``HOLDOUT`` of them held out."""
    order = torch.randperm(N, generator=gen)
    n_val = min(N - 1, max(1, round(HOLDOUT * N)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def _standardized_net(model: DiffusionModel, data: Rollouts, train_rows: Tensor, widths: tuple[int, ...] | None,
                      seed: int) -> AnyValueNet:
    """A fresh network (initialized from ``seed``) whose target and input standardization are
    those of the training trajectories."""
    y = data.rewards[train_rows]
    mean = float(y.mean())
    std = float(y.std()) if len(y) > 1 else 0.0
    std = std if std > 1e-8 else 1.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = value_net_for(model, tuple(data.states.shape[2:]), data.conds.shape[1], widths)
    net.target_mean.fill_(mean)
    net.target_std.fill_(std)
    if net.image:  # standardize the input statistics the head reads, over every training state
        with torch.no_grad():
            st = torch.cat([net.input_stats(data.states[r].flatten(0, 1)) for r in train_rows.split(64)])  # [N_train * T, 2C]
        net.stat_mean.copy_(st.mean(0))
        net.stat_std.copy_(st.std(0).clamp_min(1e-6))
    return net


def _fit(net: AnyValueNet, data: Rollouts, train_rows: Tensor, gen: torch.Generator, steps: int, batch_size: int,
         lr: float, device: torch.device, progress: bool) -> list[float]:
    """AdamW on shuffled states of the training trajectories, the learning rate cosine-decayed to ``LR_FLOOR``."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
    sched = warmup_cosine_schedule(opt, steps, floor=LR_FLOOR)
    targets = (data.rewards - float(net.target_mean)) / float(net.target_std)  # [N]
    batches = shuffled_states(data, targets, train_rows, batch_size, gen, device)
    return regress(net, opt, batches, steps, sched=sched, clip=CLIP, progress=progress)


def _fit_summary(data: Rollouts, losses: list[float], n_val: int, steps: int) -> dict[str, Any]:
    """The training loss at the end, the split's sizes and the reward's spread."""
    N = len(data.rewards)
    return {
        "train_mse_standardized": float(np.mean(losses[-max(1, min(50, steps // 10)):])),
        "heldout_trajectories": int(n_val),
        "train_trajectories": int(N - n_val),
        "reward_mean": float(data.rewards.mean()),
        "reward_std": float(data.rewards.std()) if N > 1 else 0.0,
    }


def _card(net: AnyValueNet, reward: str, model: str, data: Rollouts, sampler: dict, fit: dict, metrics: dict) -> dict:
    """What ``value.json`` records besides the architecture, in its historical key order."""
    return {
        "reward": reward, "model": model, **sampler,
        "timesteps": [plain_timestep(t) for t in data.timesteps],
        "target_mean": float(net.target_mean), "target_std": float(net.target_std),
        "trajectories": int(len(data.rewards)), **fit, "metrics": metrics,
    }
