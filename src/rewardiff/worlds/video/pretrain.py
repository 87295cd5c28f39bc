"""``rewardiff pretrain shapes-video``: train the video world's base denoiser, resumably.

Every batch of clips is drawn from the world with a seed derived from (seed, step), through the
loop of :mod:`rewardiff.pretraining` (checkpoints, EMA, resume), so an interrupted run resumed
from its last checkpoint sees exactly the batches of an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardiff.errors import UserError
from rewardiff.pretraining import optimizer_step, resumable_loop, start_run
from rewardiff.worlds.video import data as video
from rewardiff.worlds.video.denoiser import NAME, VideoDenoiser, VideoModelConfig


@dataclass
class PretrainConfig:
    steps: int = 600  # optimizer steps (the shipped model: 600, about 75 minutes on one busy CPU core)
    batch_size: int = 16  # clips per step
    frames: int = video.FRAMES  # frames a clip (8..16)
    lr: float = 1e-3  # AdamW learning rate after warm-up
    warmup: int = 100  # linear warm-up steps
    ema: float = 0.995  # EMA decay of the shipped weights (short runs: a short memory)
    cond_dropout: float = 0.1  # fraction of prompts replaced by "" (for classifier-free guidance)
    seed: int = 0  # seeds the initial weights and every batch
    checkpoint_every: int = 250  # steps between checkpoints
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # UNet widths
    attention_heads: int = 2  # heads of the attention layers
    norm_groups: int = 8  # GroupNorm groups (must divide every width)


def model_config(cfg: PretrainConfig) -> VideoModelConfig:
    """The denoiser's config of a pretraining config."""
    return VideoModelConfig(block_out_channels=tuple(cfg.block_out_channels), attention_heads=cfg.attention_heads,
                            norm_groups=cfg.norm_groups, frames=cfg.frames)


def pretrain_video(cfg: PretrainConfig, out: str | Path, progress: bool = True) -> VideoDenoiser:
    """Train (or resume) the video model in ``out``; returns the EMA model."""
    out = Path(out)
    if not video.MIN_FRAMES <= cfg.frames <= video.MAX_FRAMES:
        raise UserError(f"pretraining field 'frames' must be between {video.MIN_FRAMES} and {video.MAX_FRAMES}, got {cfg.frames}")
    if any(w % cfg.norm_groups for w in cfg.block_out_channels):
        raise UserError(f"pretraining field 'norm_groups' ({cfg.norm_groups}) must divide every width of block_out_channels")
    config = model_config(cfg)
    model, ema, opt = start_run(out, cfg, lambda: VideoDenoiser(config), weight_decay=0.0)
    process = model.process()
    resumable_loop(out, model, ema, opt, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, ema_decay=cfg.ema,
                   train_step=lambda step: (_train_step(cfg, step, model, process, opt), {}), desc=f"pretrain {NAME}",
                   progress=progress)
    return ema


def _train_step(cfg: PretrainConfig, step: int, model, process, opt) -> float:
    seed = cfg.seed * 1_000_003 + step
    gen = torch.Generator().manual_seed(seed)
    x0, prompts, _ = video.make_batch(cfg.batch_size, seed, frames=cfg.frames)
    drop = torch.rand(len(prompts), generator=gen) < cfg.cond_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    t = process.training_timesteps(len(prompts), gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = process.add_noise(x0, noise, t)
    # diffusers' temporal convolutions drop out (p = 0.1) with the global generator: seed it from
    # the step too, so that a resumed run draws the same masks as an uninterrupted one
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pred = model(x_t, t, model.encode(prompts))
        loss = (pred - process.target(x0, noise, t)).pow(2).mean()
    return optimizer_step(model, opt, loss, cfg.lr * min(1.0, (step + 1) / cfg.warmup))


def pretrain_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain shapes-video``: train, export ``out/model`` with its card; one line for the user."""
    from rewardiff.pretraining import configure
    from rewardiff.worlds.video.card import write_card

    ema = pretrain_video(configure(PretrainConfig, steps, seed, overrides), out)
    ema.save(out / "model")
    card = write_card(out / "model", out)
    return (f"model and card: {out / 'model'}; judge on held-out prompts: count {card['judge_count_ok_held_out']:.1%}, "
            f"direction {card['judge_direction_ok_held_out']:.1%}, all {card['judge_all_ok_held_out']:.1%}")
