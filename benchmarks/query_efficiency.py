"""Reward queries to a target held-out reward, every training method on one query grid.

What makes the comparison fair, and what it measures:

- Every method is evaluated at the same reward-query counts (``GRID``: the first training step
  at or past each grid point; a step that passes several grid points is evaluated once), on the
  same fixed held-out set of ``eval_samples`` (prompt, seed) pairs, with the same sampler.
- Runs go on to their budget whatever they reach, so a noisy early crossing does not end them
  and a second, harder target is read from the same runs.
- Targets are gains over the base model on the same samples (the change is paired sample by
  sample): the base's reward on the 384-sample set is -0.675, while the 96 samples of the
  earlier benchmark put it at -0.760, so a target fixed on that estimate (-0.70) would be met by
  the base model itself.
- The query count at which a run first reaches a target is interpolated linearly between the
  two evaluations around it (:func:`rewardiff.report.stats.crossing`), with a 95 % bootstrap
  interval over the evaluation pairs; across seeds the table gives the median and each seed's
  value, and the ratio of two methods' medians comes with a bootstrap interval over seeds.
- Per-sample rewards and the judge's per-sample verdicts are kept (``samples/*.npz``), so
  every figure can be recomputed, and the standard error of each evaluation's change from the
  base model is reported beside the gain the target asks for.

    python benchmarks/query_efficiency.py --suite count --seeds 0,1,2,3,4        # resumable
    python benchmarks/query_efficiency.py --suite count --seeds 0,1,2,3,4 --summary-only
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
GRID = [0, 40, 80, 160, 240, 320, 480, 640, 960, 1280, 1600, 2400, 3200, 4000]

# the methods with their settings, as in the earlier benchmark; its 96 evaluation samples are overridden
from sample_efficiency import COMMON, METHODS  # noqa: E402  (a sibling script: run from benchmarks/ or by path)

SUITES = {
    # targets are gains over the base model's held-out reward on this evaluation set (-0.675 at 384 samples)
    "count": dict(reward="shapes-count", gains=(0.05, 0.10), methods=list(METHODS), eval_samples=384,
                  budget=1600, budgets={"ddpo": 4000}),
}
KL_SAMPLES = 96  # the KL to the base model is measured on the first ones of the evaluation set


def _config(suite: dict, name: str, seed: int):
    from rewardiff.finetune.config import FinetuneConfig

    return FinetuneConfig(**{**COMMON, **METHODS[name], "reward": suite["reward"], "seed": seed,
                             "eval_samples": suite["eval_samples"]})


def evaluate(run, kl: bool = False) -> tuple[dict, np.ndarray, np.ndarray]:
    """The held-out set, per sample: (means, and the KL to the base when ``kl``; rewards [N];
    judge count right [N]). The KL (two more passes) is measured at a run's last point only."""
    import torch

    from rewardiff.finetune.diagnostics import kl_to_base
    from rewardiff.report import diversity_by_prompt
    from rewardiff.worlds.shapes.judge import judge

    cfg, model = run.cfg, run.model
    wrapped, model.net = model.net, run.acc.unwrap_model(model.net)
    try:
        model.net.eval()
        with torch.no_grad():
            x = model.generate(run.eval_prompts, run.eval_seeds, num_inference_steps=cfg.num_inference_steps,
                               guidance_scale=cfg.guidance_scale)
            r = torch.cat([run.reward(x[i : i + 64], run.eval_prompts[i : i + 64]) for i in range(0, len(x), 64)]).float()
        verdict = judge(x, run.eval_prompts)
        means = {"eval_reward_mean": float(r.mean()), "eval_judge_count": float(np.mean(verdict["count"])),
                 "eval_diversity": diversity_by_prompt(x, run.eval_prompts)}
        if kl:
            means["eval_kl_to_base"] = float(kl_to_base(model, run.eval_prompts[:KL_SAMPLES], run.eval_seeds[:KL_SAMPLES],
                                                        cfg.num_inference_steps, cfg.guidance_scale).mean())
    finally:
        model.net = wrapped
    return means, r.numpy(), np.asarray(verdict["count"], dtype=np.float32)


def base_evaluation(run, folder: Path) -> tuple[dict, np.ndarray, np.ndarray]:
    """The base model's evaluation, the same for every method and seed (one model, one set):
    computed once and kept in ``base.npz``."""
    path = folder / "base.npz"
    if path.is_file():
        a = np.load(path)
        if len(a["reward"]) == len(run.eval_seeds):
            return json.loads(str(a["means"])), a["reward"], a["judge"]
    means, r, j = evaluate(run)
    folder.mkdir(parents=True, exist_ok=True)
    from rewardiff.io import atomic_write

    atomic_write(path, lambda p: np.savez_compressed(open(p, "wb"), reward=r, judge=j, means=json.dumps(means)))
    return means, r, j


def base_mean(folder: Path) -> float:
    """The base model's held-out reward on the evaluation set (``base.npz``)."""
    return float(np.load(folder / "base.npz")["reward"].mean())


