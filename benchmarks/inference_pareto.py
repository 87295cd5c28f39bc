"""Reward against denoiser evaluations per sample for every inference-time method.

Each point samples ``--samples`` requests (prompts cycling through all 48 shapes prompts, seeds
fixed by the run seed) with one method at one budget, a multiple of the base sampler's cost
(15 DDIM steps x 2 for classifier-free guidance = 30 NFE per sample): the method's width is
set by ``budget_plan`` and the NFE actually spent is what the rollout counted. Every point is
also read by the judge, which no reward uses, so reward hacking shows as a rising reward with
a flat or falling counting accuracy. Points are appended to ``points.jsonl`` as they finish
and skipped on a rerun; ``--plot-only`` redraws the figures and the table.

    python benchmarks/inference_pareto.py --out benchmarks/results/inference
    python benchmarks/inference_pareto.py --out benchmarks/results/inference --compose runs/demo/final
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

STEPS, SCALE = 15, 2.0
BASE_COST = STEPS * 2


def plan_points(args: argparse.Namespace) -> list[dict]:
    """Every (reward, seed, method, multiple, options) point, the cheap and important first."""
    pts = []
    for seed in args.seeds:
        for reward in args.rewards:
            pts.append(dict(reward=reward, seed=seed, method="base", mult=1, eta=0.0))
            pts.append(dict(reward=reward, seed=seed, method="base", mult=1, eta=1.0))
            for eta in args.bon_eta:
                for mult in args.bon:
                    pts.append(dict(reward=reward, seed=seed, method="best-of-n", mult=mult, eta=eta))
            for method in args.methods:
                for mult in args.mults:
                    pts.append(dict(reward=reward, seed=seed, method=method, mult=mult, eta=None))
            for method in args.authors:  # the method as its paper set it, at whatever NFE that costs (mult 0: no plan)
                pts.append(dict(reward=reward, seed=seed, method=method, mult=0, eta=None))
            if reward in args.gradient_rewards:
                for s in args.gradient_scales:
                    pts.append(dict(reward=reward, seed=seed, method="gradient", mult=1, eta=0.0, options={"scale": s}))
            if args.value_dir is not None and (args.value_dir / reward / "value.safetensors").is_file():
                pts.append(dict(reward=reward, seed=seed, method="svdd-mc", mult=1, eta=None))
    return pts


def compose_points(args: argparse.Namespace) -> list[dict]:
    """Base and fine-tuned model, each plain and with each steering method at ``--compose-mult``."""
    from rewardiff.worlds.shapes import data as shapes

    held = shapes.held_out_prompts()
    pts = []
    for seed in args.seeds:
        for ck in (None, str(args.compose)):
            common = dict(reward="shapes-count", seed=seed, checkpoint=ck, prompts=held, samples=args.compose_samples)
            pts.append(dict(common, method="base", mult=1, eta=0.0))
            for method in args.compose_methods:
                pts.append(dict(common, method=method, mult=args.compose_mult, eta=None))
    return pts


def key(p: dict) -> str:
    k = {k: p.get(k) for k in ("reward", "seed", "method", "mult", "eta", "options", "checkpoint")}
    if "prompts" in p:  # the composition points sample other prompts
        k["prompts"] = p["prompts"]
    return json.dumps(k, sort_keys=True)


def run_point(p: dict, args: argparse.Namespace, cache: dict) -> dict:
    import torch

    from rewardiff.guidance import budget_plan, guided_sample, make_method
    from rewardiff.rewards.value import load_value
    from rewardiff.rewards import get_reward
    from rewardiff.sampling import load_model
    from rewardiff.worlds.shapes import data as shapes
    from rewardiff.worlds.shapes.judge import judge

    ck = p.get("checkpoint")
    if ("model", ck) not in cache:
        cache[("model", ck)] = load_model("shapes", Path(ck) if ck else None)
    model = cache[("model", ck)]
    reward = get_reward(p["reward"])
    value = load_value(args.value_dir / p["reward"]) if p["method"] == "svdd-mc" else None
    method = make_method(p["method"], reward, seed=p["seed"], value=value, **p.get("options", {}))
    if p["mult"]:  # mult 0: the method's own (paper) settings, unplanned
        budget_plan(method, p["mult"] * BASE_COST, STEPS, SCALE)
    prompts_all = p.get("prompts") or [s.prompt for s in shapes.all_specs()]
    n = p.get("samples") or args.samples
    prompts = [prompts_all[i % len(prompts_all)] for i in range(n)]
    seeds = [20_000 + 1000 * p["seed"] + i for i in range(n)]
    t0 = time.perf_counter()
    x, info = guided_sample(model, method, prompts, seeds, STEPS, guidance_scale=SCALE, eta=p["eta"])
    wall = time.perf_counter() - t0
    with torch.no_grad():
        r = torch.cat([reward(x[i : i + 64], prompts[i : i + 64]) for i in range(0, n, 64)])
    verdict = judge(x, prompts)
    from rewardiff.report import diversity_by_prompt
    return {
        **{k: v for k, v in info.items() if k not in ("options", "eta")}, **p, "eta_used": info["eta"],
        "method_options": info["options"], "samples": n, "reward_mean": float(r.mean()), "reward_sem": float(r.std() / n**0.5),
        "judge_count": float(verdict["count"].mean()), "judge_color": float(verdict["color"].mean()),
        "judge_both": float(verdict["both"].mean()), "diversity": float(diversity_by_prompt(x, prompts)), "wall_s": wall,
    }


def label(p: dict) -> str:
    name = p["method"]
    if name == "base":
        return f"base (eta={p['eta']:g})"
    if name == "best-of-n" and p.get("eta"):
        return f"best-of-n (eta={p['eta']:g})"
    if name == "gradient":
        return f"gradient (s={p['options']['scale']:g})"
    setting = (p.get("method_options") or {}).get("setting")
    if setting:  # DSearch: the authors' o = M = w = 5, or the planner's reduction to fit the budget
        return f"{name} ({setting})"
    return name


def aggregate(rows: list[dict], metric: str) -> dict:
    """{reward: {label: [(nfe, mean over seeds, std over seeds, n seeds)]}}."""
    groups: dict = {}
    for r in rows:
        if r.get("checkpoint"):
            continue
        groups.setdefault(r["reward"], {}).setdefault(label(r), {}).setdefault(r["mult"], []).append(r)
    out: dict = {}
    for reward, by_label in groups.items():
        for lab, by_mult in by_label.items():
            pts = []
            for mult, rs in sorted(by_mult.items()):
                vals = [x[metric] for x in rs]
                nfe = statistics.mean(x["nfe_per_sample"] for x in rs)
                pts.append((nfe, statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0, len(vals)))
            out.setdefault(reward, {})[lab] = pts
    return out


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = sorted({label(r) for r in rows if not r.get("checkpoint")})
    palette = plt.get_cmap("tab20").colors
    color = {lab: palette[i % len(palette)] for i, lab in enumerate(labels)}
    for metric, ylabel in (("reward_mean", "reward (mean over samples)"), ("judge_count", "judge counting accuracy")):
        agg = aggregate(rows, metric)
        rewards = sorted(agg)
        fig, axes = plt.subplots(1, len(rewards), figsize=(5.2 * len(rewards), 4.6), squeeze=False)
        handles = {}
        for ax, reward in zip(axes[0], rewards):
            for lab, pts in sorted(agg[reward].items()):
                xs, ys, es = [q[0] for q in pts], [q[1] for q in pts], [q[2] for q in pts]
                style = "o-" if len(pts) > 1 else "s"
                h = ax.errorbar(xs, ys, yerr=es, fmt=style, capsize=3, label=lab, color=color[lab],
                                lw=2.2 if lab.startswith("best-of-n") else 1.2)
                handles[lab] = h
            ax.set_xscale("log", base=2)
            ax.set_xlabel("denoiser evaluations per sample (NFE)")
            ax.set_ylabel(ylabel)
            ax.set_title(reward)
            ax.grid(alpha=0.3)
        fig.legend([handles[k] for k in labels if k in handles], [k for k in labels if k in handles], loc="lower center",
                   ncol=min(6, len(handles)), fontsize=8, frameon=False)
        fig.tight_layout(rect=(0, 0.12, 1, 1))
        fig.savefig(out / f"pareto_{metric}.png", dpi=110)
        plt.close(fig)


def table(rows: list[dict]) -> str:
    agg_r, agg_j = aggregate(rows, "reward_mean"), aggregate(rows, "judge_count")
    lines = ["| reward | method | NFE/sample | reward (mean ± sd over seeds) | judge count | seeds |", "|---|---|---|---|---|---|"]
    for reward in sorted(agg_r):
        for lab in sorted(agg_r[reward], key=lambda s: (s != "best-of-n", s)):
            for (nfe, m, sd, k), (_, jm, jsd, _) in zip(agg_r[reward][lab], agg_j[reward][lab]):
                lines.append(f"| {reward} | {lab} | {nfe:.0f} | {m:.3f} ± {sd:.3f} | {jm:.3f} ± {jsd:.3f} | {k} |")
    return "\n".join(lines)


def compose_table(rows: list[dict]) -> str:
    """Held-out counting accuracy: base vs fine-tuned, plain vs steered (mean ± sd over seeds)."""
    groups: dict = {}
    for r in rows:
        if r.get("checkpoint") is None and "prompts" not in r:
            continue
        model = "fine-tuned (" + Path(r["checkpoint"]).parent.name + ")" if r.get("checkpoint") else "base model"
        groups.setdefault((model, label(r), r["mult"]), []).append(r)
    lines = ["| model | sampler | NFE/sample | judge count (held-out) | judge count+color | reward | diversity | seeds |", "|---|---|---|---|---|---|---|---|"]
    for (model, lab, mult), rs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "base model", kv[0][2], kv[0][1])):
        def ms(metric):
            vals = [x[metric] for x in rs]
            return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals) if len(vals) > 1 else 0.0:.3f}"
        nfe = statistics.mean(x["nfe_per_sample"] for x in rs)
        lines.append(f"| {model} | {lab} | {nfe:.0f} | {ms('judge_count')} | {ms('judge_both')} | {ms('reward_mean')} | {ms('diversity')} | {len(rs)} |")
    return "\n".join(lines)


def claim_table(rows: list[dict]) -> str:
    """Each method at budget B against best-of-N at 4B (same reward, mean over seeds).

    "matches" when the method's mean is at least best-of-N's minus the larger of the two
    standard errors over samples (pooled over seeds)."""
    by: dict = {}
    for r in rows:
        if r.get("checkpoint") or "prompts" in r or r["method"] in ("base", "gradient"):
            continue
        by.setdefault((r["reward"], label(r), r["mult"]), []).append(r)
    lines = ["| reward | method | B (NFE/sample) | reward at B | best-of-N at 4B (the better eta) | difference | verdict |",
             "|---|---|---|---|---|---|---|"]
    for (reward, method, mult), rs in sorted(by.items()):
        bons = [by[k] for k in by if k[0] == reward and k[1].startswith("best-of-n") and k[2] == 4 * mult]
        if method.startswith("best-of-n") or not bons:
            continue
        bon = max(bons, key=lambda b: statistics.mean(x["reward_mean"] for x in b))
        m, b = statistics.mean(x["reward_mean"] for x in rs), statistics.mean(x["reward_mean"] for x in bon)
        se = max(statistics.mean(x["reward_sem"] for x in rs), statistics.mean(x["reward_sem"] for x in bon)) / len(rs) ** 0.5
        nfe = statistics.mean(x["nfe_per_sample"] for x in rs)
        verdict = "matches or beats" if m >= b - se else "short"
        lines.append(f"| {reward} | {method} | {nfe:.0f} | {m:.3f} | {b:.3f} | {m - b:+.3f} (se {se:.3f}) | {verdict} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/inference"))
    ap.add_argument("--rewards", type=lambda s: s.split(","), default=["shapes-count", "jpeg-compressibility", "shapes-ensemble"])
    ap.add_argument("--methods", type=lambda s: [x for x in s.split(",") if x], default=["svdd-pm", "dsearch", "free2guide", "smc"])
    ap.add_argument("--mults", type=lambda s: [int(x) for x in s.split(",")], default=[2, 4])
    ap.add_argument("--authors", type=lambda s: [x for x in s.split(",") if x], default=[],
                    help="methods also run with their paper settings at their own cost (e.g. dsearch)")
    ap.add_argument("--bon", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2, 4, 8])
    ap.add_argument("--bon-eta", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 1.0],
                    help="DDIM eta of best-of-N's sampler (the guided methods use eta = 1)")
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--gradient-rewards", type=lambda s: s.split(","), default=["shapes-count"])
    ap.add_argument("--gradient-scales", type=lambda s: [float(x) for x in s.split(",")], default=[0.02, 0.05, 0.1])
    ap.add_argument("--value-dir", type=Path, default=None, help="directory with one value model per reward (REWARD/value.safetensors)")
    ap.add_argument("--compose", type=Path, default=None, help="a fine-tuned run (e.g. runs/demo/final from make demo): "
                    "sample it and the base model on the held-out prompts, plain and steered")
    ap.add_argument("--compose-methods", type=lambda s: s.split(","), default=["best-of-n", "svdd-pm"])
    ap.add_argument("--compose-mult", type=int, default=4)
    ap.add_argument("--compose-samples", type=int, default=96)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot-only", action="store_true")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "points.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {key(r) for r in rows}
    cache: dict = {}
    if not args.plot_only:
        planned = compose_points(args) if args.compose is not None else plan_points(args)
        todo = [p for p in planned if key(p) not in done]
        for i, p in enumerate(todo):
            row = run_point(p, args, cache)
            rows.append(row)
            with path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"[{i + 1}/{len(todo)}] {p['reward']} seed {p['seed']} {label(p)} x{p['mult']}: "
                  f"nfe {row['nfe_per_sample']:.0f} reward {row['reward_mean']:.3f} judge {row['judge_count']:.3f} "
                  f"({row['wall_s']:.0f}s)", flush=True)
    pareto = [r for r in rows if "prompts" not in r]
    plot(pareto, args.out)
    (args.out / "table.md").write_text(table(pareto) + "\n")
    print(table(pareto))
    (args.out / "claim.md").write_text(claim_table(pareto) + "\n")
    print(claim_table(pareto))
    composed = [r for r in rows if "prompts" in r]
    if composed:
        (args.out / "compose.md").write_text(compose_table(composed) + "\n")
        print(compose_table(composed))


if __name__ == "__main__":
    main()
