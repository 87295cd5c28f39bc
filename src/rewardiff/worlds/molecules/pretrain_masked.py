"""``rewardiff pretrain molecules``: train the molecules world's masked-diffusion denoiser.

Resumable like ``rewardiff pretrain shapes`` (:mod:`rewardiff.worlds.shapes.pretrain`): every batch
(molecules, timesteps, masks) and the dropout of its step are drawn from a seed derived from
(seed, step), and checkpoints (weights, EMA, optimizer) are written atomically, so a resumed
run sees exactly what an uninterrupted one would.

Loss. With t drawn uniformly from the N training timesteps (stratified over the batch), the
masked-diffusion negative ELBO per token in discrete time (Sahoo et al. 2024, MDLM eq. 10;
Shi et al. 2024, MD4 eq. 5) is

    NELBO = N (alpha_{t-1} - alpha_t) / (1 - alpha_t) * sum over masked positions of -log x0_hat[x_0] / L

(the weight is 1 / s for the linear schedule). The default ``weighting="none"`` trains on the
plain cross-entropy averaged over the batch's masked tokens instead: in short runs on this data
it reached a lower held-out NELBO than training on the NELBO itself, whose 1 / s weights make
the gradient heavy-tailed. ``weighting="elbo"`` trains on the NELBO; both are logged every
step. The pad tokens that end a molecule are tokens like any other: the model learns where
molecules end.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.worlds.molecules.masked import MaskedDenoiser, MaskedModelConfig
from rewardiff.optim import warmup_cosine
from rewardiff.pretraining import optimizer_step, resumable_loop, start_run

CARD_SAMPLES = 512  # samples measured for the card
CARD_STEPS = 64  # sampler steps of the card's samples
CARD_SEED = 10_000  # first seed of the card's samples


@dataclass
class MoleculesPretrainConfig:
    steps: int = 3000  # optimizer steps (the shipped model: 3000)
    batch_size: int = 64  # molecules per step
    lr: float = 2e-3  # AdamW peak learning rate, after warm-up
    warmup: int = 200  # linear warm-up steps, then cosine decay to lr / 10
    weight_decay: float = 0.01  # AdamW weight decay
    ema: float = 0.999  # EMA decay of the shipped weights
    weighting: str = "none"  # loss: none (masked-token cross-entropy) or elbo (the MDLM/MD4 NELBO)
    seed: int = 0  # seeds the initial weights, every batch and every dropout mask
    checkpoint_every: int = 250  # steps between checkpoints
    dim: int = 128  # transformer width
    layers: int = 3  # transformer layers
    heads: int = 4  # attention heads
    dropout: float = 0.0  # dropout inside the transformer
    schedule: str = "linear"  # masking schedule: linear or cosine


def _model_config(cfg: MoleculesPretrainConfig) -> MaskedModelConfig:
    from rewardiff.worlds.molecules import data as molecules

    tok = molecules.tokenizer()
    return MaskedModelConfig(vocab_size=tok.size, max_len=tok.max_len, mask_id=tok.mask_id, dim=cfg.dim,
                             layers=cfg.layers, heads=cfg.heads, dropout=cfg.dropout, schedule=cfg.schedule)


def _check(cfg: MoleculesPretrainConfig) -> None:
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError(f"steps and batch_size must be at least 1, got {cfg.steps} and {cfg.batch_size}")
    if cfg.weighting not in ("elbo", "none"):
        raise UserError(f"weighting must be elbo or none, got {cfg.weighting!r}")
    if cfg.schedule not in ("linear", "cosine"):
        raise UserError(f"schedule must be linear or cosine, got {cfg.schedule!r}")


def pretrain_molecules(cfg: MoleculesPretrainConfig, out: str | Path, progress: bool = True) -> MaskedDenoiser:
    """Train (or resume) the molecules denoiser in ``out``; returns the EMA model (eval mode)."""
    from rewardiff.worlds.molecules import data as molecules

    _check(cfg)
    out = Path(out)
    data, _ = molecules.data("train")
    config = _model_config(cfg)
    model, ema, opt = start_run(out, cfg, lambda: MaskedDenoiser(config), cfg.weight_decay)
    resumable_loop(out, model, ema, opt, steps=cfg.steps, checkpoint_every=cfg.checkpoint_every, ema_decay=cfg.ema,
                   train_step=lambda step: _train_step(cfg, step, model, data, opt), desc="pretrain molecules", progress=progress)
    return ema.eval()


def make_batch(cfg: MoleculesPretrainConfig, step: int, data: Tensor, process) -> tuple[Tensor, Tensor, Tensor]:
    """(x0 [B, L], t [B], x_t [B, L]) of ``step``: molecules drawn with replacement, stratified
    timesteps t = floor(N (u + i / B) mod N), each token masked with prob 1 - alpha_t."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    B, N = cfg.batch_size, process.num_train_timesteps
    x0 = data[torch.randint(len(data), (B,), generator=gen)]
    u = (torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(B, dtype=torch.float64) / B) % 1.0
    t = (u * N).long().clamp(max=N - 1)
    return x0, t, process.add_noise(x0, gen, t)