def _paths(out_root: Path, suite_name: str, name: str, seed: int) -> tuple[Path, Path, Path]:
    d = out_root / suite_name
    return d / f"{name}-seed{seed}", d / "progress" / f"{name}-seed{seed}.json", d / "samples" / f"{name}-seed{seed}.npz"


def _load(prog_path: Path, npz_path: Path) -> tuple[dict | None, list, list]:
    if not prog_path.is_file():
        return None, [], []
    arrays = np.load(npz_path)
    return json.loads(prog_path.read_text()), list(arrays["reward"]), list(arrays["judge"])


def _save(prog: dict, rewards: list, judges: list, prog_path: Path, npz_path: Path) -> None:
    from rewardiff.io import atomic_write, atomic_write_text

    npz_path.parent.mkdir(parents=True, exist_ok=True)
    prog_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(npz_path, lambda p: np.savez_compressed(open(p, "wb"), reward=np.stack(rewards), judge=np.stack(judges),
                                                           queries=np.array([pt["queries"] for pt in prog["points"]])))
    atomic_write_text(prog_path, json.dumps(prog, indent=1))


def run_one(suite_name: str, name: str, seed: int, out_root: Path) -> dict:
    """Train to the budget, evaluating at the grid's query counts; resumable at every evaluation."""
    from rewardiff.finetune.trainer import Run
    from rewardiff.io import truncate_jsonl

    suite = SUITES[suite_name]
    out, prog_path, npz_path = _paths(out_root, suite_name, name, seed)
    budget = suite["budgets"].get(name, suite["budget"])
    prog, rewards, judges = _load(prog_path, npz_path)
    if prog is not None and prog["queries"] >= budget:
        return prog
    cfg = _config(suite, name, seed)
    cfg.steps = 10**6  # the loop below stops it
    run = Run(cfg, out, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    step = run.resume()
    if step == 0:
        truncate_jsonl(out / "metrics.jsonl", 0)
    if prog is not None:  # keep the evaluations up to the checkpoint (a later one was saved, its checkpoint not)
        keep = [i for i, pt in enumerate(prog["points"]) if pt["step"] <= step]
        prog["points"], rewards, judges = [prog["points"][i] for i in keep], [rewards[i] for i in keep], [judges[i] for i in keep]
        last = prog["points"][-1]
        prog.update(step=last["step"], queries=last["queries"], seconds=last["seconds"], nfe=last["nfe"])
    if prog is None:
        means, r, j = base_evaluation(run, out_root / suite_name)
        prog = {"method": name, "seed": seed, "reward": cfg.reward, "gains": list(suite["gains"]), "budget": budget,
                "eval_samples": cfg.eval_samples, "step": 0, "queries": 0, "seconds": 0.0, "nfe": 0,
                "points": [{"step": 0, "queries": 0, "seconds": 0.0, "nfe": 0, **means}]}
        rewards, judges = [r], [j]
        _save(prog, rewards, judges, prog_path, npz_path)
    return _train(run, prog, rewards, judges, step, budget, prog_path, npz_path, suite_name)


def _train(run, prog, rewards, judges, step, budget, prog_path, npz_path, suite_name) -> dict:
    out = run.out
    next_grid = next(g for g in GRID + [math.inf] if g > prog["queries"])
    with (out / "metrics.jsonl").open("a") as log:
        while prog["queries"] < budget:
            row = run.train_step(step)
            step += 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            prog["queries"] += row["reward_queries"]
            prog["seconds"] += row["seconds"]
            prog["nfe"] += row["nfe"]
            if prog["queries"] < min(next_grid, budget):
                continue
            next_grid = next(g for g in GRID + [math.inf] if g > prog["queries"])
            means, r, j = evaluate(run, kl=prog["queries"] >= budget)
            prog["points"].append({"step": step, "queries": prog["queries"], "seconds": prog["seconds"], "nfe": prog["nfe"], **means})
            prog["step"] = step
            rewards.append(r)
            judges.append(j)
            _save(prog, rewards, judges, prog_path, npz_path)  # first: a resume drops evaluations past its checkpoint
            run.save_checkpoint(step)
            print(f"{suite_name} {prog['method']} seed {prog['seed']}: step {step} queries {prog['queries']} "
                  f"reward {means['eval_reward_mean']:.3f} judge {means['eval_judge_count']:.3f} ({time.strftime('%H:%M:%S')})",
                  flush=True)
    return prog


# ----------------------------------------------------------------------------- the table


def crossings(suite_name: str, out_root: Path, name: str, seeds: list[int], gain: float, rng) -> list[dict]:
    """Per finished seed of ``name``: where the mean change from the base (paired over the
    evaluation set's samples) first reaches ``gain``, interpolated, and its bootstrap interval."""
    from rewardiff.report.stats import crossing, crossing_interval

    rows = []
    for s in seeds:
        _, prog_path, npz_path = _paths(out_root, suite_name, name, s)
        prog, _, _ = _load(prog_path, npz_path)
        if prog is None or prog["queries"] < prog["budget"]:
            continue
        values = np.load(npz_path)["reward"]
        change = values - values[:1]  # point 0 is the base model on the same samples
        x = [p["queries"] for p in prog["points"]]
        c = crossing(x, change.mean(1), gain)
        lo, hi, share = crossing_interval(x, change, gain, rng)
        rows.append({"seed": s, "queries": math.inf if c is None else c, "low": lo, "high": hi, "share": share, "prog": prog})
    return rows


def _q(v: float) -> str:
    return "never" if math.isinf(v) else f"{v:.0f}"


def summarize(suite_name: str, out_root: Path, seeds: list[int]) -> str:
    from rewardiff.report.stats import paired_se, ratio_of_medians

    suite = SUITES[suite_name]
    rng = np.random.default_rng(0)
    lines = [f"Held-out {suite['reward']}, {suite['eval_samples']} samples (held-out prompts, fixed seeds), "
             f"evaluated at the query grid {GRID}; runs go to their budget ({suite['budget']}, DDPO {suite['budgets'].get('ddpo')})."]
    medians: dict[tuple[str, float], list[float]] = {}
    base = base_mean(out_root / suite_name)
    for target in suite["gains"]:
        lines += ["", f"**Gain {target:.2f}** over the base's {base:.3f} (reward queries until the mean paired change from the "
                  "base reaches it, interpolated; 95 % bootstrap interval over the evaluation set per seed)", "", "| method | seeds | median | per seed [interval] |", "|---|---|---|---|"]
        for name in suite["methods"]:
            rows = crossings(suite_name, out_root, name, seeds, target, rng)
            if not rows:
                continue
            qs = [r["queries"] for r in rows]
            medians[(name, target)] = qs
            per = ", ".join(f"{_q(r['queries'])} [{_q(r['low'])}, {_q(r['high'])}]" for r in rows)
            lines.append(f"| {name} | {len(rows)} | {_q(statistics.median(qs))} | {per} |")
        a, b = medians.get(("ddpo", target)), medians.get(("draft-lv", target))
        if a and b:
            est, (lo, hi) = ratio_of_medians(a, b, rng)
            lines += ["", f"DDPO / DRaFT-LV, median queries: {est:.1f}x (95 % interval over seeds {lo:.1f}x to {hi:.1f}x)."]
    lines += ["", "| method | final held-out reward | judge count | diversity | KL to base | SE of the change from base, last point |",
              "|---|---|---|---|---|---|"]
    for name in suite["methods"]:
        last, ses = [], []
        for s in seeds:
            _, prog_path, npz_path = _paths(out_root, suite_name, name, s)
            prog, _, _ = _load(prog_path, npz_path)
            if prog is not None and prog["queries"] >= prog["budget"]:
                last.append(prog["points"][-1])
                ses.append(float(paired_se(np.load(npz_path)["reward"])[-1]))
        if last:
            m = lambda k: statistics.mean(p.get(k, math.nan) for p in last)  # noqa: E731
            lines.append(f"| {name} | {m('eval_reward_mean'):.3f} | {m('eval_judge_count'):.3f} | {m('eval_diversity'):.3f} | "
                         f"{m('eval_kl_to_base'):.1f} | {statistics.mean(ses):.4f} |")
    return "\n".join(lines)


def plot(suite_name: str, out_root: Path, seeds: list[int]) -> list[Path]:
    from rewardiff.report import plot_curves

    suite = SUITES[suite_name]
    curves, judge = {}, {}
    for name in suite["methods"]:
        for s in seeds:
            _, prog_path, npz_path = _paths(out_root, suite_name, name, s)
            prog, _, _ = _load(prog_path, npz_path)
            if prog is None:
                continue
            curves[f"{name} s{s}"] = [(max(p["queries"], 1), p["eval_reward_mean"]) for p in prog["points"]]
            judge[f"{name} s{s}"] = [(max(p["queries"], 1), p["eval_judge_count"]) for p in prog["points"]]
    d = out_root / suite_name
    first = base_mean(d) + suite["gains"][0]
    method = lambda label: label.rsplit(" s", 1)[0]  # noqa: E731  (one colour per method, a line style per seed)
    return [plot_curves(curves, d / "reward_vs_queries.png", "reward queries (samples scored)", f"held-out {suite['reward']}",
                        f"target {first:.3f}, the base + {suite['gains'][0]} (dashed)", group=method, hline=first),
            plot_curves(judge, d / "judge_vs_queries.png", "reward queries", "judge: count correct", "read by the judge",
                        group=method)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=list(SUITES), default="count")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "query_efficiency")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.methods.split(",") if args.methods else SUITES[args.suite]["methods"]
    if not args.summary_only:
        for seed in seeds:  # seed by seed, so a stopped benchmark has every method at the first seeds
            for name in names:
                run_one(args.suite, name, seed, args.out)
    table = summarize(args.suite, args.out, seeds)
    (args.out / args.suite).mkdir(parents=True, exist_ok=True)
    (args.out / args.suite / "table.md").write_text(table + "\n")
    plot(args.suite, args.out, seeds)
    print(table)


if __name__ == "__main__":
    main()
