"""``rewardiff pretrain molecules-ar``: train the molecules world's autoregressive generator.

Resumable like ``rewardiff pretrain shapes`` (:mod:`rewardiff.worlds.shapes.pretrain`): every batch
and the dropout of its step are drawn from a seed derived from (seed, step), and checkpoints
(weights, EMA, optimizer) are written atomically, so a resumed run sees exactly what an
uninterrupted one would.

Loss: next-token cross-entropy (teacher forcing; the start token ``<mask>`` before the first
symbol) over each molecule's symbols and the first ``<pad>`` that ends it, averaged over
those tokens. The pads after it are left out: the sampler forces them (``<pad>`` is absorbing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.worlds.molecules.autoregressive import ARModelConfig, ARTransformer
from rewardiff.optim import warmup_cosine
from rewardiff.pretraining import optimizer_step, resumable_loop, start_run
from rewardiff.worlds.molecules.pretrain_masked import CARD_SAMPLES, CARD_SEED, card_head, export, sample_measures, yardstick_lines  # noqa: F401  (export: re-exported)


@dataclass
class MoleculesARPretrainConfig:
    steps: int = 1500  # optimizer steps (the shipped model: 1500)
    batch_size: int = 64  # molecules per step
    lr: float = 1e-3  # AdamW peak learning rate, after warm-up
    warmup: int = 100  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = 0.01  # AdamW weight decay
    ema: float = 0.999  # EMA decay of the shipped weights
    seed: int = 0  # seeds the initial weights, every batch and every dropout mask
    checkpoint_every: int = 250  # steps between checkpoints
    dim: int = 128  # transformer width
    layers: int = 3  # transformer blocks
    heads: int = 4  # attention heads
    dropout: float = 0.1  # dropout inside the blocks


def _model_config(cfg: MoleculesARPretrainConfig) -> ARModelConfig:
    from rewardiff.worlds.molecules import data as molecules

    tok = molecules.tokenizer()
    return ARModelConfig(vocab_size=tok.size, max_len=tok.max_len, bos_id=tok.mask_id, dim=cfg.dim, layers=cfg.layers,
                         heads=cfg.heads, dropout=cfg.dropout)


def pretrain_molecules_ar(cfg: MoleculesARPretrainConfig, out: str | Path, progress: bool = True) -> ARTransformer:
    """Train (or resume) the autoregressive molecules model in ``out``; returns the EMA model (eval mode)."""
    from rewardiff.worlds.molecules import data as molecules

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError(f"steps and batch_size must be at least 1, got {cfg.steps} and {cfg.batch_size}")
    out = Path(out)
    data, _ = molecules.data("train")
    config = _model_config(cfg)
    model, ema, opt = start_run(out, cfg, lambda: ARTransformer(config), cfg.weight_decay)
    resumable_loop(out, model, ema, opt, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, ema_decay=cfg.ema,
                   train_step=lambda step: (_train_step(cfg, step, model, data, opt), {}), desc="pretrain molecules-ar", progress=progress)
    return ema.eval()


def next_token_loss(logits: Tensor, x0: Tensor, pad_id: int) -> Tensor:
    """Mean cross-entropy of logits [B, L, V] against x0 [B, L] over each molecule's symbols and
    its first pad (positions whose previous token is not a pad)."""
    ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # [B, L]
    prev_pad = F.pad((x0 == pad_id)[:, :-1], (1, 0), value=False)  # [B, L]
    keep = (~prev_pad).float()
    return (ce * keep).sum() / keep.sum()


def _train_step(cfg: MoleculesARPretrainConfig, step: int, model: ARTransformer, data: Tensor, opt) -> float:
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    x0 = data[torch.randint(len(data), (cfg.batch_size,), generator=gen)]  # [B, L]
    bos = torch.full((x0.shape[0], 1), model.config.bos_id, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):  # dropout masks: a function of (seed, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step + 500_009)
        logits, _ = model(torch.cat([bos, x0[:, :-1]], 1))
    return optimizer_step(model, opt, next_token_loss(logits, x0, 0), warmup_cosine(step, cfg.steps, cfg.warmup, floor=0.1, lr=cfg.lr, after_warmup=True))


# ----------------------------------------------------------------------------- export and card


def measure(model_dir: Path, n: int = CARD_SAMPLES) -> dict:
    """:func:`~rewardiff.worlds.molecules.pretrain_masked.sample_measures` of ``n`` samples (seeds from
    ``CARD_SEED``), and a drawing of the first 24 (``samples.png``)."""
    from rewardiff.worlds.molecules.autoregressive import molecules_ar_model
    from rewardiff.worlds.molecules.draw import save_molecule_grid

    model = molecules_ar_model(model_dir)
    smiles = model.texts(model.generate([""] * n, [CARD_SEED + i for i in range(n)], batch_size=128))
    save_molecule_grid(smiles[:24], model_dir / "samples.png")
    return {"samples": n, **sample_measures(model_dir, smiles)}


def write_card(model_dir: str | Path, train_dir: str | Path) -> dict:
    """Measure the model in ``model_dir`` and write ``card.json`` and ``card.md`` there."""
    model_dir = Path(model_dir)
    cfg, head = card_head(train_dir, ARTransformer.load(model_dir), ("loss",))
    card = {**head, "held_out_loss": held_out_loss(model_dir), **measure(model_dir)}
    atomic_write_text(model_dir / "card.json", json.dumps(card, indent=2))
    atomic_write_text(model_dir / "card.md", _card_md(card, cfg))
    return card


@torch.no_grad()
def held_out_loss(model_dir: Path) -> float:
    """The loss of :func:`next_token_loss` on the held-out molecules (nats per token)."""
    from rewardiff.worlds.molecules import data as molecules

    net = ARTransformer.load(model_dir)
    x0, _ = molecules.data("held-out")
    bos = torch.full((x0.shape[0], 1), net.config.bos_id, dtype=torch.long)
    logits, _ = net(torch.cat([bos, x0[:, :-1]], 1))
    return float(next_token_loss(logits, x0, 0))


def _card_md(card: dict, cfg: dict) -> str:
    qs, qh = card["qed_samples"], card["qed_held_out"]
    fmt = lambda q: f"mean {q['mean']:.3f} (sd {q['std']:.3f}); quartiles {q['q25']:.3f} / {q['q50']:.3f} / {q['q75']:.3f}"  # noqa: E731
    lines = [
        "# molecules autoregressive base model", "",
        f"- data: {card['data']}",
        f"- model: causal transformer, {card['parameters']:,} parameters; start token <mask>, <pad> absorbing",
        f"- training: {json.dumps(cfg)}",
        f"- steps: {card['steps_done']} in {card['train_seconds'] / 60:.1f} min; next-token cross-entropy (nats per token): "
        f"{card['final_loss_mean_last_200']:.4f} (training batches, mean of the last 200 steps), "
        f"{card['held_out_loss']:.4f} (held-out molecules, EMA weights)",
        f"- reproduce: rewardiff pretrain molecules-ar --steps {card['steps_done']} --seed {cfg['seed']}",
        f"- {card['samples']} samples (seeds {CARD_SEED}...): validity {card['validity']:.1%}, "
        f"uniqueness {card['uniqueness']:.1%}, novelty against the training set {card['novelty']:.1%}",
        f"- QED of the samples: {fmt(qs)}",
        f"- QED of the held-out molecules: {fmt(qh)}",
        *yardstick_lines(card),
        "", "The samples' SMILES are in samples.txt; the first 24 are drawn below.", "", "![samples](samples.png)", "",
    ]
    return "\n".join(lines)


def pretrain_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain molecules-ar``: train, export ``out/model`` with its card; one line for the user."""
    from rewardiff.pretraining import configure
    from rewardiff.worlds.molecules.pretrain_masked import card_line

    cfg = configure(MoleculesARPretrainConfig, steps, seed, overrides)
    return card_line(out, write_card(export(pretrain_molecules_ar(cfg, out), out / "model"), out))
