"""``rewardiff pretrain shapes``: train the shapes world's base denoiser, resumably.

Every batch is drawn from the world with a seed derived from (seed, step), through the loop of
:mod:`rewardiff.pretraining` (checkpoints, EMA, resume): counting prompts, or with
``--set prompts=geneval`` the GenEval grammar's training prompts
(:func:`rewardiff.worlds.shapes.scenes.make_batch`), for a model whose vocabulary has its words.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from rewardiff.errors import UserError
from rewardiff.pretraining import optimizer_step, resumable_loop, start_run
from rewardiff.worlds.shapes import data as shapes, scenes
from rewardiff.worlds.shapes.denoiser import ShapesDenoiser, ShapesModelConfig

# A batch maker a grammar: (n, seed) -> (images [n, 3, 32, 32] in [-1, 1], prompts, specs).
BATCHES = {"count": shapes.make_batch, "geneval": scenes.make_batch}


@dataclass
class PretrainConfig:
    steps: int = 2000  # optimizer steps (the shipped model: 2000)
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # AdamW learning rate after warm-up
    warmup: int = 200  # linear warm-up steps
    ema: float = 0.999  # EMA decay of the shipped weights
    cond_dropout: float = 0.1  # fraction of prompts replaced by "" (for classifier-free guidance)
    seed: int = 0  # seeds the initial weights and every batch
    checkpoint_every: int = 250  # steps between checkpoints
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # UNet widths
    process: str = "gaussian"  # gaussian (DDPM, v-prediction) | flow (rectified flow, logit-normal timesteps)
    shift: float = 1.0  # flow: the sampling schedule's shift
    prompts: str = "count"  # count (the 42 counting prompts) | geneval (the GenEval grammar's training prompts)


def pretrain_shapes(cfg: PretrainConfig, out: str | Path, progress: bool = True) -> ShapesDenoiser:
    """Train (or resume) the base model in ``out``; returns the EMA model."""
    out = Path(out)
    if cfg.prompts not in BATCHES:
        raise UserError(f"pretraining field 'prompts' must be one of {', '.join(BATCHES)}, got {cfg.prompts!r}")
    config = ShapesModelConfig(block_out_channels=tuple(cfg.block_out_channels), process=cfg.process, shift=cfg.shift,
                               prompts=cfg.prompts)
    model, ema, opt = start_run(out, cfg, lambda: ShapesDenoiser(config), weight_decay=0.0)
    process = model.process()
    resumable_loop(out, model, ema, opt, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, ema_decay=cfg.ema,
                   train_step=lambda step: (_train_step(cfg, step, model, process, opt), {}), desc=f"pretrain shapes ({cfg.process})",
                   progress=progress)
    return ema


def _train_step(cfg: PretrainConfig, step: int, model, process, opt) -> float:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    x0, prompts, _ = BATCHES[cfg.prompts](cfg.batch_size, cfg.seed * 1_000_003 + step)
    drop = torch.rand(len(prompts), generator=gen) < cfg.cond_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop.tolist())]
    t = process.training_timesteps(len(prompts), gen)
    noise = torch.randn(x0.shape, generator=gen)
    x_t = process.add_noise(x0, noise, t)
    pred = model(x_t, t, model.encode(prompts))
    loss = (pred - process.target(x0, noise, t)).pow(2).mean()
    return optimizer_step(model, opt, loss, cfg.lr * min(1.0, (step + 1) / cfg.warmup))


def pretrain_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain shapes``: train, export ``out/model`` with its card; one line for the user."""
    from rewardiff.pretraining import configure
    from rewardiff.worlds.shapes.card import write_card

    ema = pretrain_shapes(configure(PretrainConfig, steps, seed, overrides), out)
    ema.save(out / "model")
    card = write_card(out / "model", out)
    line = f"model and card: {out / 'model'}; judge counting accuracy (held-out): {card['judge_count_held_out']:.1%}"
    if "judge_geneval_overall_held_out" in card:
        line += f"; GenEval overall (held-out): {card['judge_geneval_overall_held_out']:.1%}"
    return line


def pretrain_flow_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain shapes-flow``: the same world and network trained as a rectified flow
    (velocity prediction, logit-normal timesteps as SD3), exported with its card."""
    return pretrain_command(out, steps, seed, {"process": "flow", **(overrides or {})})


def pretrain_geneval_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain shapes-geneval``: the flow model on the GenEval grammar's training
    prompts (the six tasks), exported with its card."""
    return pretrain_flow_command(out, steps, seed, {"prompts": "geneval", **(overrides or {})})
