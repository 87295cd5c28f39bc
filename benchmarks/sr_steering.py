"""Inference-time steering against super-resolution hallucinations at equal NFE.

The black-box reward is the input-only judge (``sr-hallucination-lr``: the output degraded as
the inputs were and compared with the input), which needs no ground truth, so the judge that
counts against the truth stays independent. On the 256 held-out scenes at 15 DDIM steps,
guidance 1 (one evaluation a call): base (15 NFE a sample), best-of-2 (30) and SVDD-PM with
M = 2 (29), each with three run seeds (a run seed draws fresh initial noises for every method
alike, and seeds the method's own draws); the judge reads every output.

    python benchmarks/sr_steering.py
    # the same on a fine-tuned model (a run's final/ or checkpoint folder)
    python benchmarks/sr_steering.py --checkpoint runs/sr-draftk-1000/final --out sr_steering_draftk_seed0.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
STEPS = 15
CONFIGS = {"base": ("base", None), "best-of-n": ("best-of-n", 2), "svdd-pm": ("svdd-pm", 2)}


def main() -> None:
    from rewardiff import plugins
    from rewardiff.errors import UserError
    from rewardiff.guidance.sample import guided_sample, make_method
    from rewardiff.provenance import stamp
    from rewardiff.rewards.registry import get_reward
    from rewardiff.sampling import load_model
    from rewardiff.worlds.superres.judge import judge, psnr
    from rewardiff import conditions

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=None, help="a fine-tuned shapes-sr model (a run's final/ folder)")
    ap.add_argument("--out", default="sr_steering.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        model = load_model("shapes-sr", args.checkpoint)
    except UserError as e:
        ap.error(str(e))
    prompts = plugins.load(plugins.PROMPT_SETS["sr-held-out"])()
    truth = torch.stack([conditions.ground_truth(p) for p in prompts])
    reward = get_reward("sr-hallucination-lr")
    rows: dict[str, list[dict]] = {}
    for name, (method, width) in CONFIGS.items():
        for seed in (0, 1, 2):
            seeds = [100_000 * seed + i for i in range(len(prompts))]
            meth = make_method(method, reward if method != "base" else None, width=width, seed=seed)
            t0 = time.time()
            x, info = guided_sample(model, meth, prompts, seeds, STEPS, guidance_scale=1.0, eta=1.0 if method == "svdd-pm" else 0.0)
            j = judge(x, prompts)
            row = {"seed": seed, "nfe_per_sample": info["nfe_per_sample"], "seconds": time.time() - t0,
                   "hallucination_rate": float(np.mean(j["count"] > 0)), "count": float(np.mean(j["count"])),
                   "reward": float(reward(x, prompts).mean()), "psnr": float(psnr(x, truth).mean())}
            rows.setdefault(name, []).append(row)
            print(name, row, flush=True)
    table = {}
    for name, rs in rows.items():
        table[name] = {k: statistics.mean(r[k] for r in rs) for k in ("nfe_per_sample", "hallucination_rate", "count", "reward", "psnr")}
        table[name]["rate_sd"] = statistics.stdev(r["hallucination_rate"] for r in rs)
        table[name]["rate_per_seed"] = [r["hallucination_rate"] for r in rs]
    command = "python benchmarks/sr_steering.py" + (f" --checkpoint {args.checkpoint} --out {args.out}" if args.checkpoint else "")
    out = {"configs": table, "runs": rows, "model": str(args.checkpoint or "shapes-sr"), "command": command, **stamp()}
    (HERE / "results" / args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
