"""Peak memory of one reward-backprop step against K, with and without checkpointing.

Each configuration runs in a fresh process: the baseline is the resident memory after
imports, model construction and one sampling pass without gradient; the figure is the peak
resident memory of one training step (sample with gradient through the last K steps,
reward, backward) minus that baseline. malloc is told to return freed blocks to the system
at once, so that the resident size tracks live memory.

    python benchmarks/memory.py --steps 50 --batch 4 --out benchmarks/results/memory.json
    python benchmarks/memory.py --steps 50 --batch 4 --lora 4 --ks 1,2,50 --checkpoint-only --out benchmarks/results/memory_lora.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
from pathlib import Path


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def measure(k: int, steps: int, batch: int, checkpoint: bool, lora: int = 0) -> dict:
    import torch

    from rewardiff.models.base import DiffusionModel
    from rewardiff.worlds.shapes.denoiser import ShapesDenoiser, ShapesModelConfig
    from rewardiff.rewards import get_reward
    from rewardiff.rollout import last_k

    torch.manual_seed(0)
    net = ShapesDenoiser(ShapesModelConfig(block_out_channels=(16, 32, 64)))
    model = DiffusionModel(net, net.process(), net.encode, (3, 32, 32))
    if lora:  # the trainer's default: LoRA of this rank, every other weight frozen
        from rewardiff.finetune.weights import attach_lora

        attach_lora(model, lora, float(lora))
    reward = get_reward("brightness")
    prompts, seeds = ["two red circles"] * batch, list(range(batch))
    with torch.no_grad():
        model.sample(prompts, seeds, steps, guidance_scale=2.0)
    base = _rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    traj = model.sample(prompts, seeds, steps, guidance_scale=2.0, grad_steps=last_k(steps, k), checkpoint=checkpoint)
    (-reward(traj.x0, prompts).mean()).backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"k": k, "steps": steps, "batch": batch, "checkpoint": checkpoint, "lora_rank": lora, "baseline_mb": base,
            "peak_mb": peak, "above_baseline_mb": peak - max(base, peak_before)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--ks", default="1,5,10,25,50")
    ap.add_argument("--lora", type=int, default=0, help="LoRA rank (0: every weight trains, as before)")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/memory.json"))
    ap.add_argument("--checkpoint-only", action="store_true", help="only the checkpointed runs")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # "k,checkpoint": run one, print JSON
    a = ap.parse_args()
    if a.one:
        k, ck = a.one.split(",")
        print(json.dumps(measure(int(k), a.steps, a.batch, ck == "1", a.lora)))
        return
    rows = []
    # Large blocks through mmap and no trim threshold: freed memory goes back to the system,
    # so the resident size follows live memory instead of what malloc keeps cached.
    env = {"OMP_NUM_THREADS": "2", **os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    for ck in (1,) if a.checkpoint_only else (1, 0):
        for k in [int(x) for x in a.ks.split(",")]:
            res = subprocess.run([sys.executable, __file__, "--steps", str(a.steps), "--batch", str(a.batch), "--lora", str(a.lora),
                                  "--one", f"{k},{ck}"],
                                 capture_output=True, text=True, env=env, check=True)
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"K={k:3d} checkpoint={bool(ck)!s:5s} above baseline {rows[-1]['above_baseline_mb']:8.1f} MB", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
