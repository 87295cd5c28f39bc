"""Fitting a value model: collecting scored trajectories, one regression loop, held-out R^2.

A value ``v(x_t, t, c)`` estimates E[r(x_0, prompt) | x_t] under a sampler. It is fitted by
regression: sample trajectories, score each final sample once, and pair every intermediate
state x_t of a trajectory with that trajectory's reward (the Monte-Carlo target of SVDD-MC).

``regress`` is the one loop; what differs between callers is where its minibatches come from:

- ``shuffled_states``: epochs over every (state, trajectory) pair of a fixed set of rollouts
  (``train_value``);
- ``one_state_each``: one random state of each trajectory of a fresh batch per step (VARD's
  warm-up and its refits on every training batch, through ``fit_value``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.errors import NonFiniteError, UserError
from rewardiff.rewards.value.net import AnyValueNet, pool_cond
from rewardiff.rollout import plain_timestep, timestep_tensor
from rewardiff.types import Reward, Timestep, Trajectory

if TYPE_CHECKING:
    from rewardiff.models.base import DiffusionModel

GEN_BATCH = 64  # trajectories sampled per batch
EVAL_BATCH = 1024  # states per batch when scoring the held-out split
BUCKETS = ("early", "middle", "late")  # thirds of the chain, in sampling order


class Rollouts(NamedTuple):
    """Scored trajectories of a sampler, on the CPU."""

    states: Tensor  # [N, T, ...] x_T .. x_1 (x_0 too with ``final``); float32, or the ids' integer dtype
    conds: Tensor  # [N, D] pooled conditions
    rewards: Tensor  # [N] the reward of each final sample
    timesteps: list[Timestep]  # the T sampled timesteps of the states
    nfe: int  # denoiser evaluations the sampling spent


class Batch(NamedTuple):
    """One minibatch of the regression, on the network's device."""

    x: Tensor  # [B, ...] states x_t
    t: Tensor  # [B] their timesteps
    cond: Tensor  # [B, D] pooled conditions
    target: Tensor  # [B] standardized rewards


# ----------------------------------------------------------------------------- collecting


def scored_rollout(model: DiffusionModel, reward: Reward, prompts: list[str], seeds: list[int], num_inference_steps: int,
                   guidance_scale: float, eta: float) -> tuple[Trajectory, Tensor]:
    """One batch of sampler trajectories (every state kept, no gradient) and the reward [B]
    of their decoded final samples (clamped to the model's output range)."""
    with torch.no_grad():
        traj = model.sample(prompts, seeds, num_inference_steps, eta=eta, guidance_scale=guidance_scale, keep_states=True)
        r = reward(model.output(traj.x0), prompts).detach().float().reshape(-1)
    return traj, r


def _check_rewards(reward: Reward, r: Tensor, n: int, first: int) -> None:
    name = getattr(reward, "name", reward)
    if r.shape != (n,):
        raise UserError(f"reward {name!r} returned shape {tuple(r.shape)}; expected ({n},)")
    if not bool(torch.isfinite(r).all()):
        raise NonFiniteError(f"reward {name!r} gave a non-finite value on trajectories {first}..{first + n - 1}")


