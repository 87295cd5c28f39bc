"""Why the shipped masked molecules model is off the data: cheap experiments with its weights.

1. sampler steps 64 / 128 / 256 / 512 (at 512 steps a linear schedule unmasks under one of
   the 56 tokens a step on average: close to sampling the model's joint one token at a time);
2. temperature and top-p on the denoiser's clean-token logits;
3. the SELFIES of aromatic rings: kekulized, so a benzene ring is three single and three
   double bonds in alternation closed by one ring token; what the samples' rings look like;
4. fit: NELBO of held-out molecules with and without an aromatic ring, train against held-out;
5. seconds per training step of candidate configs (``--time-steps`` steps each).

Writes ``diagnosis.json`` in ``--out``; ``diagnosis.md`` beside it is written by hand from it.

    OMP_NUM_THREADS=1 python benchmarks/molecules_diagnosis.py --out benchmarks/results/molecules
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

KEYS = ("fcd", "fcd_n", "aromatic_fraction", "qed_mean", "rings_mean", "aromatic_rings_mean", "heavy_atoms_mean",
        "internal_diversity", "uniqueness", "novelty")


class Tempered(nn.Module):
    """The denoiser with its clean-token logits divided by ``temperature`` and cut to the
    top-p nucleus (the mask logit excluded first, as the process does)."""

    def __init__(self, net: nn.Module, temperature: float = 1.0, top_p: float = 1.0):
        super().__init__()
        self.inner, self.temperature, self.top_p = net, temperature, top_p

    def forward(self, x_t, t, cond=None):
        logits = self.inner(x_t, t, cond).float()
        logits[..., self.inner.config.mask_id] = -torch.inf
        logits = logits / self.temperature
        if self.top_p < 1.0:
            p, idx = logits.softmax(-1).sort(-1, descending=True)
            drop = p.cumsum(-1) - p > self.top_p  # outside the smallest set holding top_p
            logits = logits.scatter(-1, idx, torch.where(drop, torch.full_like(p, -torch.inf), logits.gather(-1, idx)))
        return logits


def sample_row(model, n: int, steps: int, **temper) -> dict:
    from rewardiff.worlds.molecules.metrics import measures

    inner = model.net
    if temper:
        model.net = Tempered(inner, **temper)
    t0 = time.perf_counter()
    ids = model.generate([""] * n, [10_000 + i for i in range(n)], batch_size=128, num_inference_steps=steps)
    seconds = time.perf_counter() - t0
    model.net = inner
    smiles = model.texts(ids)
    m = measures(smiles)
    return {"steps": steps, **temper, "seconds": seconds, **{k: m[k] for k in KEYS}, **ring_kinds(smiles)}


def train_fcd(n: int, draws: int = 5) -> list[float]:
    """FCD to the held-out molecules of ``draws`` random sets of ``n`` training molecules (the floor at this n)."""
    import numpy as np

    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.metrics import measures

    _, train = molecules.data("train")
    return [measures([train[i] for i in np.random.default_rng(s).choice(len(train), n, replace=False)])["fcd"] for s in range(draws)]


def ring_kinds(smiles: list[str]) -> dict:
    """Per molecule: six-membered rings, aromatic ones, and non-aromatic six-rings holding
    one or two C=C double bonds (a benzene one bond order short: cyclohexene / -diene)."""
    from rdkit import Chem

    from rewardiff.worlds.molecules import data as molecules

    six = arom6 = near = 0
    mols = [m for m in (molecules.parse(s) for s in smiles) if m is not None]
    for m in mols:
        for ring in m.GetRingInfo().BondRings():
            if len(ring) != 6:
                continue
            bonds = [m.GetBondWithIdx(i) for i in ring]
            six += 1
            if all(b.GetIsAromatic() for b in bonds):
                arom6 += 1
            elif 1 <= sum(b.GetBondType() == Chem.BondType.DOUBLE for b in bonds) <= 2:
                near += 1
    n = max(len(mols), 1)
    return {"six_rings": six / n, "aromatic_six_rings": arom6 / n, "near_aromatic_six_rings": near / n}


@torch.no_grad()
def fit(net, ar_dir) -> dict:
    """NELBO per token (4 passes) on held-out molecules with / without an aromatic ring and on the
    training split; the autoregressive model's next-token loss on the same held-out subsets."""
    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.autoregressive import ARTransformer
    from rewardiff.worlds.molecules.metrics import properties
    from rewardiff.worlds.molecules.pretrain_ar import next_token_loss
    from rewardiff.worlds.molecules.pretrain_masked import masked_diffusion_loss

    out = {}
    ar = ARTransformer.load(ar_dir)
    for split in ("train", "held-out"):
        ids, smiles = molecules.data(split)
        ids, smiles = ids[:1024], smiles[:1024]
        arom = torch.tensor(properties(smiles)["aromatic_rings"] > 0)
        for name, sel in (("all", torch.ones_like(arom)), ("aromatic", arom), ("not_aromatic", ~arom)):
            x0 = ids[sel]
            process, gen, nelbo = net.process(), torch.Generator().manual_seed(0), 0.0
            for _ in range(4):
                u = (torch.rand(1, generator=gen, dtype=torch.float64) + torch.arange(len(x0), dtype=torch.float64) / len(x0)) % 1.0
                t = (u * 1000).long().clamp(max=999)
                x_t = process.add_noise(x0, gen, t)
                nelbo += float(masked_diffusion_loss(net(x_t, t, None), x0, x_t, t, process)[0]) / 4
            bos = torch.full((len(x0), 1), ar.config.bos_id, dtype=torch.long)
            ar_loss = float(next_token_loss(ar(torch.cat([bos, x0[:, :-1]], 1))[0], x0, 0))
            out[f"{split}/{name}"] = {"molecules": int(sel.sum()), "masked_nelbo": nelbo, "ar_loss": ar_loss}
    return out