def masked_diffusion_loss(logits: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, process) -> tuple[Tensor, Tensor]:
    """(NELBO, masked cross-entropy) of logits [B, L, V] at (x_t, t) for clean x0 [B, L], in nats.

    NELBO: the batch mean of w(t) * sum_masked CE / L, the negative ELBO per token; masked
    cross-entropy: the mean CE over the batch's masked tokens. The mask logit is excluded
    (x0 is never the mask).
    """
    logits = logits.float().index_fill(-1, torch.tensor([process.mask_id], device=logits.device), -math.inf)
    ce = F.cross_entropy(logits.transpose(1, 2), x0, reduction="none")  # [B, L]
    masked = (x_t == process.mask_id).float()
    masked_ce = (ce * masked).sum() / masked.sum().clamp(min=1)
    w = process.elbo_weight(t).to(logits.device)  # [B]
    return (w * (ce * masked).sum(1) / x0.shape[1]).mean(), masked_ce


def _train_step(cfg: MoleculesPretrainConfig, step: int, model: MaskedDenoiser, data: Tensor, opt) -> tuple[float, dict]:
    process = model.process()
    x0, t, x_t = make_batch(cfg, step, data, process)
    with torch.random.fork_rng(devices=[]):  # dropout masks: a function of (seed, step)
        torch.manual_seed(cfg.seed * 1_000_003 + step + 500_009)
        logits = model(x_t, t, None)
    nelbo, ce = masked_diffusion_loss(logits, x0, x_t, t, process)
    loss = nelbo if cfg.weighting == "elbo" else ce
    lr = warmup_cosine(step, cfg.steps, cfg.warmup, floor=0.1, lr=cfg.lr, after_warmup=True)
    return optimizer_step(model, opt, loss, lr), {"nelbo": float(nelbo.detach()), "masked_ce": float(ce.detach())}


# ----------------------------------------------------------------------------- the card


def _qed(smiles: list[str]) -> list[float]:
    """QED (RDKit, Bickerton et al. 2012) of each valid SMILES; invalid ones are skipped."""
    from rdkit.Chem import QED

    from rewardiff.worlds.molecules import data as molecules

    mols = [molecules.parse(s) for s in smiles]
    return [float(QED.qed(m)) for m in mols if m is not None]


def quantile_summary(values: list[float]) -> dict[str, float]:
    """Mean, standard deviation and the 10/25/50/75/90 % quantiles of a card's measure."""
    v = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(v, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)).tolist()
    return {"mean": float(v.mean()), "std": float(v.std()), "q10": q[0], "q25": q[1], "q50": q[2], "q75": q[3], "q90": q[4]}


def sample_measures(model_dir: Path, smiles: list[str]) -> dict:
    """What every molecules card says of a model's samples: validity, uniqueness, novelty
    against the training set and the QED distribution, beside the held-out molecules' QED, and
    the yardsticks against the held-out molecules (FCD, internal diversity, property
    distributions: :func:`rewardiff.worlds.molecules.metrics.measures`) beside the held-out
    molecules' own property means; the SMILES go to ``samples.txt`` in ``model_dir``."""
    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.metrics import measures, reference_summary

    atomic_write_text(model_dir / "samples.txt", "\n".join(smiles) + "\n")
    _, train = molecules.data("train")
    _, held = molecules.data("held-out")
    return {
        "validity": molecules.validity(smiles), "uniqueness": molecules.uniqueness(smiles),
        "novelty": molecules.novelty(smiles, train),
        "qed_samples": quantile_summary(_qed(smiles)), "qed_held_out": quantile_summary(_qed(held)),
        "yardsticks": measures(smiles, "held-out"), "yardsticks_held_out": reference_summary("held-out"),
    }