@torch.no_grad()
def collect(model: DiffusionModel, reward: Reward, prompts: list[str], seeds: list[int], num_inference_steps: int,
            guidance_scale: float, eta: float, *, progress: bool = False, batch: int = GEN_BATCH,
            final: bool = False) -> Rollouts:
    """Sample trajectories of ``model`` in batches of ``batch``, score them, keep them on the CPU.

    Args:
        prompts, seeds: one per trajectory.
        final: keep x_0 as the last state too (T + 1 states); default x_T .. x_1.

    Raises:
        UserError: a reward of the wrong shape. NonFiniteError: a non-finite reward.
    """
    from tqdm import tqdm

    states: Tensor | None = None  # filled in place: no second copy of the largest array
    conds, rewards, timesteps, nfe = [], [], [], 0
    bar = tqdm(total=len(prompts), desc="value: trajectories", disable=not progress, unit="traj")
    for i in range(0, len(prompts), batch):
        p, s = prompts[i : i + batch], seeds[i : i + batch]
        traj, r = scored_rollout(model, reward, p, s, num_inference_steps, guidance_scale, eta)
        _check_rewards(reward, r, len(p), i)
        timesteps, nfe = list(traj.timesteps), nfe + traj.nfe
        xs = traj.xs if final else traj.xs[:-1]  # x_0 is scored, kept only when asked
        if states is None:
            dtype = torch.float32 if xs[0].is_floating_point() else xs[0].dtype
            states = torch.empty((len(prompts), len(xs), *xs[0].shape[1:]), dtype=dtype)
        for j, x in enumerate(xs):
            states[i : i + len(p), j] = x.detach().cpu()
        conds.append(pool_cond(model.encode(p)).float().cpu())
        rewards.append(r.cpu())
        bar.update(len(p))
    bar.close()
    assert states is not None
    return Rollouts(states, torch.cat(conds), torch.cat(rewards), timesteps, nfe)


# ----------------------------------------------------------------------------- minibatches


def shuffled_states(data: Rollouts, targets: Tensor, rows: Tensor, batch_size: int, gen: torch.Generator,
                    device: torch.device) -> Iterator[Batch]:
    """Endless minibatches over every state of the trajectories ``rows``: one shuffled pass
    after another (a pass's last partial batch is dropped), the order drawn from ``gen``.

    Args:
        targets: standardized rewards [N] of all trajectories.
        batch_size: states per batch (at most the number of states).
    """
    T = data.states.shape[1]
    ts = timestep_tensor(data.timesteps)
    flat = (rows[:, None] * T + torch.arange(T)[None]).reshape(-1)  # [len(rows) * T] indices n * T + i
    bs = min(batch_size, len(flat))
    perm, cursor = torch.randperm(len(flat), generator=gen), 0
    while True:
        if cursor + bs > len(perm):
            perm, cursor = torch.randperm(len(flat), generator=gen), 0
        k = flat[perm[cursor : cursor + bs]]
        cursor += bs
        n, i = k // T, k % T
        yield Batch(data.states[n, i].to(device), ts[i].to(device), data.conds[n].to(device), targets[n].to(device))


def one_state_each(states: list[Tensor], timesteps: list[Timestep], cond: Tensor, target: Tensor,
                   gen: torch.Generator) -> Iterator[Batch]:
    """Endless minibatches of one state per trajectory, which state drawn from ``gen`` each time.

    Args:
        states: the trajectories' states, one tensor [B, ...] per timestep (on the net's device).
        timesteps: the timestep of each entry of ``states``.
        cond: pooled conditions [B, D]; target: standardized rewards [B].
    """
    B, n = target.shape[0], len(states)
    while True:
        j = torch.randint(0, n, (B,), generator=gen)  # one state of each trajectory
        x = torch.stack([states[int(k)][b] for b, k in enumerate(j)])
        t = timestep_tensor([timesteps[int(k)] for k in j]).to(x.device)
        yield Batch(x, t, cond, target)


# ----------------------------------------------------------------------------- the loop


def regress(net: AnyValueNet, opt: torch.optim.Optimizer, batches: Iterator[Batch], steps: int, *,
            sched: torch.optim.lr_scheduler.LRScheduler | None = None, clip: float | None = None,
            sync: Callable[[], None] | None = None, check_finite: bool = True, progress: bool = False) -> list[float]:
    """``steps`` optimizer steps of MSE regression of ``net.standardized(x_t, t, c)`` on the targets.

    Each step: zero the gradients, backward, ``sync`` (gradient averaging across processes),
    clip the gradient norm to ``clip``, step the optimizer, then ``sched``. The net is in
    train mode during the loop and left in eval mode with its gradients off.

    Args:
        batches: where each step's minibatch comes from (``shuffled_states``, ``one_state_each``).
        check_finite: raise on a non-finite loss (callers whose losses are checked later pass False).
        progress: show a progress bar with the running MSE.

    Returns:
        The loss of every step, in standardized units.

    Raises:
        NonFiniteError: a non-finite loss, with ``check_finite``.
    """
    from tqdm import tqdm

    net.train().requires_grad_(True)
    losses: list[float] = []
    bar = tqdm(range(steps), desc="value: fit", disable=not progress)
    for step in bar:
        x, t, cond, target = next(batches)
        loss = F.mse_loss(net.standardized(x, t, cond), target)
        if check_finite and not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"non-finite value-model loss at step {step + 1}; nothing was saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if sync is not None:
            sync()
        if clip is not None:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    net.eval().requires_grad_(False)
    return losses


