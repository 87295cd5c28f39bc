"""A differentiable multi-task reward model of the molecules world: QED, SA and logP at once.

As in DiffRO's multi-task reward model, one small network reads relaxed token probabilities
[B, L, V] (so that Gumbel-softmax samples get a gradient) and predicts the RDKit properties
of :mod:`rewardiff.worlds.molecules.chem` from shared features, one head each:

1. Embed: a linear map of the probabilities (a one-hot row picks a token embedding; a relaxed
   row mixes them) plus a learned position embedding.
2. End of sequence: ``alive_l = prod_{j <= l} (1 - p_j(<pad>) - p_j(<mask>))``, the probability
   that the sequence has not ended by position l. Features are multiplied by it, so that the
   model, like the tokenizer, ignores what follows the first <pad> or <mask>.
3. Residual dilated 1-D convolutions of width 3 (dilations 1, 2, 4, 8; written as a linear map
   of each position's neighbours, faster on a CPU), masked by ``alive`` after each.
4. Pool: the mean over the molecule's positions and the sum divided by L (size-like
   properties such as logP add up over atoms); an MLP gives the three standardized heads.

Training (:func:`train_chem_rm`): the world's training molecules, plus corrupted copies of
each: ``near`` copies with 1-3 symbols replaced and ``far`` copies with 5-30 % replaced
(SELFIES keeps them valid; RDKit relabels them, and copies that decode to an empty molecule
are left out). Half of every batch is plain one-hot sequences; the other half interpolates
each copy with its molecule, ``lam * onehot(copy) + (1 - lam) * onehot(molecule)`` with
lam ~ U(0, 1), and the labels likewise. That teaches the network to be close to linear along
the segment between a molecule and a molecule with a few symbols swapped, so that its
gradient at a one-hot sequence predicts what swapping a symbol does to the property: the
signal a straight-through Gumbel-softmax sample receives. (Training on relaxations that keep
the molecule's label would teach the opposite, a function flat around every one-hot, whose
gradient says nothing about swaps.) Labels are RDKit's values, standardized with the training
mean and deviation. The card reports, beside R² on held-out molecules, the Spearman
correlation between the gradient's prediction of a random one-symbol swap and RDKit's change.

Rewards: ``chem-rm-qed``, ``chem-rm-sa``, ``chem-rm-logp`` (each head in RDKit's units; SA as
``(10 - SA) / 9``) and ``chem-rm``, a weighted sum of heads (default 0.5 qed + 0.5 sa: a
differentiable stand-in for the black-box ``qed-sa``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.optim import warmup_cosine_schedule
from rewardiff.io import atomic_write
from rewardiff.rewards.base import RewardCallable, RewardFn
from rewardiff.worlds.molecules.chem import property_values
from rewardiff.worlds.molecules import data as molecules
from rewardiff.worlds import WEIGHTS

WEIGHTS_DIR = WEIGHTS / "molecules-rm"
HEADS = ("qed", "sa", "logp")
DEFAULT_WEIGHTS = {"qed": 0.5, "sa": 0.5, "logp": 0.0}
DILATIONS = (1, 2, 4, 8)


# ----------------------------------------------------------------------------- the network


class ChemRM(nn.Module):
    """Probabilities [B, L, V] -> standardized predictions [B, 3] of (qed, sa, logp).

    Args:
        vocab_size: V, the tokenizer's vocabulary size.
        max_len: the longest L the position embedding covers.
        width: channels of the embedding and convolutions.
    """

    def __init__(self, vocab_size: int, max_len: int, width: int = 64):
        super().__init__()
        self.vocab_size, self.max_len, self.width = vocab_size, max_len, width
        self.embed = nn.Linear(vocab_size, width, bias=False)
        self.pos = nn.Parameter(0.02 * torch.randn(max_len, width))
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in DILATIONS)
        self.convs = nn.ModuleList(nn.Linear(3 * width, width) for _ in DILATIONS)
        self.head = nn.Sequential(nn.Linear(2 * width, width), nn.SiLU(), nn.Linear(width, len(HEADS)))
        self.register_buffer("target_mean", torch.zeros(len(HEADS)))
        self.register_buffer("target_std", torch.ones(len(HEADS)))

    def forward(self, p: Tensor) -> Tensor:
        B, L, V = p.shape
        alive = torch.cumprod(1 - p[..., :2].sum(-1), dim=1)[..., None]  # [B, L, 1]; ids 0, 1 end it
        h = (self.embed(p) + self.pos[:L]) * alive  # [B, L, W]
        for norm, conv, d in zip(self.norms, self.convs, DILATIONS):
            h = h + F.silu(conv(_neighbours(norm(h), d)))
            h = h * alive
        total = h.sum(1)  # [B, W]
        pooled = torch.cat([total / alive.sum(1).clamp(min=1.0), total / self.max_len], dim=-1)
        return self.head(pooled)  # [B, 3]

    def predict(self, p: Tensor) -> Tensor:
        """Predictions [B, 3] of (qed, flipped sa, logp) in RDKit's units."""
        return self(p) * self.target_std + self.target_mean


