"""``rewardiff pretrain shapes-sr``: train the super-resolution model, resumably.

Every batch is a set of training scenes and their inputs drawn with a seed derived from
(seed, step) (:func:`rewardiff.worlds.superres.data.make_batch`), through the loop of
:mod:`rewardiff.pretraining` (checkpoints, EMA, resume). The loss is the v-prediction error
of the Gaussian process given the upsampled input; a share ``cond_dropout`` of the inputs is
replaced by the unconditional one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardiff.pretraining import optimizer_step, resumable_loop, start_run
from rewardiff.worlds.superres import data as sr
from rewardiff.worlds.superres.model import SRDenoiser, SRModelConfig


@dataclass
class SRPretrainConfig:
    steps: int = 2000  # optimizer steps
    batch_size: int = 32  # scenes per step
    lr: float = 1e-3  # AdamW learning rate after warm-up
    warmup: int = 200  # linear warm-up steps
    ema: float = 0.999  # EMA decay of the shipped weights
    cond_dropout: float = 0.1  # share of inputs replaced by the unconditional one (for guidance)
    seed: int = 0  # seeds the initial weights and every batch
    checkpoint_every: int = 250  # steps between checkpoints
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths
    upsample: str = "bicubic"  # how the input reaches 32x32: bicubic | bilinear | nearest


def pretrain_sr(cfg: SRPretrainConfig, out: str | Path, progress: bool = True) -> SRDenoiser:
    """Train (or resume) the super-resolution model in ``out``; returns the EMA model."""
    out = Path(out)
    sr.upsample(torch.zeros(1, 3, sr.LOW, sr.LOW), cfg.upsample)  # a UserError for an unknown mode, before any work
    config = SRModelConfig(block_out_channels=tuple(cfg.block_out_channels), upsample=cfg.upsample)
    model, ema, opt = start_run(out, cfg, lambda: SRDenoiser(config), weight_decay=0.0)
    process = model.process()
    resumable_loop(out, model, ema, opt, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, ema_decay=cfg.ema,
                   train_step=lambda step: (_train_step(cfg, step, model, process, opt), {}), desc="pretrain shapes-sr",
                   progress=progress)
    return ema


def _train_step(cfg: SRPretrainConfig, step: int, model: SRDenoiser, process, opt) -> float:
    seed = cfg.seed * 1_000_003 + step
    gen = torch.Generator().manual_seed(seed)
    x0, low, _ = sr.make_batch(cfg.batch_size, seed)
    cond = sr.upsample(low, cfg.upsample)
    drop = torch.rand(len(x0), generator=gen) < cfg.cond_dropout
    cond[drop] = 0  # the unconditional input, as SRDenoiser.encode("") gives
    t = process.training_timesteps(len(x0), gen)
    noise = torch.randn(x0.shape, generator=gen)
    pred = model(process.add_noise(x0, noise, t), t, cond)
    loss = (pred - process.target(x0, noise, t)).pow(2).mean()
    return optimizer_step(model, opt, loss, cfg.lr * min(1.0, (step + 1) / cfg.warmup))


def pretrain_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain shapes-sr``: train, export ``out/model`` with its card; one line for the user."""
    from rewardiff.pretraining import configure
    from rewardiff.worlds.superres.card import write_card

    ema = pretrain_sr(configure(SRPretrainConfig, steps, seed, overrides), out)
    ema.save(out / "model")
    card = write_card(out / "model", out)
    return (f"model and card: {out / 'model'}; held-out hallucination rate {card['hallucination_rate']:.1%} "
            f"(mean count {card['hallucination_count']:.2f}), PSNR {card['psnr']:.1f} dB")
