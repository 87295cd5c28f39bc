"""The shapes world's two base models at equal NFE: the DDIM model (``shapes``) and the
rectified flow (``shapes-flow``), plain samplers, read by the world's judge.

    python benchmarks/flow_vs_ddim.py --steps 5,10,15,25 --per-prompt 32 --out benchmarks/results/flow_vs_ddim

For each number of sampler steps T (NFE 2T with classifier-free guidance 2), both models
sample the held-out prompts with the same seeds; the judge's counting accuracy is reported
with its standard error over images, and the paired difference (same prompt and seed) with
its standard error. Writes ``table.json`` and ``table.md``.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", default="5,10,15,25")
    ap.add_argument("--per-prompt", type=int, default=32)
    ap.add_argument("--flow", default="shapes-flow", help="the flow model: a name or a model folder")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "flow_vs_ddim")
    a = ap.parse_args()
    import torch

    from rewardiff.models.registry import base_model
    from rewardiff.prompts import EVAL_SEED
    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json
    from rewardiff.worlds.shapes import data as shapes
    from rewardiff.worlds.shapes.judge import judge

    torch.set_num_threads(2)
    models = {"shapes (DDIM)": base_model("shapes"), "shapes-flow (Euler ODE)": base_model(a.flow)}
    prompts = [p for p in shapes.held_out_prompts() for _ in range(a.per_prompt)]
    seeds = [EVAL_SEED + i for i in range(len(prompts))]
    rows = []
    for T in [int(x) for x in a.steps.split(",")]:
        right = {}
        for name, m in models.items():
            with torch.no_grad():
                images = m.generate(prompts, seeds, num_inference_steps=T, guidance_scale=2.0)
            right[name] = judge(images, prompts)["count"].astype(float)
        (na, ra), (nb, rb) = right.items()
        n = len(prompts)
        d = rb - ra
        row = {"steps": T, "nfe": 2 * T, "images": n}
        for name, r in right.items():
            row[name] = {"count_accuracy": float(r.mean()), "se": float(r.std(ddof=1) / math.sqrt(n))}
        row["flow_minus_ddim"] = {"mean": float(d.mean()), "se": float(d.std(ddof=1) / math.sqrt(n))}
        rows.append(row)
        print(f"T={T:3d}: {na} {ra.mean():.3f}, {nb} {rb.mean():.3f}, difference {d.mean():+.3f} +- {row['flow_minus_ddim']['se']:.3f}",
              flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    write_json(a.out / "table.json", {"command": " ".join(["python benchmarks/flow_vs_ddim.py", *sys.argv[1:]]), **stamp(), "rows": rows})
    lines = ["| steps (NFE) | shapes, DDIM | shapes-flow, Euler ODE | flow - DDIM (paired) |", "|---|---|---|---|"]
    for r in rows:
        x, y, d = r["shapes (DDIM)"], r["shapes-flow (Euler ODE)"], r["flow_minus_ddim"]
        lines.append(f"| {r['steps']} ({r['nfe']}) | {x['count_accuracy']:.3f} ± {x['se']:.3f} | {y['count_accuracy']:.3f} ± {y['se']:.3f} | "
                     f"{d['mean']:+.3f} ± {d['se']:.3f} |")
    (a.out / "table.md").write_text("\n".join(lines) + f"\n\n{len(prompts)} images a cell (held-out prompts x {a.per_prompt} seeds), guidance 2\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