def _neighbours(h: Tensor, d: int) -> Tensor:
    """Each position's features beside those d positions before and after (zeros beyond the ends).

    A linear map of the result is a width-3 convolution with dilation d. [B, L, W] -> [B, L, 3 W]
    """
    z = F.pad(h, (0, 0, d, d))
    return torch.cat([z[:, : -2 * d], h, z[:, 2 * d :]], dim=-1)


def as_probs(x: Tensor, vocab_size: int) -> Tensor:
    """Float probabilities [B, L, V] from ids [B, L] (one-hot) or probabilities [B, L, V]."""
    if x.dim() == 2 and not x.is_floating_point():
        return F.one_hot(x.long(), vocab_size).float()
    if x.dim() == 3 and x.shape[-1] == vocab_size:
        return x.float()
    raise UserError(f"the molecules reward model takes ids [B, L] or probabilities [B, L, {vocab_size}]; got {x.dtype} {tuple(x.shape)}")


def num_params(net: nn.Module) -> int:
    """Number of parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- save / load


def save_chem_rm(net: ChemRM, out_dir: str | Path, card: dict) -> Path:
    """Write ``model.safetensors`` (config in its metadata) and ``card.json`` atomically."""
    out = Path(out_dir)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    config = {"vocab_size": net.vocab_size, "max_len": net.max_len, "width": net.width}
    meta = {"config": json.dumps(config)}
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=meta))
    atomic_write(out / "card.json", lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return out


_CACHE: dict[tuple[str, int], ChemRM] = {}


def _weights_file(path: str | Path | None) -> Path:
    """``model.safetensors`` inside the folder ``path`` (the shipped folder when None)."""
    folder = Path(path) if path is not None else WEIGHTS_DIR
    file = folder / "model.safetensors"
    if not file.is_file():
        raise UserError(f"molecules reward model weights not found in {folder} (expected model.safetensors); train them with train_chem_rm")
    return file


def load_chem_rm(path: str | Path | None = None) -> ChemRM:
    """The reward model in folder ``path`` (shipped weights by default); frozen, eval mode, cached.

    Raises:
        UserError: no ``model.safetensors`` in the folder, or a vocabulary size that differs
            from the world's tokenizer.
    """
    file = _weights_file(path)
    key = (str(file.resolve()), file.stat().st_mtime_ns)
    if key not in _CACHE:
        with safe_open(str(file), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        size = molecules.tokenizer().size
        if config.get("vocab_size") != size:
            raise UserError(f"{file}: vocab_size {config.get('vocab_size')} differs from the molecules tokenizer's {size}")
        net = ChemRM(config["vocab_size"], config["max_len"], config["width"])
        net.load_state_dict(state)
        _CACHE[key] = net.eval().requires_grad_(False)
    return _CACHE[key]


# ----------------------------------------------------------------------------- rewards


def parse_weights(weights: dict[str, float] | str | None) -> dict[str, float]:
    """Head weights from a dict or a ``"qed=0.5,sa=0.5"`` string (missing heads weigh 0).

    Raises:
        UserError: an unknown head or a weight that is not a number.
    """
    if weights is None:
        return dict(DEFAULT_WEIGHTS)
    if isinstance(weights, str):
        try:
            weights = {k.strip(): float(v) for k, v in (kv.split("=") for kv in weights.split(",") if kv.strip())}
        except ValueError:
            raise UserError(f"chem-rm weights {weights!r} must look like 'qed=0.5,sa=0.5,logp=0'") from None
    unknown = sorted(set(weights) - set(HEADS))
    if unknown:
        raise UserError(f"chem-rm weights name unknown heads {unknown}; valid: {', '.join(HEADS)}")
    return {h: float(weights.get(h, 0.0)) for h in HEADS}


def _head_fn(path: str | Path | None, weights: dict[str, float]) -> RewardCallable:
    """``fn(x, prompts) -> [B]``: the weighted heads, with the model loaded at first call."""
    _weights_file(path)  # fail now, not at the first call
    w = torch.tensor([weights[h] for h in HEADS])

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        net = load_chem_rm(path).to(x.device)
        return net.predict(as_probs(x, net.vocab_size)) @ w.to(x.device)

    return fn


def _single(head: str, path: str | Path | None) -> RewardFn:
    """The reward of one head."""
    weights = {h: float(h == head) for h in HEADS}
    desc = f"molecules: reward model's prediction of {head} (differentiable, reads probabilities [B, L, V])"
    return RewardFn(f"chem-rm-{head}", True, None, desc, _head_fn(path, weights))


def chem_rm_qed(path: str | Path | None = None) -> RewardFn:
    """Molecules: the reward model's QED prediction (differentiable)."""
    return _single("qed", path)


