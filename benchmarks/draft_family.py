"""Reward and judge accuracy against step and wall time for the DRaFT family on shapes-count.

Every method starts from the shipped base model with the same seeds, batch, learning rate
and LoRA rank; only the gradient window differs. Held-out evaluations (fixed prompts and
seeds) read both the reward and the judge, so reward hacking shows as a rising reward with
a flat or falling judge accuracy. Finished runs are kept and skipped on a rerun.

    python benchmarks/draft_family.py --steps 80 --seeds 0,1,2 --out benchmarks/results/draft_family
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

VARIANTS = {
    "draft": {"method": "draft"},
    "draft-k1": {"method": "draft-k", "k": 1},
    "draft-k5": {"method": "draft-k", "k": 5},
    "draft-lv": {"method": "draft-lv", "lv_n": 2},
    "alignprop": {"method": "alignprop", "truncation": "uniform"},
    "refl": {"method": "refl"},
}


def run_one(name: str, seed: int, args: argparse.Namespace) -> dict:
    from rewardiff.finetune.presets import demo_config
    from rewardiff.finetune.trainer import finetune, is_run

    out = args.out / f"{name}-seed{seed}"
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    cfg = demo_config(args.steps)
    for key, val in {**VARIANTS[name], "seed": seed, "eval_every": args.eval_every, "eval_samples": args.eval_samples,
                     "checkpoint_every": args.eval_every, "kl_weight": args.kl_weight, "model": args.model,
                     "reward": args.reward}.items():
        setattr(cfg, key, val)
    return finetune(cfg, out, resume=is_run(Path(out)), progress=False)  # a finished or stopped run is continued


def curves(run_dir: Path) -> dict[str, list[tuple[float, float]]]:
    from rewardiff.report import read_metrics

    rows = read_metrics(run_dir)
    before = json.loads((run_dir / "eval_before.json").read_text())
    after = json.loads((run_dir / "eval_after.json").read_text())
    wall, t = [], 0.0
    for r in rows:
        t += r["seconds"]
        wall.append((t, r["reward_mean"]))
    evals = [(0, before)] + [(r["step"], {k: v for k, v in r.items() if k.startswith("eval_")}) for r in rows if "eval_judge_count" in r]
    evals.append((rows[-1]["step"], after))
    return {
        "reward_vs_step": [(r["step"], r["reward_mean"]) for r in rows],
        "reward_vs_time": wall,
        "judge_vs_step": [(s, e["eval_judge_count"]) for s, e in evals],
        "eval_reward_vs_step": [(s, e["eval_reward_mean"]) for s, e in evals],
        "seconds_per_step": [(0, statistics.median(r["seconds"] for r in rows))],
    }


def _mean_curve(cs: list[list[tuple[float, float]]]) -> list[tuple[float, float]]:
    n = min(len(c) for c in cs)
    return [(statistics.mean(c[i][0] for c in cs), statistics.mean(c[i][1] for c in cs)) for i in range(n)]


def _smooth(c: list[tuple[float, float]], w: int = 10) -> list[tuple[float, float]]:
    return [(x, statistics.mean(v for _, v in c[max(0, i - w + 1) : i + 1])) for i, (x, _) in enumerate(c)]


def summarize(args: argparse.Namespace, names: list[str], seeds: list[int]) -> str:
    from rewardiff.report import plot_curves

    table = ["| variant | s/step (median) | held-out reward before -> after | judge count before -> after | judge count+color after | diversity after |",
             "|---|---|---|---|---|---|"]
    plots: dict[str, dict[str, list]] = {k: {} for k in ("reward_vs_step", "reward_vs_time", "judge_vs_step", "eval_reward_vs_step")}
    for name in names:
        dirs = [args.out / f"{name}-seed{s}" for s in seeds]
        cs = [curves(d) for d in dirs]
        for key in plots:
            mean = _mean_curve([c[key] for c in cs])
            plots[key][name] = _smooth(mean) if key in ("reward_vs_step", "reward_vs_time") else mean
        b = [json.loads((d / "eval_before.json").read_text()) for d in dirs]
        a = [json.loads((d / "eval_after.json").read_text()) for d in dirs]

        def ms(rows, key):
            vals = [r[key] for r in rows]
            return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0:.3f}"

        sps = statistics.median(c["seconds_per_step"][0][1] for c in cs)
        table.append(f"| {name} | {sps:.2f} | {ms(b, 'eval_reward_mean')} -> {ms(a, 'eval_reward_mean')} | "
                     f"{ms(b, 'eval_judge_count')} -> {ms(a, 'eval_judge_count')} | {ms(a, 'eval_judge_both')} | {ms(a, 'eval_diversity')} |")
    labels = {"reward_vs_step": ("step", "training reward (shapes-count)"), "reward_vs_time": ("seconds of training", "training reward"),
              "judge_vs_step": ("step", "judge counting accuracy, held-out"), "eval_reward_vs_step": ("step", "held-out reward")}
    for key, series in plots.items():
        plot_curves(series, args.out / f"{key}.png", *labels[key], title=f"{key.replace('_', ' ')} (mean of {len(seeds)} seeds)")
    text = "\n".join(table)
    (args.out / "table.md").write_text(text + "\n")
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=80)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--eval-samples", type=int, default=48)
    ap.add_argument("--kl-weight", type=float, default=0.0)
    ap.add_argument("--model", default="shapes")
    ap.add_argument("--reward", default="shapes-count")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/draft_family"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.variants.split(",")
    for seed in seeds:  # seed by seed: a stopped benchmark has whole seeds of every variant
        for name in names:
            res = run_one(name, seed, args)
            print(f"{name} seed {seed}: judge count {res['before']['eval_judge_count']:.3f} -> {res['after']['eval_judge_count']:.3f}", flush=True)
    print(summarize(args, names, seeds))


if __name__ == "__main__":
    main()