def fit_value(net: AnyValueNet, opt: torch.optim.Optimizer, states: list[Tensor], timesteps: list[Timestep], cond: Tensor,
              rewards: Tensor, steps: int, gen: torch.Generator, sync: Callable[[], None] | None = None) -> float:
    """``steps`` steps of ``regress`` on one batch of trajectories, one random state of each per step.

    Args:
        net: the value network (its target_mean / target_std standardize the targets).
        opt: its optimizer.
        states: the trajectories' states, one tensor [B, ...] per timestep.
        timesteps: the timestep of each entry of ``states``.
        cond: pooled conditions [B, D]; rewards: [B].
        gen: draws which state of each trajectory a step regresses on.
        sync: called between backward and the optimizer step (gradient averaging across processes).

    Returns:
        The last step's loss, in standardized units (NaN for no steps).
    """
    target = (rewards - net.target_mean) / net.target_std
    batches = one_state_each(states, timesteps, cond, target, gen)
    losses = regress(net, opt, batches, steps, sync=sync, check_finite=False)
    return losses[-1] if losses else float("nan")


# ----------------------------------------------------------------------------- held-out metrics


def r2(pred: np.ndarray, target: np.ndarray) -> float | None:
    """Coefficient of determination; None when it is undefined (no rows, or constant targets)."""
    if len(target) == 0:
        return None
    ss_tot = float(((target - target.mean()) ** 2).sum())
    if ss_tot <= 1e-12 * len(target):
        return None
    return 1.0 - float(((target - pred) ** 2).sum()) / ss_tot


def predict(net: AnyValueNet, data: Rollouts, rows: Tensor, device: torch.device) -> Tensor:
    """Predictions in reward units for every state of the trajectories ``rows`` -> [len(rows), T] (CPU)."""
    T = data.states.shape[1]
    ts = timestep_tensor(data.timesteps)
    flat = (rows[:, None] * T + torch.arange(T)[None]).reshape(-1)
    out = []
    net.eval()
    with torch.no_grad():
        for k in flat.split(EVAL_BATCH):
            n, i = k // T, k % T
            out.append(net(data.states[n, i].to(device), ts[i].to(device), data.conds[n].to(device)).cpu())
    return torch.cat(out).reshape(len(rows), T) if out else torch.zeros(0, T)


def heldout_r2(net: AnyValueNet, data: Rollouts, rows: Tensor, device: torch.device) -> dict[str, Any]:
    """R^2 of the predictions on the trajectories ``rows``: overall (``r2_heldout``), per third of
    the chain (``r2_early`` .. ``r2_late``, early = noisiest), per step (``r2_by_step``), and the
    timesteps of each third (``buckets``)."""
    T = data.states.shape[1]
    pred = predict(net, data, rows, device).numpy()  # [n_val, T]
    y = np.repeat(data.rewards[rows].numpy()[:, None], T, axis=1)
    thirds = np.array_split(np.arange(T), 3)
    return {
        "r2_heldout": r2(pred.ravel(), y.ravel()),
        **{f"r2_{name}": r2(pred[:, b].ravel(), y[:, b].ravel()) for name, b in zip(BUCKETS, thirds)},
        "r2_by_step": [r2(pred[:, i], y[:, i]) for i in range(T)],
        "buckets": {name: [plain_timestep(data.timesteps[j]) for j in b] for name, b in zip(BUCKETS, thirds)},
    }