def chem_rm_sa(path: str | Path | None = None) -> RewardFn:
    """Molecules: the reward model's (10 - SA) / 9 prediction (differentiable)."""
    return _single("sa", path)


def chem_rm_logp(path: str | Path | None = None) -> RewardFn:
    """Molecules: the reward model's Crippen logP prediction (differentiable)."""
    return _single("logp", path)


def chem_rm(weights: dict[str, float] | str | None = None, path: str | Path | None = None) -> RewardFn:
    """Molecules: weighted reward-model heads, by default 0.5 qed + 0.5 sa (differentiable)."""
    w = parse_weights(weights)
    mix = "+".join(f"{v:g}*{h}" for h, v in w.items() if v)
    return RewardFn("chem-rm", True, None, f"molecules: reward model's {mix or '0'} (differentiable)", _head_fn(path, w))


# ----------------------------------------------------------------------------- training data


def labels(smiles: list[str]) -> Tensor:
    """RDKit labels [N, 3] of (qed, flipped sa, logp)."""
    return torch.stack([property_values(h, smiles) for h in HEADS], dim=1)


def corrupt(ids: Tensor, gen: torch.Generator, low: float = 0.05, high: float = 0.3) -> Tensor:
    """Replace a share in [low, high) of each molecule's symbols with random symbols. [N, L] -> [N, L]"""
    tok = molecules.tokenizer()
    inside = torch.cumprod((ids != tok.pad_id).long(), dim=1).bool()  # before the first <pad>
    share = low + (high - low) * torch.rand(ids.shape[0], 1, generator=gen)
    hit = inside & (torch.rand(ids.shape, generator=gen) < share)
    random = torch.randint(2, tok.size, ids.shape, generator=gen)
    return torch.where(hit, random, ids)


def swap(ids: Tensor, gen: torch.Generator, most: int = 3) -> Tensor:
    """Replace 1 to ``most`` symbols of each molecule (positions before its first <pad>) with
    random symbols (possibly the same one). [N, L] -> [N, L]"""
    tok = molecules.tokenizer()
    inside = torch.cumprod((ids != tok.pad_id).long(), dim=1).bool()
    count = torch.randint(1, most + 1, (ids.shape[0], 1), generator=gen)
    rank = torch.where(inside, torch.rand(ids.shape, generator=gen), torch.full(ids.shape, 2.0)).argsort(1).argsort(1)
    hit = inside & (rank < count)
    random = torch.randint(2, tok.size, ids.shape, generator=gen)
    return torch.where(hit, random, ids)


def _split(name: str, limit: int | None) -> tuple[Tensor, list[str]]:
    """Ids and SMILES of a molecules-world split, the first ``limit`` only when given."""
    ids, smiles = molecules.data(name)
    return (ids, smiles) if limit is None else (ids[:limit], smiles[:limit])