def yardstick_lines(card: dict) -> list[str]:
    """The card.md lines of a card's yardsticks (see :func:`sample_measures`)."""
    y, h = card["yardsticks"], card["yardsticks_held_out"]
    names = {"qed": "QED", "sa_score": "SA score (1 easy ... 10 hard)", "logp": "logP", "rings": "rings",
             "aromatic_rings": "aromatic rings", "heavy_atoms": "heavy atoms"}
    props = "; ".join(f"{label} {y[k + '_mean']:.2f} ({h[k + '_mean']:.2f}, W1 {y[k + '_w1']:.3f})" for k, label in names.items())
    return [
        f"- against the {int(h['samples'])} held-out molecules (rewardiff.worlds.molecules.metrics): FCD {y['fcd']:.2f} "
        f"on {int(y['fcd_n'])} valid samples (FCD falls with the sample count: compare at equal counts; "
        "benchmarks/results/molecules/yardsticks.md has the training split's own FCD); internal diversity "
        f"{y['internal_diversity']:.3f} (1 - Tanimoto, Morgan radius 2, 2048 bits)",
        f"- molecules with an aromatic ring: {y['aromatic_fraction']:.1%} (held-out {h['aromatic_fraction']:.1%})",
        f"- sample means (held-out means, Wasserstein-1 distance): {props}",
    ]


def measure(model_dir: Path, n: int = CARD_SAMPLES, steps: int = CARD_STEPS) -> dict:
    """:func:`sample_measures` of ``n`` samples (seeds from ``CARD_SEED``, ``steps`` sampler steps)."""
    from rewardiff.worlds.molecules.masked import molecules_model

    model = molecules_model(model_dir)
    ids = model.generate([""] * n, [CARD_SEED + i for i in range(n)], batch_size=128, num_inference_steps=steps)
    return {"samples": n, "sampler_steps": steps, **sample_measures(model_dir, model.texts(ids))}


@torch.no_grad()
def evaluate(net: MaskedDenoiser, split: str, limit: int = 1024, passes: int = 4, seed: int = 0) -> dict[str, float]:
    """NELBO and masked-token cross-entropy (nats) of ``net`` on the first ``limit`` molecules of
    ``split``, averaged over ``passes`` draws of stratified timesteps and masks (fixed seed)."""
    from rewardiff.worlds.molecules import data as molecules

    x0 = molecules.data(split)[0][:limit]
    process, gen, B, N = net.process(), torch.Generator().manual_seed(seed), len(x0), net.config.num_train_timesteps
    nelbo = ce = 0.0
    for _ in range(passes):
        u = (torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(B, dtype=torch.float64) / B) % 1.0
        t = (u * N).long().clamp(max=N - 1)
        x_t = process.add_noise(x0, gen, t)
        a, b = masked_diffusion_loss(net(x_t, t, None), x0, x_t, t, process)
        nelbo, ce = nelbo + float(a) / passes, ce + float(b) / passes
    return {"nelbo": nelbo, "masked_ce": ce}


def card_head(train_dir: str | Path, net: torch.nn.Module, means: tuple[str, ...]) -> tuple[dict, dict]:
    """What every molecules model card starts with: (the training config, the card's first
    fields: the data, the config, the parameters of ``net``, steps done, training seconds, and
    the mean of each metric in ``means`` over the last 200 steps)."""
    from rewardiff.report import step_rows, training_tail
    from rewardiff.worlds.molecules import data as molecules

    train_dir = Path(train_dir)
    cfg = json.loads((train_dir / "config.json").read_text())
    rows = step_rows(train_dir)
    tail = training_tail(train_dir, means, rows=rows)
    n_train, n_held = len(molecules.data("train")[1]), len(molecules.data("held-out")[1])
    tok = molecules.tokenizer()
    head = {
        "data": f"RDKit's NCI first_5K.smi as SELFIES tokens (rewardiff.worlds.molecules.data): {n_train} training, "
                f"{n_held} held-out molecules, L = {tok.max_len}, V = {tok.size}",
        "training": cfg,
        "parameters": sum(p.numel() for p in net.parameters()),
        "steps_done": tail.pop("steps_done"),
        "train_seconds": sum(r.get("seconds", 0.0) for r in rows),
        **tail,
    }
    return cfg, head


