"""The table the flow papers argue about, in miniature: every black-box training method towards
the GenEval-style rule reward on the shapes-geneval flow model, read on held-out compositions.

What makes the comparison fair, and what it measures:

- Every run trains on the GenEval grammar's training prompts (`geneval-train`) with the
  `geneval-shapes` reward (the judge's partial credit) and is evaluated at the same reward-query
  counts (``GRID``: the first step at or past each point) on one fixed set: every held-out
  composition (`geneval-held-out`, 26 prompts) times ``PER_PROMPT`` seeds, sampled with the
  Euler ODE at ``EVAL_STEPS`` steps and guidance 2 (NFT, trained CFG-free, is also read at
  guidance 1, its own sampler). The reward is the judge, so the independent reading is the
  held-out compositions, with diversity and the KL to the base model beside them.
- Reported per run: GenEval overall accuracy (mean over the six tasks), per task, partial
  credit, clutter (the share of images with more objects than the prompt asks: GenEval's
  single- and two-object rules accept any number of extra objects, so a policy that fills
  the canvas would pass them), diversity (mean pairwise distance within a prompt's samples), the KL of the
  sampler's paths to the base model at the last point (64 samples), wall time and queries.
- Queries to a target overall accuracy are interpolated between evaluations
  (:func:`rewardiff.report.stats.crossing`); across seeds the median and each seed.
- Runs are resumable at every evaluation (progress JSON beside a checkpoint of the run).

Methods that backpropagate through the reward (draft-k, alignprop, refl) need a differentiable
reward; the rule reward is not one. They train on ``geneval-shapes-rm``, a CNN trained on
judge-labelled images that reads counts, colours and positions (its card:
``src/rewardiff/worlds/weights/shapes-geneval-rm/card.json``), with batches of 16 single
samples (no groups); their queries are its calls, and the judge reads their evaluations as it
reads everyone's.

    python benchmarks/geneval_methods.py --seeds 0,1,2                 # resumable
    python benchmarks/geneval_methods.py --seeds 0,1,2 --summary-only
    # a longer budget (the grid goes on every 1,600 queries), in a folder of its own
    python benchmarks/geneval_methods.py --seeds 0 --methods refl --budget 16000 --out benchmarks/results/geneval_long
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PER_PROMPT = 8  # held-out seeds per composition: 26 x 8 = 208 images an evaluation
EVAL_STEPS = 15  # the card's sampler; training chains are 10 steps (Flow-GRPO's denoising reduction)
GRID = [0, 160, 320, 480, 640, 960, 1280, 1600]
BUDGET = 1600
TARGETS = (0.05, 0.10)  # gains in held-out overall accuracy over the base model
COMMON = dict(model="shapes-geneval", reward="geneval-shapes", prompts="geneval-train", eval_prompts="geneval-held-out",
              batch_size=16, group_size=8, lora_rank=8, lora_alpha=16.0, num_inference_steps=10, guidance_scale=2.0,
              eval_samples=26 * PER_PROMPT, eval_every=0, checkpoint_every=0, lr=3e-4)
_GRPO = dict(method="grpo", eta=0.7, global_std=True, ppo_clip=1e-4, adv_clip=5.0, kl_weight=0.04, timestep_fraction=0.99,
             ppo_minibatches=2)
METHODS = {
    "grpo": _GRPO,
    "grpo-fast": {**_GRPO, "sde_window": 2, "sde_window_range": 5, "timestep_fraction": 1.0},
    "mixgrpo": {**_GRPO, "sde_window": 4, "sde_window_mode": "sliding", "sde_window_every": 25, "timestep_fraction": 1.0},
    "nft": dict(method="nft", eta=0.0, guidance_scale=1.0, nft_beta=1.0, nft_decay_rate=0.001, nft_decay_max=0.5, kl_weight=1e-4,
                timestep_fraction=0.99, ppo_minibatches=2),
    "ddpo": dict(method="ddpo", eta=0.7, ppo_clip=1e-4, adv_clip=5.0, ppo_minibatches=2, stat_min_count=16),
    "vard": dict(method="vard", eta=0.7, kl_weight=1e-3, vard_warmup=128),
}
# the methods that backpropagate through the reward climb its learned, differentiable stand-in
# (geneval-shapes-rm: a CNN trained on judge-labelled images); the judge still reads every evaluation
_RM = dict(reward="geneval-shapes-rm", group_size=1)
METHODS.update({
    "draft-k": dict(method="draft-k", k=5, **_RM),  # the K the shapes benchmark found best (the demo's)
    "alignprop": dict(method="alignprop", truncation="uniform", **_RM),
    "refl": dict(method="refl", **_RM),
})


def set_budget(budget: int) -> None:
    """Runs of ``budget`` reward queries, evaluated on ``GRID`` and, past its end, every 1,600."""
    global BUDGET, GRID
    base = [g for g in GRID if g <= 1600]
    BUDGET, GRID = budget, [g for g in base if g < budget] + list(range(3200, budget, 1600)) + [budget]


def _config(name: str, seed: int):
    from rewardiff.finetune.config import FinetuneConfig

    return FinetuneConfig(**{**COMMON, **METHODS[name], "seed": seed})


def evaluate(run, guidance: float, kl: bool = False) -> tuple[dict, np.ndarray]:
    """The held-out set: GenEval's summary, diversity (and the KL to the base when ``kl``); and
    each image's verdict [N] (1 correct)."""
    import torch

    from rewardiff.finetune.diagnostics import kl_to_base
    from rewardiff.report import diversity_by_prompt
    from rewardiff.worlds.shapes.judge import detect, geneval_judge
    from rewardiff.geneval import summarize

    model = run.model
    wrapped, model.net = model.net, run.acc.unwrap_model(model.net)
    try:
        model.net.eval()
        with torch.no_grad():
            x = model.generate(run.eval_prompts, run.eval_seeds, num_inference_steps=EVAL_STEPS, guidance_scale=guidance)
        v = geneval_judge(x, run.eval_prompts)
        s = summarize(v["specs"], v["correct"], v["partial"])
        asked = [sum(item.count for item in spec.include) for spec in v["specs"]]
        clutter = float(np.mean([len(d) > a for d, a in zip(detect(x), asked)]))
        means = {"overall": s["overall"], "partial": s["partial"], **{f"task_{k}": t["accuracy"] for k, t in s["tasks"].items()},
                 "diversity": diversity_by_prompt(x, run.eval_prompts), "clutter": clutter}
        if kl:
            means["kl_to_base"] = float(kl_to_base(model, run.eval_prompts[:64], run.eval_seeds[:64], EVAL_STEPS, guidance).mean())
    finally:
        model.net = wrapped
    return means, np.asarray(v["correct"], dtype=np.float32)


