"""Reference points of the molecules world's yardsticks (:mod:`rewardiff.worlds.molecules.metrics`).

(a) The training split against the held-out one: ``--draws`` random draws of ``--samples``
training molecules (as many as a model's samples), each measured against the 448 held-out
molecules, for the spread FCD has at that count. (b) Each shipped model's ``--samples``
samples (the cards' seeds; the masked model at the card's 64 steps) against the same
held-out molecules. Writes ``yardsticks.json`` and ``yardsticks.md`` in ``--out``.

    OMP_NUM_THREADS=1 python benchmarks/molecules_yardsticks.py --out benchmarks/results/molecules
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

COLUMNS = [  # (key, header, format)
    ("fcd", "FCD", "{:.2f}"), ("fcd_n", "n", "{:.0f}"), ("aromatic_fraction", "arom. frac.", "{:.1%}"),
    ("qed_mean", "QED", "{:.3f}"), ("sa_score_mean", "SA", "{:.2f}"), ("logp_mean", "logP", "{:.2f}"),
    ("rings_mean", "rings", "{:.2f}"), ("aromatic_rings_mean", "arom. rings", "{:.2f}"),
    ("heavy_atoms_mean", "heavy atoms", "{:.1f}"), ("internal_diversity", "IntDiv", "{:.3f}"),
    ("validity", "valid", "{:.1%}"), ("uniqueness", "unique", "{:.1%}"), ("novelty", "novel", "{:.1%}"),
]


def train_draws(n: int, draws: int) -> list[dict]:
    """measures() of ``draws`` random subsets of ``n`` training molecules against the held-out split."""
    import numpy as np

    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.metrics import measures

    _, train = molecules.data("train")
    return [measures([train[i] for i in np.random.default_rng(seed).choice(len(train), n, replace=False)])
            for seed in range(draws)]


def model_samples(name: str, n: int, steps: int | None) -> tuple[dict, float]:
    """(measures() of ``n`` samples of the shipped model ``name`` from the cards' seeds, seconds to sample)."""
    from rewardiff.models.registry import base_model
    from rewardiff.worlds.molecules.metrics import measures
    from rewardiff.worlds.molecules.pretrain_masked import CARD_SEED

    model = base_model(name)
    kw = {} if steps is None else {"num_inference_steps": steps}
    t0 = time.perf_counter()
    ids = model.generate([""] * n, [CARD_SEED + i for i in range(n)], batch_size=128, **kw)
    seconds = time.perf_counter() - t0
    return measures(model.texts(ids)), seconds


def spread(rows: list[dict]) -> dict:
    """Mean, min and max of each measure over ``rows``."""
    return {k: {"mean": sum(r[k] for r in rows) / len(rows), "min": min(r[k] for r in rows), "max": max(r[k] for r in rows)}
            for k in rows[0]}


def table(doc: dict) -> str:
    head = "| set | " + " | ".join(h for _, h, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 1)]
    ref = doc["held_out"]
    lines.append(f"| held-out molecules (the reference) | – | {ref['samples']:.0f} | " + " | ".join(
        f.format(ref[k]) if k in ref else "–" for k, _, f in COLUMNS[2:]) + " |")
    s = doc["train_vs_held_out"]["spread"]
    lines.append(f"| training molecules, {doc['draws']} draws (mean [min, max]) | " + " | ".join(
        f.format(s[k]["mean"]) + (f" [{f.format(s[k]['min'])}, {f.format(s[k]['max'])}]" if k == "fcd" else "")
        for k, _, f in COLUMNS) + " |")
    for name, row in doc["models"].items():
        lines.append(f"| {name} | " + " | ".join(f.format(row[k]) for k, _, f in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/molecules")
    ap.add_argument("--samples", type=int, default=512)
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--md-only", action="store_true", help="rewrite yardsticks.md from yardsticks.json")
    args = ap.parse_args()
    out = Path(args.out)
    if args.md_only:
        return write_md(json.loads((out / "yardsticks.json").read_text()), out)

    import torch

    from rewardiff.worlds.molecules.metrics import FINGERPRINT, reference_summary  # noqa: I001

    torch.set_num_threads(1)
    draws = train_draws(args.samples, args.draws)
    models, seconds = {}, {}
    for label, name, steps in (("masked (molecules), 64 steps", "molecules", 64), ("autoregressive (molecules-ar)", "molecules-ar", None)):
        models[label], seconds[label] = model_samples(name, args.samples, steps)
    doc = {
        "command": f"OMP_NUM_THREADS=1 python benchmarks/molecules_yardsticks.py --out {args.out} --samples {args.samples} --draws {args.draws}",
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
        "date": datetime.date.today().isoformat(), "samples": args.samples, "draws": args.draws,
        "reference": "the 448 held-out molecules", "fingerprint": FINGERPRINT,
        "held_out": reference_summary("held-out"),
        "train_vs_held_out": {"draws": draws, "spread": spread(draws)},
        "models": models, "sampling_seconds": seconds,
    }
    (out / "yardsticks.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_md(doc, out)


def write_md(doc: dict, out: Path) -> None:
    md = [
        "# Molecules yardsticks against the held-out molecules", "",
        f"`{doc['command']}` ({doc['date']}, {doc['machine']}).", "",
        f"FCD: Fréchet ChemNet Distance (the `fcd` package's ChemNet) of n valid molecules to the 448 held-out ones; "
        f"it is biased upward at small n, so every row uses n = {doc['samples']} samples. IntDiv: mean pairwise 1 - Tanimoto, "
        f"{doc['fingerprint']}. SA: the raw SA score (1 easy ... 10 hard). arom. frac.: share of molecules with an aromatic ring. "
        "Novelty is against the training split (0 for training molecules by construction).", "",
        table(doc), "",
        "Targets for a retrained base model: FCD near the training molecules' own, aromatic fraction within 10 points "
        "of the held-out molecules', QED mean within 0.03.", "",
    ]
    (out / "yardsticks.md").write_text("\n".join(md))
    print("\n".join(md))


if __name__ == "__main__":
    main()