def selfies_of_rings() -> dict:
    """How the data writes aromatic rings: the share of training molecules whose SELFIES has a
    ring token, tokens per molecule, and the share of bond symbols that are double ("=")."""
    import selfies as sf

    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.metrics import properties

    _, smiles = molecules.data("train")
    arom = properties(smiles)["aromatic_rings"] > 0
    toks = [list(sf.split_selfies(sf.encoder(s))) for s in smiles]
    benzene = list(sf.split_selfies(sf.encoder("c1ccccc1")))
    return {"benzene_selfies": benzene, "aromatic_share": float(arom.mean()),
            "tokens_per_molecule": sum(map(len, toks)) / len(toks),
            "ring_tokens_per_molecule": sum(sum(t.startswith("[Ring") for t in x) for x in toks) / len(toks),
            "double_bond_atom_tokens_per_molecule": sum(sum(t.startswith("[=") for t in x) for x in toks) / len(toks)}


def step_time(configs: list[dict], steps: int) -> list[dict]:
    """Seconds per optimizer step of the masked pretraining step (one thread, EMA update left
    out), timed over ``steps`` steps after 3 untimed ones, at each config."""
    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.masked import MaskedDenoiser
    from rewardiff.worlds.molecules.pretrain_masked import MoleculesPretrainConfig, _model_config, _train_step

    data, rows = molecules.data("train")[0], []
    for c in configs:
        cfg = MoleculesPretrainConfig(**c)
        torch.manual_seed(0)
        net = MaskedDenoiser(_model_config(cfg)).train()
        opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        for step in range(3):
            _train_step(cfg, step, net, data, opt)
        t0 = time.perf_counter()
        for step in range(3, 3 + steps):
            _train_step(cfg, step, net, data, opt)
        rows.append({**c, "parameters": sum(p.numel() for p in net.parameters()), "seconds_per_step": (time.perf_counter() - t0) / steps})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/molecules")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--time-steps", type=int, default=20)
    ap.add_argument("--parts", default="steps,temper,rings,fit,time")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from rewardiff.models.registry import base_model
    from rewardiff.worlds import WEIGHTS

    parts, doc = args.parts.split(","), {}
    path = Path(args.out) / "diagnosis.json"
    if path.is_file():
        doc = json.loads(path.read_text())
    model = base_model("molecules")
    if "steps" in parts:
        doc["steps"] = [sample_row(model, args.samples, s) for s in (64, 128, 256, 512)]
        doc["train_draws_fcd"] = train_fcd(args.samples)
    if "temper" in parts:
        doc["temper"] = [sample_row(model, args.samples, 64, **k) for k in
                         ({"temperature": 0.8}, {"temperature": 0.6}, {"top_p": 0.9}, {"temperature": 0.8, "top_p": 0.9})]
    if "rings" in parts:
        from rewardiff.worlds.molecules import data as molecules

        doc["rings"] = {"selfies": selfies_of_rings(), "held_out": ring_kinds(molecules.data("held-out")[1]),
                        "ar_samples": ring_kinds((WEIGHTS / "molecules-ar" / "samples.txt").read_text().split())}
    if "fit" in parts:
        doc["fit"] = fit(model.net, WEIGHTS / "molecules-ar")
    if "time" in parts:
        doc["step_time"] = step_time([{"dim": 128, "layers": 3, "batch_size": 64}, {"dim": 128, "layers": 3, "batch_size": 128},
                                      {"dim": 192, "layers": 4, "heads": 6, "batch_size": 128},
                                      {"dim": 256, "layers": 6, "heads": 8, "batch_size": 128}], args.time_steps)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