def _paths(root: Path, name: str, seed: int) -> tuple[Path, Path]:
    return root / f"{name}-seed{seed}", root / "progress" / f"{name}-seed{seed}.json"


def run_one(name: str, seed: int, root: Path) -> dict:
    """Train to the budget, evaluating at the grid's query counts; resumable at every evaluation."""
    from rewardiff.finetune.trainer import Run
    from rewardiff.io import atomic_write_text, truncate_jsonl

    out, prog_path = _paths(root, name, seed)
    prog = json.loads(prog_path.read_text()) if prog_path.is_file() else None
    if prog is not None and prog["queries"] >= BUDGET:
        return prog
    cfg = _config(name, seed)
    cfg.steps = 10**6  # the loop below stops it
    run = Run(cfg, out, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    step = run.resume()
    if step == 0:
        truncate_jsonl(out / "metrics.jsonl", 0)
        prog = None
    guidances = [2.0] + ([1.0] if cfg.guidance_scale == 1.0 else [])
    if prog is None:
        points = {g: evaluate(run, g)[0] for g in guidances}
        prog = {"method": name, "seed": seed, "config": METHODS[name], "budget": BUDGET, "step": 0, "queries": 0, "seconds": 0.0,
                "points": [{"step": 0, "queries": 0, "seconds": 0.0, **_flat(points)}]}
    else:  # keep the evaluations up to the checkpoint
        prog["points"] = [p for p in prog["points"] if p["step"] <= step]
        last = prog["points"][-1]
        prog.update(step=last["step"], queries=last["queries"], seconds=last["seconds"])
    prog_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(prog_path, json.dumps(prog, indent=1))
    next_grid = next(g for g in GRID + [math.inf] if g > prog["queries"])
    with (out / "metrics.jsonl").open("a") as log:
        while prog["queries"] < BUDGET:
            row = run.train_step(step)
            step += 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            prog["queries"] += row["reward_queries"]
            prog["seconds"] += row["seconds"]
            if prog["queries"] < min(next_grid, BUDGET):
                continue
            next_grid = next(g for g in GRID + [math.inf] if g > prog["queries"])
            final = prog["queries"] >= BUDGET
            points = {g: evaluate(run, g, kl=final)[0] for g in guidances}
            prog["points"].append({"step": step, "queries": prog["queries"], "seconds": prog["seconds"], **_flat(points)})
            prog["step"] = step
            atomic_write_text(prog_path, json.dumps(prog, indent=1))
            run.save_checkpoint(step)
            p = prog["points"][-1]
            print(f"{name} seed {seed}: step {step} queries {prog['queries']} overall {p['overall']:.3f} "
                  f"partial {p['partial']:.3f} diversity {p['diversity']:.3f} ({time.strftime('%H:%M:%S')})", flush=True)
    return prog


def _flat(points: dict[float, dict]) -> dict:
    """Guidance 2's figures under their names; guidance 1's (NFT's own sampler) with a ``cfg1_`` prefix."""
    out = dict(points[2.0])
    for k, v in points.get(1.0, {}).items():
        out[f"cfg1_{k}"] = v
    return out


def _progs(root: Path, name: str, seeds: list[int]) -> list[dict]:
    out = []
    for s in seeds:
        _, p = _paths(root, name, s)
        if p.is_file():
            prog = json.loads(p.read_text())
            if prog["queries"] >= BUDGET:
                out.append(prog)
    return out


def summarize_runs(root: Path, seeds: list[int]) -> str:
    lines = [f"Held-out GenEval overall accuracy (26 held-out compositions x {PER_PROMPT} seeds = {26 * PER_PROMPT} images, Euler ODE "
             f"{EVAL_STEPS} steps, guidance 2), at the query grid {GRID}; every run goes to {BUDGET} queries. The standard error of "
             f"one evaluation's overall accuracy is about {_typical_se(root, seeds):.3f} (unpaired; single_object and two_object have "
             f"one held-out prompt each, 8 images).", ""]
    lines += ["| method | seeds | overall: base -> final (per seed) | partial | clutter | diversity base -> final | KL to base | queries to +0.05 (median; per seed) | queries to +0.10 | minutes |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name in METHODS:
        progs = _progs(root, name, seeds)
        if progs:
            lines.append(_row(name, progs, ""))
            if "cfg1_overall" in progs[0]["points"][0]:
                lines.append(_row(f"{name}, read at guidance 1 (its own sampler)", progs, "cfg1_"))
    lines += ["", "Per task, final (mean over seeds):", "", "| method | " + " | ".join(_TASKS) + " |", "|---|" + "---|" * len(_TASKS)]
    for name in METHODS:
        progs = _progs(root, name, seeds)
        if progs:
            lines.append(f"| {name} | " + " | ".join(f"{statistics.mean(p['points'][-1].get('task_' + t, math.nan) for p in progs):.3f}"
                                                     for t in _TASKS) + " |")
    return "\n".join(lines)


def _row(label: str, progs: list[dict], pre: str) -> str:
    """One line of the table from the runs of a method, reading the figures named ``pre`` + key."""
    from rewardiff.report.stats import crossing

    first, last = [p["points"][0] for p in progs], [p["points"][-1] for p in progs]
    cells = []
    for gain in TARGETS:
        qs = []
        for p in progs:
            c = crossing([q["queries"] for q in p["points"]], [q[pre + "overall"] - p["points"][0][pre + "overall"] for q in p["points"]], gain)
            qs.append(math.inf if c is None else c)
        med = statistics.median(qs)
        cells.append(f"{'never' if math.isinf(med) else f'{med:.0f}'}; " + ", ".join("never" if math.isinf(q) else f"{q:.0f}" for q in qs))
    m = lambda pts, k: statistics.mean(x.get(pre + k, math.nan) for x in pts)  # noqa: E731
    per = ", ".join(f"{x[pre + 'overall']:.3f}" for x in last)
    return (f"| {label} | {len(progs)} | {m(first, 'overall'):.3f} -> {m(last, 'overall'):.3f} ({per}) | "
            f"{m(first, 'partial'):.3f} -> {m(last, 'partial'):.3f} | {m(first, 'clutter'):.3f} -> {m(last, 'clutter'):.3f} | "
            f"{m(first, 'diversity'):.3f} -> {m(last, 'diversity'):.3f} | {m(last, 'kl_to_base'):.1f} | {cells[0]} | {cells[1]} | "
            f"{statistics.mean(p['seconds'] for p in progs) / 60:.1f} |")


_TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
_HELD_OUT_PROMPTS = {"single_object": 1, "two_object": 1, "counting": 6, "colors": 2, "position": 4, "color_attr": 12}


def overall_se(point: dict) -> float:
    """The standard error of one evaluation's overall accuracy, sqrt(sum_t p_t (1 - p_t) / n_t) / 6
    over the tasks' images (unpaired: the change between two evaluations on the same seeds is
    usually less noisy than this says)."""
    v = sum(point[f"task_{t}"] * (1 - point[f"task_{t}"]) / (n * PER_PROMPT) for t, n in _HELD_OUT_PROMPTS.items())
    return math.sqrt(v) / len(_HELD_OUT_PROMPTS)


def _typical_se(root: Path, seeds: list[int]) -> float:
    ses = [overall_se(p["points"][0]) for name in METHODS for p in _progs(root, name, seeds)]
    return statistics.mean(ses) if ses else math.nan


def plot(root: Path, seeds: list[int]) -> Path:
    from rewardiff.report import plot_curves

    curves = {}
    for name in METHODS:
        for s in seeds:
            _, p = _paths(root, name, s)
            if p.is_file():
                prog = json.loads(p.read_text())
                curves[f"{name} s{s}"] = [(max(q["queries"], 1), q["overall"]) for q in prog["points"]]
    return plot_curves(curves, root / "overall_vs_queries.png", "reward queries (samples scored)",
                       "held-out GenEval overall accuracy", "shapes-geneval, towards geneval-shapes",
                       group=lambda label: label.rsplit(" s", 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "geneval_methods")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true")
    ap.add_argument("--budget", type=int, default=BUDGET, help="reward queries a run; past 1,600 the grid goes on every 1,600")
    args = ap.parse_args()
    if args.budget < 160:
        ap.error(f"--budget {args.budget}: at least 160 reward queries (one point of the grid)")
    set_budget(args.budget)
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    if not args.summary_only:
        for seed in seeds:  # seed by seed: a stopped benchmark has every method at the first seeds
            for name in args.methods.split(","):
                run_one(name, seed, args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    table = summarize_runs(args.out, seeds)
    (args.out / "table.md").write_text(table + "\n")
    plot(args.out, seeds)
    print(table)


if __name__ == "__main__":
    main()