def write_card(model_dir: str | Path, train_dir: str | Path) -> dict:
    """Measure the model in ``model_dir`` and write ``card.json`` and ``card.md`` there."""
    model_dir = Path(model_dir)
    net = MaskedDenoiser.load(model_dir)
    cfg, head = card_head(train_dir, net, ("loss", "nelbo", "masked_ce"))
    card = {**head, "eval_train": evaluate(net, "train"), "eval_held_out": evaluate(net, "held-out"), **measure(model_dir)}
    atomic_write_text(model_dir / "card.json", json.dumps(card, indent=2))
    atomic_write_text(model_dir / "card.md", _card_md(card, cfg))
    return card


def _card_md(card: dict, cfg: dict) -> str:
    qs, qh = card["qed_samples"], card["qed_held_out"]
    fmt = lambda q: f"mean {q['mean']:.3f} (sd {q['std']:.3f}); quartiles {q['q25']:.3f} / {q['q50']:.3f} / {q['q75']:.3f}"  # noqa: E731
    lines = [
        "# molecules masked-diffusion base model", "",
        f"- data: {card['data']}",
        f"- model: bidirectional transformer, {card['parameters']:,} parameters; absorbing-state (masked) diffusion, "
        f"{cfg['schedule']} schedule alpha, 1000 training timesteps",
        f"- training: {json.dumps(cfg)}",
        f"- steps: {card['steps_done']} in {card['train_seconds'] / 60:.1f} min; mean over the last 200 steps: "
        f"loss ({cfg['weighting']}) {card['final_loss_mean_last_200']:.4f}, NELBO per token "
        f"{card['final_nelbo_mean_last_200']:.4f}, masked-token cross-entropy {card['final_masked_ce_mean_last_200']:.4f} (nats)",
        f"- EMA weights, NELBO per token / masked-token cross-entropy: training set {card['eval_train']['nelbo']:.4f} / "
        f"{card['eval_train']['masked_ce']:.4f}, held-out {card['eval_held_out']['nelbo']:.4f} / {card['eval_held_out']['masked_ce']:.4f}",
        f"- reproduce: rewardiff pretrain molecules --steps {card['steps_done']} --seed {cfg['seed']}",
        f"- {card['samples']} samples ({card['sampler_steps']} steps, seeds {CARD_SEED}...): validity {card['validity']:.1%}, "
        f"uniqueness {card['uniqueness']:.1%}, novelty against the training set {card['novelty']:.1%}",
        f"- QED of the samples: {fmt(qs)}",
        f"- QED of the held-out molecules: {fmt(qh)}",
        *yardstick_lines(card),
        "", "The samples' SMILES are in samples.txt.", "",
    ]
    return "\n".join(lines)


def export(ema, directory: str | Path) -> Path:
    """Save a trained molecules model (masked denoiser or autoregressive) with a copy of the
    world's tokenizer, as ``molecules_model`` and ``molecules_ar_model`` load it."""
    from rewardiff.worlds.molecules import data as molecules

    d = Path(directory)
    ema.save(d)
    molecules.tokenizer().save(d / "tokenizer.json")
    return d


def card_line(out: Path, card: dict) -> str:
    """The one line ``rewardiff pretrain`` prints for a molecules model's card."""
    return (f"model and card: {out / 'model'}; validity {card['validity']:.1%}, uniqueness {card['uniqueness']:.1%}, "
            f"novelty {card['novelty']:.1%}, QED {card['qed_samples']['mean']:.3f} (held-out data {card['qed_held_out']['mean']:.3f})")


def pretrain_command(out: Path, steps: int | None, seed: int, overrides: dict | None = None) -> str:
    """``rewardiff pretrain molecules``: train, export ``out/model`` with its card; one line for the user."""
    from rewardiff.pretraining import configure

    cfg = configure(MoleculesPretrainConfig, steps, seed, overrides)
    return card_line(out, write_card(export(pretrain_molecules(cfg, out), out / "model"), out))