def _dataset(gen: torch.Generator, near: int, far: int, limit: int | None) -> tuple[Tensor, Tensor, Tensor]:
    """Training ids [N, L], labels [N, 3] and each row's molecule [N] (an index of a row; a
    molecule is its own): the train molecules, ``near`` copies of each with 1-3 symbols
    replaced and ``far`` copies with 5-30 % replaced."""
    tok = molecules.tokenizer()
    ids, smiles = _split("train", limit)
    n = ids.shape[0]
    all_ids, all_y, parent = [ids], [labels(smiles)], [torch.arange(n)]
    for change in [swap] * near + [corrupt] * far:
        bad = change(ids, gen)
        decoded = tok.decode_batch(bad)
        keep = [i for i, s in enumerate(decoded) if s]
        all_ids.append(bad[keep])
        all_y.append(labels([decoded[i] for i in keep]))
        parent.append(torch.tensor(keep, dtype=torch.long))
    return torch.cat(all_ids), torch.cat(all_y), torch.cat(parent)


def _r2(pred: Tensor, y: Tensor) -> list[float]:
    """Coefficient of determination per column. [N, K], [N, K] -> K floats"""
    ss_res = ((pred - y) ** 2).sum(0)
    ss_tot = ((y - y.mean(0)) ** 2).sum(0)
    return (1 - ss_res / ss_tot).tolist()


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two vectors [N] (ties broken by order)."""
    ra, rb = a.argsort().argsort().float(), b.argsort().argsort().float()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def evaluate(net: ChemRM, x: Tensor, y: Tensor) -> dict[str, dict[str, float]]:
    """R² and Spearman per head of ``net`` on ids [N, L] or probabilities [N, L, V] with labels [N, 3]."""
    with torch.no_grad():
        pred = net.predict(as_probs(x, net.vocab_size))
    r2 = _r2(pred, y)
    return {h: {"r2": round(r2[k], 4), "spearman": round(spearman(pred[:, k], y[:, k]), 4)} for k, h in enumerate(HEADS)}


def _train_loop(net: ChemRM, ids: Tensor, y: Tensor, parent: Tensor, steps: int, gen: torch.Generator, batch_size: int,
                lr: float, slope_weight: float = 0.0) -> float:
    """AdamW with cosine decay on MSE of standardized targets, half of each batch interpolated
    between a corrupted copy and its molecule (module doc); returns the mean loss of the last 100 steps."""
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine_schedule(opt, steps, 50)
    z = (y - net.target_mean) / net.target_std
    copies = (parent != torch.arange(len(parent))).nonzero().squeeze(1)
    half = batch_size // 2
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size - half,), generator=gen)
        pair = copies[torch.randint(0, len(copies), (half,), generator=gen)] if len(copies) else idx[:0]
        lam = torch.rand(len(pair), 1, generator=gen)
        p = torch.cat([F.one_hot(ids[idx], net.vocab_size).float(),
                       lam[..., None] * F.one_hot(ids[pair], net.vocab_size) + (1 - lam[..., None]) * F.one_hot(ids[parent[pair]], net.vocab_size)])
        target = torch.cat([z[idx], lam * z[pair] + (1 - lam) * z[parent[pair]]])
        loss = F.mse_loss(net(p), target)
        if slope_weight > 0 and len(pair):  # the slope at the molecule along the swap, against the labels' change
            base = F.one_hot(ids[parent[pair]], net.vocab_size).float().requires_grad_(True)
            step = F.one_hot(ids[pair], net.vocab_size).float() - base.detach()
            out = net(base)
            slopes = torch.stack([(torch.autograd.grad(out[:, k].sum(), base, create_graph=True)[0] * step).sum((1, 2))
                                  for k in range(out.shape[1])], 1)
            loss = loss + slope_weight * F.mse_loss(slopes, z[pair] - z[parent[pair]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return float(np.mean(losses[-100:]))


def swap_fidelity(net: ChemRM, ids: Tensor, smiles: list[str], gen: torch.Generator) -> dict[str, float]:
    """How well the network's gradient predicts a one-symbol swap, per head: the Spearman
    correlation, over molecules ``ids`` [N, L] with one random symbol each replaced by a random
    other symbol, between the first-order prediction grad . (e_new - e_old) at the one-hot
    sequence and RDKit's change of the property (swaps that decode to nothing left out)."""
    tok = molecules.tokenizer()
    inside = torch.cumprod((ids != tok.pad_id).long(), dim=1).bool()
    pos = torch.where(inside, torch.rand(ids.shape, generator=gen), torch.full(ids.shape, -1.0)).argmax(1)
    old = ids.gather(1, pos[:, None]).squeeze(1)
    new = (old - 2 + torch.randint(1, tok.size - 2, old.shape, generator=gen)) % (tok.size - 2) + 2  # never old
    bad = ids.scatter(1, pos[:, None], new[:, None])
    decoded = tok.decode_batch(bad)
    keep = torch.tensor([i for i, s in enumerate(decoded) if s], dtype=torch.long)
    change = labels([decoded[i] for i in keep.tolist()]) - labels([smiles[i] for i in keep.tolist()])
    p = F.one_hot(ids[keep], net.vocab_size).float().requires_grad_(True)
    out = {}
    for k, h in enumerate(HEADS):
        (g,) = torch.autograd.grad(net.predict(p)[:, k].sum(), p)
        rows = torch.arange(len(keep))
        predicted = g[rows, pos[keep], new[keep]] - g[rows, pos[keep], old[keep]]
        out[h] = round(spearman(predicted.detach(), change[:, k]), 4)
    return out


