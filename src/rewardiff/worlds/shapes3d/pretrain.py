"""``rewardiff pretrain shapes-3d``: train the 3D world's view-conditioned prior, resumably.

Each step renders a batch of random scenes of the training prompts from random cameras
(:func:`rewardiff.worlds.shapes3d.data.make_batch`, seeded by (seed, step)) and trains the
denoiser on ``"TEXT | view:AZ,EL"``; the text is dropped (camera kept) for ``text_dropout`` of
the prompts, as classifier-free guidance's unconditional branch reads them, and the camera for
``view_dropout`` (so the prior can also sample any view). Checkpoints, EMA and resume come from
:mod:`rewardiff.pretraining`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rewardiff.pretraining import optimizer_step, resumable_loop, start_run
from rewardiff.worlds.shapes.denoiser import ShapesModelConfig
from rewardiff.worlds.shapes3d import data
from rewardiff.worlds.shapes3d.prior import NAME, ViewDenoiser, with_view


@dataclass
class PretrainConfig:
    steps: int = 1500  # optimizer steps (the shipped model: 1500)
    batch_size: int = 32  # renders per step
    lr: float = 1e-3  # AdamW learning rate after warm-up
    warmup: int = 200  # linear warm-up steps
    ema: float = 0.999  # EMA decay of the shipped weights
    text_dropout: float = 0.1  # prompts whose text is dropped, camera kept (guidance's unconditional branch)
    view_dropout: float = 0.1  # prompts whose camera is dropped (sampling any view)
    seed: int = 0  # seeds the initial weights and every batch
    checkpoint_every: int = 100  # steps between checkpoints
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths


def training_prompts(prompts: list[str], cameras: list, gen: torch.Generator, cfg: PretrainConfig) -> list[str]:
    """The prompts a batch trains on: each text with its camera, some without text or camera."""
    u = torch.rand(len(prompts), 2, generator=gen)
    out = []
    for p, cam, (a, b) in zip(prompts, cameras, u.tolist()):
        text = "" if a < cfg.text_dropout else p
        out.append(text if b < cfg.view_dropout else with_view(text, cam.azimuth, cam.elevation))
    return out


def pretrain_prior(cfg: PretrainConfig, out: str | Path, progress: bool = True) -> ViewDenoiser:
    """Train (or resume) the prior in ``out``; returns the EMA model."""
    out = Path(out)
    config = ShapesModelConfig(block_out_channels=tuple(cfg.block_out_channels), prompts="shapes3d")
    model, ema, opt = start_run(out, cfg, lambda: ViewDenoiser(config), weight_decay=0.0)
    process = model.process()

    def step_fn(step: int) -> tuple[float, dict]:
        seed = cfg.seed * 1_000_003 + step
        gen = torch.Generator().manual_seed(seed)
        x0, prompts, cams, _ = data.make_batch(cfg.batch_size, seed)
        prompts = training_prompts(prompts, cams, gen, cfg)
        t = process.training_timesteps(len(prompts), gen)
        noise = torch.randn(x0.shape, generator=gen)
        pred = model(process.add_noise(x0, noise, t), t, model.encode(prompts))
        loss = (pred - process.target(x0, noise, t)).pow(2).mean()
        return optimizer_step(model, opt, loss, cfg.lr * min(1.0, (step + 1) / cfg.warmup)), {}

    resumable_loop(out, model, ema, opt, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, ema_decay=cfg.ema,
                   train_step=step_fn, desc=f"pretrain {NAME}", progress=progress)
    return ema


# ----------------------------------------------------------------------------- the card

CARD_STEPS = 20  # DDIM steps of the card's samples
CARD_GUIDANCE = 3.0
CARD_VIEWS = (0.0, 90.0, 180.0, 270.0)  # azimuths each prompt is sampled from, at CARD_ELEVATION
CARD_ELEVATION = 25.0


def measure(model_dir: Path, per_prompt: int = 1) -> dict:
    """The judge's accuracy on the prior's samples of held-out and training prompts from four
    views (fixed seeds), and samples.png (a row a held-out prompt, a column a view)."""
    from rewardiff.prompts import EVAL_SEED
    from rewardiff.report import save_grid
    from rewardiff.worlds.shapes3d.judge import judge
    from rewardiff.worlds.shapes3d.prior import shapes3d_model

    model = shapes3d_model(model_dir)
    res: dict = {}
    for name, texts in (("held_out", data.held_out_prompts()), ("train", data.train_prompts()[::7])):
        prompts = [t for t in texts for _ in range(per_prompt) for _ in CARD_VIEWS]
        viewed = [with_view(t, az, CARD_ELEVATION) for t in texts for _ in range(per_prompt) for az in CARD_VIEWS]
        seeds = [EVAL_SEED + i for i in range(len(viewed))]
        images = model.generate(viewed, seeds, batch_size=64, num_inference_steps=CARD_STEPS, guidance_scale=CARD_GUIDANCE)
        verdict = judge(images, prompts)
        for k, v in verdict.items():
            res[f"judge_{k}_{name}"] = float(v.mean())
        if name == "held_out":
            k = len(CARD_VIEWS)
            rows = min(12, len(texts))
            save_grid(images[: rows * k * per_prompt : per_prompt] if per_prompt == 1 else images[: rows * k], model_dir / "samples.png",
                      nrow=k, labels=[t if j % k == 0 else None for t in texts[:rows] for j in range(k)])
    return res


def write_card(model_dir: Path, train_dir: Path) -> dict:
    """Measure the prior in ``model_dir`` and write ``card.json`` and ``card.md`` there."""
    from rewardiff.io import atomic_write_text
    from rewardiff.report import read_metrics

    cfg = json.loads((train_dir / "config.json").read_text())
    rows = read_metrics(train_dir)
    losses = [r["loss"] for r in rows if "loss" in r]
    card = {"model": NAME, "train_config": cfg, "steps": len(losses),
            "final_loss": sum(losses[-100:]) / max(1, len(losses[-100:])),
            "data": "renders of the 3D shapes world's training prompts from random cameras (azimuth 0-360, elevation 10-40)",
            "sampling": {"steps": CARD_STEPS, "guidance_scale": CARD_GUIDANCE, "views": list(CARD_VIEWS), "elevation": CARD_ELEVATION},
            **measure(model_dir)}
    atomic_write_text(model_dir / "card.json", json.dumps(card, indent=2))
    lines = [f"# {NAME}: the 3D shapes world's view-conditioned prior", "",
             "The shapes denoiser (a small diffusers UNet, cross-attention on a tiny text encoder) with one more",
             "token: the camera (sin/cos of azimuth and elevation). Prompts: `TEXT | view:AZ,EL`.", "",
             f"- trained {card['steps']} steps, batch {cfg['batch_size']}, final loss {card['final_loss']:.4f}",
             f"- judge on samples of held-out prompts from 4 views: count+colours {card.get('judge_correct_held_out', float('nan')):.1%}",
             f"- judge on samples of training prompts: {card.get('judge_correct_train', float('nan')):.1%}", "",
             "![samples](samples.png)", ""]
    atomic_write_text(model_dir / "card.md", "\n".join(lines))
    return card


def pretrain_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain shapes-3d``: train, export ``out/model`` with its card; one line for the user."""
    from rewardiff.pretraining import configure

    ema = pretrain_prior(configure(PretrainConfig, steps, seed, overrides), out)
    ema.save(out / "model")
    card = write_card(out / "model", out)
    return (f"model and card: {out / 'model'}; judge on held-out prompts from 4 views: "
            f"{card.get('judge_correct_held_out', float('nan')):.1%}")
