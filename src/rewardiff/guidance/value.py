"""Learned soft value functions for SVDD-MC: predict the final reward from a noisy state.

A value network ``v(x_t, t, c)`` estimates E[r(x_0, prompt) | x_t] under the base model's own
sampler. It is fitted by regression: sample trajectories of the base model, score each final
sample once, and pair every intermediate state x_t of a trajectory with that trajectory's
reward (the Monte-Carlo target of SVDD-MC). Guidance methods then compare candidate states by
their predicted value instead of decoding and scoring them.

    from rewardiff.guidance.value import train_value, load_value
    card = train_value(model, get_reward("brightness"), "runs/value-brightness")
    value = load_value("runs/value-brightness")
    v = value(x_t, t, model.encode(prompts))  # float [B], in reward units

The network follows the model's process: a ``ValueNet`` (CNN or MLP) for float states of a
Gaussian process, a ``TokenValueNet`` (``rewardiff.guidance.token_value``: a small
transformer over token ids, mask included) for a masked discrete process, which has a
``vocab_size``. Both are trained, saved and loaded by the same functions.

On disk a value model is a directory with ``value.safetensors`` (the network's tensors,
target standardization included) and ``value.json`` (its configuration and held-out metrics;
``kind: tokens`` marks a token network, no ``kind`` the float one).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import NonFiniteError, UserError
from rewardiff.io import atomic_write, atomic_write_text
from rewardiff.models.base import DiffusionModel
from rewardiff.types import Reward

if TYPE_CHECKING:
    from rewardiff.guidance.token_value import TokenValueNet

WEIGHTS_FILE = "value.safetensors"
CONFIG_FILE = "value.json"
FORMAT = "rewardiff-value"
FORMAT_VERSION = 1
IMAGE_WIDTHS = (32, 64, 64)  # CNN channels at full, 1/2 and 1/4 resolution
VECTOR_WIDTHS = (128, 128, 128)  # MLP hidden widths for vector states
EMB_DIM = 128  # width of the time + condition embedding
TIME_FREQS = 32  # sinusoid frequencies of the time embedding (64 features)
GEN_BATCH = 64  # trajectories sampled per batch
EVAL_BATCH = 1024  # states per batch when scoring the held-out split
HOLDOUT = 0.1  # fraction of trajectories held out for the metrics
BUCKETS = ("early", "middle", "late")  # thirds of the chain, in sampling order


# ----------------------------------------------------------------------------- conditioning


def pool_cond(cond: Any) -> Tensor:
    """A model condition -> one float vector per row [B, D].

    Args:
        cond: token states [B, L, D] (averaged over the tokens), a vector [B, D] (as is),
            one number per row [B] (read as [B, 1]), or a dict of these (each pooled, then
            joined in key order).

    Raises:
        TypeError: a condition that is not a tensor, or one with more than 3 dimensions.
    """
    if isinstance(cond, dict):  # e.g. SDXL: token states, pooled text embedding, micro-conditioning
        return torch.cat([pool_cond(cond[k]) for k in sorted(cond)], dim=1)
    if not isinstance(cond, Tensor):
        raise TypeError(f"a value model needs a tensor condition, got {type(cond).__name__}")
    c = cond if cond.is_floating_point() else cond.float()
    if c.dim() == 3:
        return c.mean(dim=1)
    if c.dim() == 2:
        return c
    if c.dim() == 1:
        return c[:, None]
    raise TypeError(f"cannot pool a condition of shape {tuple(cond.shape)}; expected [B, L, D], [B, D] or [B]")


def time_embedding(t: Tensor, freqs: int = TIME_FREQS, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of the training timesteps. t [B] -> [B, 2 * freqs]"""
    k = torch.arange(freqs, device=t.device, dtype=torch.float32)
    omega = torch.exp(-math.log(max_period) * k / freqs)  # [freqs], 1 .. 1/max_period
    arg = t.float()[:, None] * omega[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


class FiLM(nn.Module):
    """Feature-wise scale and shift from an embedding, starting as the identity.

    Args:
        emb_dim: width of the embedding [B, E].
        channels: features modulated; ``h`` is [B, C] or [B, C, H, W].
    """

    def __init__(self, emb_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(emb_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.proj(emb).chunk(2, dim=1)  # [B, C] each
        if h.dim() == 4:
            scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        return h * (1 + scale) + shift


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


# ----------------------------------------------------------------------------- the network


class ValueNet(nn.Module):
    """Time- and prompt-conditioned regressor ``(x_t, t, cond) -> predicted final reward [B]``.

    Images [B, C, H, W]: a 3x3 convolution at full resolution, one stride-2 convolution per
    further width (so (32, 64, 64) halves the resolution twice), one more convolution at the
    last width; each followed by GroupNorm, FiLM from the embedding, and SiLU; then global
    average pooling. GroupNorm discards each sample's overall intensity, so the head also
    reads the input's per-channel mean and standard deviation [B, 2C] (what brightness- or
    contrast-like rewards depend on), standardized by the buffers ``stat_mean`` and
    ``stat_std`` [2C] (set by training from its states), besides the pooled features and
    the embedding.
    Vectors [B, d]: linear layers with FiLM and SiLU (no normalization, which would discard
    the state's scale). The embedding is an MLP of the sinusoidal time features plus a
    linear map of the pooled condition.

    The head predicts standardized targets; ``forward`` maps them back to reward units with
    the buffers ``target_mean`` and ``target_std`` (set by training, saved with the weights).

    Args:
        shape: one state's shape, (C, H, W) for images or (d,) for vectors.
        cond_dim: D of the pooled condition [B, D].
        in_channels: image channels (default ``shape[0]``); ignored for vectors.
        widths: channels (images) or hidden widths (vectors); defaults (32, 64, 64) and (128, 128, 128).
        emb_dim: width of the time + condition embedding.
    """

    def __init__(
        self,
        shape: tuple[int, ...],
        cond_dim: int,
        *,
        in_channels: int | None = None,
        widths: tuple[int, ...] | None = None,
        emb_dim: int = EMB_DIM,
    ):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3):
            raise ValueError(f"ValueNet takes images (C, H, W) or vectors (d,), got shape {shape}")
        if cond_dim < 1:
            raise ValueError(f"cond_dim must be at least 1, got {cond_dim}")
        self.shape, self.cond_dim, self.emb_dim = shape, int(cond_dim), int(emb_dim)
        self.image = len(shape) == 3
        self.in_channels = int(in_channels if in_channels is not None else shape[0]) if self.image else shape[0]
        self.widths = tuple(int(w) for w in (widths or (IMAGE_WIDTHS if self.image else VECTOR_WIDTHS)))
        if not self.widths:
            raise ValueError("widths must name at least one layer width")

        self.time_mlp = nn.Sequential(nn.Linear(2 * TIME_FREQS, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(self.cond_dim, emb_dim)

        layers, norms, films = [], [], []
        if self.image:
            plan = [(self.in_channels, self.widths[0], 1)]
            plan += [(a, b, 2) for a, b in zip(self.widths[:-1], self.widths[1:])]
            plan += [(self.widths[-1], self.widths[-1], 1)]
            for c_in, c_out, stride in plan:
                layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
                norms.append(nn.GroupNorm(_groups(c_out), c_out))
                films.append(FiLM(emb_dim, c_out))
        else:
            dims = [self.in_channels, *self.widths]
            for c_in, c_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(c_in, c_out))
                norms.append(nn.Identity())
                films.append(FiLM(emb_dim, c_out))
        self.layers, self.norms, self.films = nn.ModuleList(layers), nn.ModuleList(norms), nn.ModuleList(films)

        stats = 2 * self.in_channels if self.image else 0  # per-channel mean and std of the input
        self.head = nn.Sequential(nn.Linear(self.widths[-1] + stats + emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, 1))
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.register_buffer("stat_mean", torch.zeros(stats))
        self.register_buffer("stat_std", torch.ones(stats))

    def config(self) -> dict:
        """What ``ValueNet(**config)`` needs to rebuild this architecture."""
        return {"shape": list(self.shape), "cond_dim": self.cond_dim, "in_channels": self.in_channels,
                "widths": list(self.widths), "emb_dim": self.emb_dim}

    def input_stats(self, x: Tensor) -> Tensor:
        """Per-channel mean and standard deviation of images, before standardization. [B, C, H, W] -> [B, 2C]"""
        return torch.cat([x.mean(dim=(2, 3)), (x.var(dim=(2, 3), unbiased=False) + 1e-8).sqrt()], dim=1)

    def embed(self, t: Tensor, cond: Tensor) -> Tensor:
        """Time [B] and pooled condition [B, D] -> embedding [B, E]."""
        return self.time_mlp(time_embedding(t)) + self.cond_proj(cond)

    def standardized(self, x_t: Tensor, t: int | Tensor, cond: Any) -> Tensor:
        """The head's output in standardized target units [B]; see ``forward`` for the arguments."""
        B = x_t.shape[0]
        dtype = self.target_mean.dtype
        x = x_t.to(dtype)
        tt = torch.as_tensor(t, device=x.device)
        tt = tt.reshape(-1).expand(B) if tt.numel() == 1 else tt.reshape(B)
        c = pool_cond(cond).to(x.device, dtype)
        if c.shape != (B, self.cond_dim):
            raise ValueError(f"condition pools to {tuple(c.shape)}; this value model expects ({B}, {self.cond_dim})")
        emb = self.embed(tt, c)
        h = x
        for layer, norm, film in zip(self.layers, self.norms, self.films):
            h = F.silu(film(norm(layer(h)), emb))
        feats = [h]
        if self.image:
            feats = [h.mean(dim=(2, 3)), (self.input_stats(x) - self.stat_mean) / self.stat_std]
        return self.head(torch.cat([*feats, emb], dim=1)).squeeze(1)

    def forward(self, x_t: Tensor, t: int | Tensor, cond: Any) -> Tensor:
        """Predicted final reward, in reward units.

        Args:
            x_t: noisy states [B, C, H, W] or [B, d].
            t: their training timestep, one int for the batch or a tensor [B].
            cond: the model condition of the B rows ([B, L, D], [B, D] or [B]; pooled here).

        Returns:
            Float [B].
        """
        return self.standardized(x_t, t, cond) * self.target_std + self.target_mean


AnyValueNet = Union["ValueNet", "TokenValueNet"]  # what train_value fits and load_value returns inside LearnedValue


class LearnedValue:
    """A loaded value model: ``value(x_t, t, cond) -> Tensor[B]`` (the ``ValueFn`` protocol).

    The network stays in eval mode; gradients flow to ``x_t`` when the caller asks for them
    (wrap the call in ``torch.no_grad()`` when they are not needed). It follows its inputs:
    a call with ``x_t`` on another device moves the network there.

    Attributes:
        net: the ``ValueNet`` (float states) or ``TokenValueNet`` (token ids [B, L] or
            probabilities [B, L, V]).
        reward: the reward spec the value was trained on.
        config: the contents of ``value.json``.
        path: the directory it was loaded from.
    """

    def __init__(self, net: AnyValueNet, config: dict, path: Path | None = None):
        self.net, self.config, self.path = net.eval(), config, path
        self.reward: str = str(config.get("reward", ""))
        self.net.requires_grad_(False)

    def __call__(self, x_t: Tensor, t: int | Tensor, cond: Any) -> Tensor:
        if x_t.device != self.net.target_mean.device:
            self.net.to(x_t.device)
        return self.net(x_t, t, cond)

    def to(self, device: torch.device | str) -> LearnedValue:
        self.net.to(device)
        return self

    def __repr__(self) -> str:
        r2 = self.config.get("metrics", {}).get("r2_heldout")
        return f"LearnedValue(reward={self.reward!r}, model={self.config.get('model')!r}, r2_heldout={r2})"


# ----------------------------------------------------------------------------- training


def _r2(pred: np.ndarray, target: np.ndarray) -> float | None:
    """Coefficient of determination; None when it is undefined (no rows, or constant targets)."""
    if len(target) == 0:
        return None
    ss_tot = float(((target - target.mean()) ** 2).sum())
    if ss_tot <= 1e-12 * len(target):
        return None
    return 1.0 - float(((target - pred) ** 2).sum()) / ss_tot


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


def _outputs(model: DiffusionModel, x0: Tensor) -> Tensor:
    """Final samples -> what the reward scores: decoded and clamped to the model's output range."""
    return model.output(x0)


@torch.no_grad()
def _collect(model: DiffusionModel, reward: Reward, prompts: list[str], seeds: list[int], num_inference_steps: int,
             guidance_scale: float, eta: float, progress: bool) -> tuple[Tensor, Tensor, Tensor, list[int]]:
    """Sample base-model trajectories and score them.

    Returns:
        states [N, T, ...] (x_T .. x_1, on the CPU; float32, or the ids' own integer dtype
        for token states), pooled conditions [N, D], rewards [N], and the T timesteps of the states.
    """
    from tqdm import tqdm

    states: Tensor | None = None  # filled in place: no second copy of the largest array
    conds, rewards = [], []
    timesteps: list[int] = []
    bar = tqdm(total=len(prompts), desc="value: trajectories", disable=not progress, unit="traj")
    for i in range(0, len(prompts), GEN_BATCH):
        p, s = prompts[i : i + GEN_BATCH], seeds[i : i + GEN_BATCH]
        traj = model.sample(p, s, num_inference_steps, eta=eta, guidance_scale=guidance_scale, keep_states=True)
        timesteps = list(traj.timesteps)
        r = reward(_outputs(model, traj.x0), p).detach().float().reshape(-1)
        if r.shape != (len(p),):
            raise UserError(f"reward {getattr(reward, 'name', reward)!r} returned shape {tuple(r.shape)}; expected ({len(p)},)")
        if not bool(torch.isfinite(r).all()):
            raise NonFiniteError(f"reward {getattr(reward, 'name', reward)!r} gave a non-finite value on trajectories {i}..{i + len(p) - 1}")
        xs = traj.xs[:-1]  # x_T .. x_1 (x_0 is scored, not kept)
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
    return states, torch.cat(conds), torch.cat(rewards), timesteps


def _new_net(model: DiffusionModel, shape: tuple[int, ...], cond_dim: int, widths: tuple[int, ...] | None) -> AnyValueNet:
    """The value network for ``model``'s states: a ``TokenValueNet`` when its process is
    discrete (it has a ``vocab_size``; states are ids [L]), else a ``ValueNet`` of ``shape``."""
    vocab = getattr(model.process, "vocab_size", None)
    if vocab is None:
        return ValueNet(shape, cond_dim, widths=widths)
    from rewardiff.guidance.token_value import TokenValueNet

    if len(shape) != 1:
        raise UserError(f"a value model of token states needs ids [L] per sample; model {model.name!r} has states of shape {shape}")
    try:
        return TokenValueNet(int(vocab), shape[0], cond_dim, widths=widths)
    except ValueError as e:
        raise UserError(f"widths: {e}") from None


def _predict(net: AnyValueNet, states: Tensor, conds: Tensor, ts: Tensor, rows: Tensor, device: torch.device) -> Tensor:
    """Predictions in reward units for every state of the trajectories ``rows`` -> [len(rows), T] (CPU)."""
    T = states.shape[1]
    flat = (rows[:, None] * T + torch.arange(T)[None]).reshape(-1)
    out = []
    net.eval()
    with torch.no_grad():
        for k in flat.split(EVAL_BATCH):
            n, i = k // T, k % T
            out.append(net(states[n, i].to(device), ts[i].to(device), conds[n].to(device)).cpu())
    return torch.cat(out).reshape(len(rows), T) if out else torch.zeros(0, T)


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

    The network follows the process (see the module doc): a ``TokenValueNet`` over token ids
    for masked discrete diffusion, else a ``ValueNet``.

    The same seed (and the same model, reward and arguments) gives the same value model.

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
        prompts: prompts cycled over the trajectories (default: the shapes world's training
            prompts; ignored by unconditional models).
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
    from tqdm import tqdm

    from rewardiff.rewards import get_reward

    _check_args(trajectories, steps, batch_size, lr, num_inference_steps, guidance_scale, eta)
    reward_fn: Reward = get_reward(reward) if isinstance(reward, str) else reward
    if not getattr(model, "conditional", True):  # prompts and CFG mean nothing to it
        prompts, guidance_scale = [""], 1.0
    if getattr(model.process, "vocab_size", None) is not None:  # token widths: refuse before sampling
        with torch.random.fork_rng(devices=[]):
            _new_net(model, tuple(model.shape), 1, widths)
    if prompts is None:
        from rewardiff.worlds.shapes import data as shapes

        prompts = shapes.train_prompts()
    if not prompts:
        raise UserError("train_value needs at least one prompt")
    out = Path(out_dir)
    device = model.device

    # 1. trajectories of the base model
    all_prompts = [prompts[i % len(prompts)] for i in range(trajectories)]
    seeds = [1_000_003 * seed + 7 + i for i in range(trajectories)]
    states, conds, rewards, timesteps = _collect(model, reward_fn, all_prompts, seeds, num_inference_steps,
                                                 guidance_scale, eta, progress)
    N, T = states.shape[:2]
    ts = torch.tensor(timesteps, dtype=torch.long)

    # 2. split by trajectory, standardize
    gen = torch.Generator().manual_seed(int(seed))
    order = torch.randperm(N, generator=gen)
    n_val = min(N - 1, max(1, round(HOLDOUT * N)))
    val_rows, train_rows = order[:n_val].sort().values, order[n_val:].sort().values
    y_train = rewards[train_rows]
    mean = float(y_train.mean())
    std = float(y_train.std()) if len(y_train) > 1 else 0.0
    std = std if std > 1e-8 else 1.0

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = _new_net(model, tuple(states.shape[2:]), conds.shape[1], widths)
    net.target_mean.fill_(mean)
    net.target_std.fill_(std)
    if net.image:  # standardize the input statistics the head reads, over every training state
        with torch.no_grad():
            st = torch.cat([net.input_stats(states[r].flatten(0, 1)) for r in train_rows.split(64)])  # [N_train * T, 2C]
        net.stat_mean.copy_(st.mean(0))
        net.stat_std.copy_(st.std(0).clamp_min(1e-6))
    net.to(device)

    # 3. regression
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps)))
    flat_train = (train_rows[:, None] * T + torch.arange(T)[None]).reshape(-1)
    perm, cursor = torch.randperm(len(flat_train), generator=gen), 0
    bs = min(batch_size, len(flat_train))
    losses: list[float] = []
    net.train()
    bar = tqdm(range(steps), desc="value: fit", disable=not progress)
    for step in bar:
        if cursor + bs > len(perm):
            perm, cursor = torch.randperm(len(flat_train), generator=gen), 0
        k = flat_train[perm[cursor : cursor + bs]]
        cursor += bs
        n, i = k // T, k % T
        target = ((rewards[n] - mean) / std).to(device)
        pred = net.standardized(states[n, i].to(device), ts[i].to(device), conds[n].to(device))
        loss = F.mse_loss(pred, target)
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"non-finite value-model loss at step {step + 1}; nothing was saved")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 25 == 0 or step == steps - 1:
            bar.set_postfix(mse=f"{np.mean(losses[-50:]):.3f}")
    bar.close()
    net.eval()

    # 4. held-out metrics
    pred_val = _predict(net, states, conds, ts, val_rows, device).numpy()  # [n_val, T]
    y_val = np.repeat(rewards[val_rows].numpy()[:, None], T, axis=1)
    buckets = np.array_split(np.arange(T), 3)
    metrics: dict[str, Any] = {
        "r2_heldout": _r2(pred_val.ravel(), y_val.ravel()),
        **{f"r2_{name}": _r2(pred_val[:, b].ravel(), y_val[:, b].ravel()) for name, b in zip(BUCKETS, buckets)},
        "r2_by_step": [_r2(pred_val[:, i], y_val[:, i]) for i in range(T)],
        "buckets": {name: [int(timesteps[j]) for j in b] for name, b in zip(BUCKETS, buckets)},
        "train_mse_standardized": float(np.mean(losses[-max(1, min(50, steps // 10)):])),
        "heldout_trajectories": int(n_val),
        "train_trajectories": int(N - n_val),
        "reward_mean": float(rewards.mean()),
        "reward_std": float(rewards.std()) if N > 1 else 0.0,
    }

    # 5. save
    card = {
        "reward": str(getattr(reward_fn, "name", reward)),
        "model": model_name or model.name,
        "num_inference_steps": int(num_inference_steps),
        "guidance_scale": float(guidance_scale),
        "eta": float(eta),
        "timesteps": [int(t) for t in timesteps],
        "target_mean": mean,
        "target_std": std,
        "trajectories": int(N),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
        "metrics": metrics,
    }
    return save_value(net, card, out)


def save_value(net: AnyValueNet, card: dict, out_dir: str | Path) -> dict:
    """Write ``value.safetensors`` and ``value.json`` atomically into ``out_dir``.

    Args:
        net: the network (``ValueNet`` or ``TokenValueNet``); its tensors (target and input
            standardization included) are saved.
        card: what ``value.json`` records besides the architecture (reward, model, metrics ...);
            the architecture keys and ``format``/``version`` are filled in from ``net``.
        out_dir: the directory (created when missing).

    Returns:
        The card as written: ``format``, ``version``, the architecture, then ``card``'s keys.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    card = {"format": FORMAT, "version": FORMAT_VERSION, **net.config(),
            **{k: v for k, v in card.items() if k not in ("format", "version", *net.config())}}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    atomic_write_text(out / CONFIG_FILE, json.dumps(card, indent=2))
    return card


# ----------------------------------------------------------------------------- loading


def load_value(path: str | Path) -> LearnedValue:
    """Load a value model saved by ``train_value``.

    Args:
        path: its directory, or the ``value.safetensors`` (or ``value.json``) inside it.

    Returns:
        A ``LearnedValue`` on the CPU, in eval mode: ``value(x_t, t, cond) -> Tensor[B]``,
        with ``value.reward`` (the reward spec) and ``value.config`` (``value.json``). Its
        network is the one ``value.json`` names: a ``TokenValueNet`` for ``kind: tokens``,
        else a ``ValueNet``.

    Raises:
        UserError: the path is missing, or the files are absent, unreadable or do not fit together.
    """
    from safetensors.torch import load_file

    p = Path(path)
    d = p.parent if p.is_file() else p
    if not p.exists():
        raise UserError(f"no value model at {p}; train one with: rewardiff train-value --reward R --out {p}")
    wfile, cfile = d / WEIGHTS_FILE, d / CONFIG_FILE
    if not wfile.is_file() or not cfile.is_file():
        raise UserError(f"no value model in {d}: expected {WEIGHTS_FILE} and {CONFIG_FILE} (train one with rewardiff train-value)")
    try:
        config = json.loads(cfile.read_text())
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
        net = _net_from_config(config)
    except (OSError, ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"malformed value model config {cfile}: {e}") from None
    try:
        state = load_file(str(wfile))
        net.load_state_dict(state)
    except Exception as e:  # safetensors raises its own error types for corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load value weights {wfile}: {msg}") from None
    return LearnedValue(net, config, d)


def _net_from_config(config: dict) -> AnyValueNet:
    """The architecture ``value.json`` describes (ValueError, KeyError or TypeError when it cannot)."""
    from rewardiff.guidance.token_value import KIND, TokenValueNet

    kind = config.get("kind")
    if kind == KIND:
        return TokenValueNet.from_config(config)
    if kind is not None:
        raise ValueError(f"unknown kind {kind!r} (known: {KIND}, or none for float states)")
    return ValueNet(
        tuple(config["shape"]), int(config["cond_dim"]), in_channels=int(config["in_channels"]),
        widths=tuple(config["widths"]), emb_dim=int(config.get("emb_dim", EMB_DIM)),
    )


__all__ = ["ValueNet", "LearnedValue", "pool_cond", "time_embedding", "train_value", "save_value", "load_value"]