def _held_out_report(net: ChemRM, seed: int, limit: int | None) -> dict[str, dict]:
    """R² and Spearman per head on held-out molecules, as they are and corrupted (relabelled),
    and the gradient's fidelity to one-symbol swaps (:func:`swap_fidelity`)."""
    tok = molecules.tokenizer()
    ids, smiles = _split("held-out", limit)
    y = labels(smiles)
    bad = corrupt(ids, torch.Generator().manual_seed(10_000 + seed))
    bad_smiles = tok.decode_batch(bad)
    keep = [i for i, s in enumerate(bad_smiles) if s]
    return {
        "held_out": {"molecules": len(smiles), **evaluate(net, ids, y)},
        "held_out_corrupted": {"molecules": len(keep), **evaluate(net, bad[keep], labels([bad_smiles[i] for i in keep]))},
        "held_out_swap_gradient_spearman": swap_fidelity(net, ids, smiles, torch.Generator().manual_seed(20_000 + seed)),
    }


def train_chem_rm(
    out: str | Path = WEIGHTS_DIR, steps: int = 2400, seed: int = 0, *,
    near: int = 3, far: int = 2, batch_size: int = 128, lr: float = 3e-3, width: int = 64, slope_weight: float = 1.0,
    limit: int | None = None,
) -> dict:
    """Train the molecules reward model and write ``model.safetensors`` + ``card.json`` to ``out``.

    Args:
        out: the folder written (atomic writes); the shipped folder by default.
        steps: optimizer steps.
        seed: seeds corruption, initialization and batches; the same seed gives the same model.
        near: copies of each training molecule with 1-3 symbols replaced.
        far: copies of each training molecule with 5-30 % of symbols replaced.
        batch_size: sequences per step (half one-hot, half interpolated copies).
        lr: peak learning rate (AdamW, 50 warmup steps, cosine decay).
        width: channels of the network.
        limit: use only the first ``limit`` molecules of each split (quick checks).

    Returns:
        The card (also written to ``card.json``): R² and Spearman per head on held-out
        molecules, and the gradient's swap fidelity.
    """
    t0 = time.time()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    ids, y, parent = _dataset(gen, near, far, limit)
    tok = molecules.tokenizer()
    net = ChemRM(tok.size, tok.max_len, width)
    net.target_mean.copy_(y.mean(0))
    net.target_std.copy_(y.std(0))
    net.train()
    loss = _train_loop(net, ids, y, parent, steps, gen, batch_size, lr, slope_weight)
    net.eval()
    card = {
        "model": "molecules-rm", "heads": list(HEADS), "params": num_params(net), "width": width,
        "dilations": list(DILATIONS), "steps": steps, "seed": seed, "batch_size": batch_size, "lr": lr,
        "data": f"molecules world train split: {len(_split('train', limit)[1])} molecules plus {near} copies each with "
        f"1-3 symbols and {far} with 5-30 % of symbols replaced at random (relabelled by RDKit; empty decodes left out); "
        "half of each batch interpolates a copy with its molecule (inputs and labels, lam ~ U(0, 1))",
        "train_sequences": int(ids.shape[0]), "final_loss_mean_last_100": round(loss, 4),
        "heads_units": {"qed": "QED in [0, 1]", "sa": "(10 - SA) / 9", "logp": "Crippen logP clipped to [-10, 10]"},
        **_held_out_report(net, seed, limit),
        "train_seconds": round(time.time() - t0, 1), "torch": torch.__version__,
    }
    save_chem_rm(net, out, card)
    return card

