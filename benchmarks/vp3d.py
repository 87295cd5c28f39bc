"""Text-to-3D on held-out prompts of the 3D shapes world: SDS alone, SDS + visual prompt, VP3D.

Held-out prompts (two or three objects whose kinds never appear together in training) and, as
a check that distillation makes an object at all, a few single-object training prompts
(reported apart: ``single``).

Three arms, the same prior (the view-conditioned ``shapes-3d``), steps, cameras and seeds:

- ``sds``: score distillation alone;
- ``sds+vp``: plus the visual prompt (the prior's own sample of the text from azimuth 0,
  elevation 25) through the visual-consistency term (pixel MSE of the render from that view),
  after a warm-up of SDS alone (VP3D's schedule);
- ``vp3d``: plus the text-alignment reward ``shapes3d-count`` after the same warm-up.

The classical judge (never trained, used by no arm) reads the final scene from 16 views no run
optimised at specially (azimuths 22.5 + 45 k at elevations 20 and 35; the visual prompt's view
is not among them): prompt accuracy (the share of views read right), multi-view consistency
(the share of views agreeing with the majority reading) and the majority reading's correctness.
Every (arm, prompt, seed) is one JSON in ``benchmarks/results/vp3d/`` (resumable).

    python benchmarks/vp3d.py [--prompts 6] [--single 3] [--seeds 0,1] [--arms sds,sds+vp,vp3d] [--steps 200] [--summary-only]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "vp3d"
ARMS = ("sds", "sds+vp", "vp3d")
# calibrated on one training prompt ("a red sphere and a green cube", a pilot of 200 steps): each
# term's gradient norm on the scene comparable to SDS's when it joins (SDS 4-9, consistency 4, reward 2)
WEIGHTS = {"consistency": 50.0, "text_reward": 1.0}
EVAL_VIEWS = [(22.5 + 45.0 * k, el) for el in (20.0, 35.0) for k in range(8)]


def arm_config(arm: str, prompt: str, seed: int, steps: int, overrides: dict):
    from rewardiff.distill.config import DistillConfig

    cfg = dict(model="shapes-3d", prompt=prompt, seed=seed, steps=steps, warmup=steps // 5, checkpoint_every=steps)
    if arm in ("sds+vp", "vp3d"):
        cfg.update(visual_prompt="generate", visual_prompt_view=(0.0, 25.0), consistency="mse", consistency_weight=WEIGHTS["consistency"])
    if arm == "vp3d":
        cfg.update(text_reward="shapes3d-count", text_reward_weight=WEIGHTS["text_reward"])
    cfg.update(overrides)
    return DistillConfig(**cfg)


def evaluate(scene, prompt: str, cfg) -> dict:
    from rewardiff.render import Camera, render_views
    from rewardiff.worlds.shapes3d import data
    from rewardiff.worlds.shapes3d.judge import multiview

    cams = [Camera(az, el, distance=cfg.distance, fov=cfg.fov) for az, el in EVAL_VIEWS]
    with torch.no_grad():
        views = render_views(scene, cams, data.SIZE, background=data.ground)
    return multiview(views, prompt), views


def prior_forward_seconds(model, views: int, repeats: int = 20) -> float:
    """Median seconds of the prior's guided forward on one step's batch (2 x views at 32 px)."""
    from rewardiff.worlds.shapes3d.prior import with_view

    x = torch.randn(2 * views, 3, 32, 32)
    t = torch.full((2 * views,), 500, dtype=torch.long)
    prompts = [with_view("a red sphere", 30.0 * i, 20.0) for i in range(2 * views)]
    secs = []
    with torch.no_grad():
        cond = model.encode(prompts)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model.net(x, t, cond)
            secs.append(time.perf_counter() - t0)
    return statistics.median(secs)


def run_one(arm: str, k: int, prompt: str, seed: int, steps: int, overrides: dict, model) -> dict:
    from rewardiff.distill.run import distill
    from rewardiff.render import Gaussians
    from safetensors.torch import load_file

    path = OUT / f"{arm}-p{k}-seed{seed}.json"
    if path.is_file():
        return json.loads(path.read_text())
    cfg = arm_config(arm, prompt, seed, steps, overrides)
    run_dir = OUT / "runs" / f"{arm}-p{k}-seed{seed}"
    t0 = time.time()
    summary = distill(cfg, run_dir, resume=(run_dir / "config.json").is_file(), progress=False, model=model)
    scene = Gaussians.from_state_dict(load_file(str(run_dir / "scene.safetensors")))
    figures, views = evaluate(scene, prompt, cfg)
    from rewardiff.report.grid import save_grid

    save_grid(views[:8], OUT / "turntables" / f"{arm}-p{k}-seed{seed}.png", nrow=8, scale=3)
    import shutil

    shutil.rmtree(run_dir / "checkpoint")  # the run is finished: keep the scene, its metrics and summary
    for name in ("report.html", "turntable.gif", "visual_prompt.safetensors", *(p.name for p in run_dir.glob("*.png"))):
        (run_dir / name).unlink(missing_ok=True)
    row = {"arm": arm, "prompt": prompt, "prompt_index": k, "seed": seed, "steps": steps, **figures,
           "seconds": time.time() - t0, "seconds_per_step": summary["seconds_per_step"],
           "consistency_last": summary.get("consistency_last"), "text_reward_last": summary.get("text_reward_last"),
           "config": asdict(cfg)}
    from rewardiff.report.strict import write_json

    write_json(path, row)
    return row


def kind_of(prompt: str) -> str:
    """``held_out`` (two or three objects, kinds never trained together) or ``single`` (one object, a training prompt)."""
    return "single" if " and " not in prompt else "held_out"


def summarize(rows: list[dict], forward: float | None) -> dict:
    out: dict = {"eval_views": EVAL_VIEWS, "prior_forward_seconds": forward, "held_out": {}, "single": {}}
    for kind in ("held_out", "single"):
        for arm in ARMS:
            rs = [r for r in rows if r["arm"] == arm and kind_of(r["prompt"]) == kind]
            if not rs:
                continue
            by_seed: dict[int, list[dict]] = {}
            for r in rs:
                by_seed.setdefault(r["seed"], []).append(r)
            entry = {"runs": len(rs), "seeds": sorted(by_seed)}
            for key in ("accuracy", "consistency", "majority_correct"):
                per_seed = [float(np.mean([r[key] for r in v])) for v in by_seed.values()]
                entry[key] = float(np.mean(per_seed))
                entry[f"{key}_per_seed"] = per_seed
                entry[f"{key}_sd"] = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else None
            entry["seconds_per_step"] = statistics.median(r["seconds_per_step"] for r in rs)
            out[kind][arm] = entry
        # paired differences against SDS alone, per (prompt, seed)
        base = {(r["prompt_index"], r["seed"]): r for r in rows if r["arm"] == "sds" and kind_of(r["prompt"]) == kind}
        for arm in ("sds+vp", "vp3d"):
            pairs = [(r, base[(r["prompt_index"], r["seed"])]) for r in rows
                     if r["arm"] == arm and (r["prompt_index"], r["seed"]) in base and kind_of(r["prompt"]) == kind]
            if len(pairs) >= 2 and arm in out[kind]:
                for key in ("accuracy", "consistency"):
                    d = np.array([a[key] - b[key] for a, b in pairs])
                    out[kind][arm][f"{key}_minus_sds"] = float(d.mean())
                    out[kind][arm][f"{key}_minus_sds_se"] = float(d.std(ddof=1) / np.sqrt(len(d)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=6, help="held-out prompts (every k-th of the list)")
    ap.add_argument("--single", type=int, default=3, help="single-object training prompts too (a check that SDS makes one object)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--arms", default=",".join(ARMS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--set", action="append", default=[], help="a distill field for every arm: key=value")
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json
    from rewardiff.sampling import load_model, parse_options
    from rewardiff.worlds.shapes3d import data

    OUT.mkdir(parents=True, exist_ok=True)
    held = data.held_out_prompts()
    stride = max(1, len(held) // args.prompts)
    prompts = held[::stride][: args.prompts]
    singles = [p for p in data.train_prompts() if " and " not in p]
    prompts += singles[:: max(1, len(singles) // max(1, args.single))][: args.single]
    seeds = [int(s) for s in args.seeds.split(",")]
    arms = args.arms.split(",")
    overrides = parse_options(args.set, "--set")
    model = load_model("shapes-3d")
    forward = None
    if not args.summary_only:
        forward = prior_forward_seconds(model, 4)
        for seed in seeds:
            for k, p in enumerate(prompts):
                for arm in arms:
                    row = run_one(arm, k, p, seed, args.steps, overrides, model)
                    print(f"{arm:7s} seed {seed} p{k} {p!r}: accuracy {row['accuracy']:.2f} consistency {row['consistency']:.2f} "
                          f"majority {row['majority_correct']:.0f} ({row['seconds']:.0f} s)", flush=True)
    old = OUT.parent / "vp3d.json"
    if forward is None and old.is_file():
        forward = json.loads(old.read_text()).get("prior_forward_seconds")
    rows = [json.loads(f.read_text()) for f in sorted(OUT.glob("*-seed*.json"))]
    summary = {"prompts": prompts, **summarize(rows, forward), **stamp()}
    write_json(OUT.parent / "vp3d.json", summary)
    for kind in ("held_out", "single"):
        for arm, e in summary[kind].items():
            print(kind, arm, {k: e[k] for k in e if not k.endswith("per_seed")})


if __name__ == "__main__":
    main()
