"""Reward queries and wall time to a target held-out reward, for every training method.

Each (method, seed) run fine-tunes the shipped shapes model and evaluates it on the fixed
held-out set (96 samples: held-out prompts, fixed seeds) every ``eval_queries`` reward
queries (samples scored by the reward during training, warm-up included). A run stops at
the first evaluation whose held-out reward reaches the target, or when its query budget is
spent; then it shows "> budget" with the reward it reached. The judge (which no reward
reads), diversity and the KL to the base model are recorded at every evaluation, so the
table also shows who hacked the reward. Runs checkpoint at each evaluation and resume.

    python benchmarks/sample_efficiency.py --suite count --seeds 0,1,2
    python benchmarks/sample_efficiency.py --suite jpeg --seeds 0
    python benchmarks/sample_efficiency.py --suite count --summary-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# each method with its own paper's kind of settings, all full fine-tuning of the shipped model
COMMON = dict(model="shapes", batch_size=8, lora_rank=0, num_inference_steps=15, guidance_scale=2.0, eval_samples=96,
              eval_every=0, checkpoint_every=0)
METHODS = {
    "draft-1": dict(method="draft-k", k=1, lr=2e-5),
    "draft-k": dict(method="draft-k", k=5, lr=2e-5),
    "draft-lv": dict(method="draft-lv", lv_n=2, lr=2e-5),
    "alignprop": dict(method="alignprop", truncation="uniform", lr=2e-5),
    "refl": dict(method="refl", lr=2e-5),
    "vard": dict(method="vard", eta=1.0, lr=2e-5, kl_weight=1e-3, vard_warmup=128),
    "ddpo": dict(method="ddpo", eta=1.0, lr=1e-5, batch_size=16, ppo_minibatches=2),
}
SUITES = {
    # differentiable reward: every method; DDPO gets the largest budget
    "count": dict(reward="shapes-count", target=-0.70, methods=list(METHODS), budget=1200, budgets={"ddpo": 4000, "vard": 1600},
                  eval_queries=40, eval_queries_by={"ddpo": 320, "vard": 80}),
    # no gradient: the two black-box methods
    "jpeg": dict(reward="jpeg-compressibility", target=-0.90, methods=["ddpo", "vard"], budget=1600, budgets={},
                 eval_queries=320, eval_queries_by={}),
}


def _config(suite: dict, name: str, seed: int):
    from rewardiff.finetune.config import FinetuneConfig

    kw = {**COMMON, **METHODS[name], "reward": suite["reward"], "seed": seed}
    return FinetuneConfig(**kw)


def run_one(suite_name: str, name: str, seed: int, out_root: Path) -> dict:
    """Train until the target or the budget; returns the run's progress record (resumable)."""
    from rewardiff.finetune.trainer import Run
    from rewardiff.io import atomic_write_text, truncate_jsonl

    suite = SUITES[suite_name]
    out = out_root / suite_name / f"{name}-seed{seed}"
    prog_path = out / "progress.json"
    if prog_path.is_file():
        prev = json.loads(prog_path.read_text())
        raised = prev["target"] < suite["target"] and prev["queries"] < suite["budgets"].get(name, suite["budget"])
        if prev.get("done") and not raised:  # a raised target reopens a finished run where it stopped
            return prev
    cfg = _config(suite, name, seed)
    budget = suite["budgets"].get(name, suite["budget"])
    every = suite["eval_queries_by"].get(name, suite["eval_queries"])
    cfg.steps = 10**6  # the loop below stops it
    run = Run(cfg, out, progress=False)
    out.mkdir(parents=True, exist_ok=True)
    step = run.resume()
    prog = {"method": name, "seed": seed, "reward": cfg.reward, "target": suite["target"], "budget": budget, "points": [],
            "queries": 0, "seconds": 0.0, "nfe": 0, "done": False}
    if step and prog_path.is_file():
        prog = json.loads(prog_path.read_text())
        prog.update(target=suite["target"], done=False)
    if step == 0:
        truncate_jsonl(out / "metrics.jsonl", 0)
    if not prog["points"]:
        before = run._eval_cached("before")
        prog["points"].append({"step": 0, "queries": 0, "seconds": 0.0, "nfe": 0, **before})
    next_eval = prog["queries"] + every
    with (out / "metrics.jsonl").open("a") as log:
        while not prog["done"]:
            row = run.train_step(step)
            step += 1
            log.write(json.dumps(row) + "\n")
            log.flush()
            prog["queries"] += row["reward_queries"]
            prog["seconds"] += row["seconds"]
            prog["nfe"] += row["nfe"]
            if prog["queries"] < next_eval and prog["queries"] < budget:
                continue
            next_eval += every
            ev = run.evaluate(f"q{prog['queries']:06d}")
            prog["points"].append({"step": step, "queries": prog["queries"], "seconds": prog["seconds"], "nfe": prog["nfe"], **ev})
            prog["done"] = ev["eval_reward_mean"] >= suite["target"] or prog["queries"] >= budget
            run.save_checkpoint(step)
            atomic_write_text(prog_path, json.dumps(prog, indent=1))
            print(f"{suite_name} {name} seed {seed}: step {step} queries {prog['queries']} reward {ev['eval_reward_mean']:.3f} "
                  f"judge {ev.get('eval_judge_count', float('nan')):.3f} ({time.strftime('%H:%M:%S')})", flush=True)
    return prog


INFERENCE = [("best-of-n", w) for w in (1, 2, 4, 8, 16)] + [("svdd-pm", m) for m in (2, 4, 8, 16)]


def inference_points(suite_name: str, out_root: Path) -> list[dict]:
    """Inference-time methods on the same held-out set as the training runs' evaluations
    (base model, eta = 1): reward against NFE per sample. Cached in ``inference.json``."""
    import torch

    from rewardiff.prompts import eval_set, prompt_set
    from rewardiff.guidance import guided_sample, make_method
    from rewardiff.worlds.shapes.denoiser import shapes_model
    from rewardiff.rewards import get_reward

    path = out_root / suite_name / "inference.json"
    done = json.loads(path.read_text()) if path.is_file() else []
    have = {(r["method"], r["width"]) for r in done}
    suite = SUITES[suite_name]
    cfg = _config(suite, "ddpo", 0)
    reward = get_reward(suite["reward"])
    model = shapes_model()
    prompts, seeds = eval_set(prompt_set(cfg.eval_prompts), cfg.eval_samples)
    for name, width in INFERENCE:
        if (name, width) in have:
            continue
        method = make_method(name, reward, width=width)
        t0 = time.perf_counter()
        x, info = guided_sample(model, method, prompts, seeds, cfg.num_inference_steps, guidance_scale=cfg.guidance_scale, eta=1.0)
        with torch.no_grad():
            r = torch.cat([reward(x[i : i + 64], prompts[i : i + 64]) for i in range(0, len(prompts), 64)])
        done.append({"method": name, "width": width, "nfe_per_sample": info["nfe"] / len(prompts), "reward_mean": float(r.mean()),
                     "seconds": time.perf_counter() - t0})
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(done, indent=1))
    return done


def matched_compute(suite_name: str, out_root: Path, seeds: list[int]) -> str:
    """Training methods against inference-time methods at equal denoiser evaluations.

    A fine-tuned model spends its training NFE once, then 30 NFE per sample; an
    inference-time method spends its NFE per sample every time. For the 96 evaluation
    samples, the training run's total is (training NFE + 96 x 30), i.e. per sample
    30 + training NFE / 96; the inference row closest below that per-sample cost is its match.
    """
    inf = inference_points(suite_name, out_root)
    lines = ["| method | training NFE | NFE per sample, 96 samples amortized | held-out reward | inference at <= that NFE per sample |",
             "|---|---|---|---|---|"]
    for name in SUITES[suite_name]["methods"]:
        for s in seeds:
            p = out_root / suite_name / f"{name}-seed{s}" / "progress.json"
            if not p.is_file():
                continue
            last = json.loads(p.read_text())["points"][-1]
            per = 30 + last["nfe"] / 96
            fits = [r for r in inf if r["nfe_per_sample"] <= per]
            best = max(fits, key=lambda r: r["reward_mean"]) if fits else None
            inf_txt = f"{best['method']} width {best['width']} ({best['nfe_per_sample']:.0f} NFE): {best['reward_mean']:.3f}" if best else "-"
            lines.append(f"| {name} seed {s} | {last['nfe']} | {per:.0f} | {last['eval_reward_mean']:.3f} | {inf_txt} |")
    lines += ["", "| inference method | width | NFE per sample | held-out reward |", "|---|---|---|---|"]
    lines += [f"| {r['method']} | {r['width']} | {r['nfe_per_sample']:.0f} | {r['reward_mean']:.3f} |" for r in inf]
    return "\n".join(lines)


def reached(prog: dict) -> dict | None:
    """The first evaluation at or above the target, or None."""
    return next((p for p in prog["points"] if p["eval_reward_mean"] >= prog["target"]), None)


def summarize(suite_name: str, out_root: Path, seeds: list[int]) -> str:
    suite = SUITES[suite_name]
    lines = [f"Target: held-out {suite['reward']} >= {suite['target']} (96 samples, held-out prompts, fixed seeds).", "",
             "| method | seeds | reward queries to target (median) | train seconds to target (median) | reached | "
             "final held-out reward | judge count | diversity | KL to base |", "|---|---|---|---|---|---|---|---|---|"]
    medians = {}
    for name in suite["methods"]:
        progs = [json.loads(p.read_text()) for s in seeds if (p := out_root / suite_name / f"{name}-seed{s}" / "progress.json").is_file()]
        progs = [p for p in progs if p["done"]]
        if not progs:
            continue
        hits = [reached(p) for p in progs]
        ok = [h for h in hits if h is not None]
        q = [h["queries"] if h else None for h in hits]
        if len(ok) == len(progs):
            medians[name] = statistics.median(q)
            qtxt = f"{statistics.median(q):.0f}"
            stxt = f"{statistics.median(h['seconds'] for h in ok):.0f}"
        else:
            best = max(max(pt["eval_reward_mean"] for pt in p["points"]) for p in progs)
            qtxt = f"> {progs[0]['budget']} ({len(ok)}/{len(progs)} reached; best {best:.3f})" if len(ok) < len(progs) else ""
            stxt = "-"
        last = [p["points"][-1] for p in progs]

        def m(key):
            vals = [x[key] for x in last if key in x]
            return f"{statistics.mean(vals):.3f}" if vals else "-"

        lines.append(f"| {name} | {len(progs)} | {qtxt} | {stxt} | {len(ok)}/{len(progs)} | {m('eval_reward_mean')} | "
                     f"{m('eval_judge_count')} | {m('eval_diversity')} | {m('eval_kl_to_base')} |")
    if "ddpo" in suite["methods"] and "draft-lv" in medians:
        lines.append("")
        if "ddpo" in medians:
            lines.append(f"DDPO / DRaFT-LV reward queries to the target: {medians['ddpo'] / medians['draft-lv']:.1f}x.")
        else:
            budget = suite["budgets"].get("ddpo", suite["budget"])
            lines.append(f"DDPO did not reach the target within {budget} queries: more than {budget / medians['draft-lv']:.1f}x "
                         f"DRaFT-LV's {medians['draft-lv']:.0f}.")
    return "\n".join(lines)


def plot(suite_name: str, out_root: Path, seeds: list[int]) -> list[Path]:
    from rewardiff.report import plot_curves

    suite = SUITES[suite_name]
    by_q, by_s, judge = {}, {}, {}
    for name in suite["methods"]:
        for s in seeds:
            p = out_root / suite_name / f"{name}-seed{s}" / "progress.json"
            if not p.is_file():
                continue
            pts = json.loads(p.read_text())["points"]
            label = f"{name} s{s}"
            by_q[label] = [(max(x["queries"], 1), x["eval_reward_mean"]) for x in pts]
            by_s[label] = [(x["seconds"], x["eval_reward_mean"]) for x in pts]
            if "eval_judge_count" in pts[0]:
                judge[label] = [(max(x["queries"], 1), x["eval_judge_count"]) for x in pts]
    d = out_root / suite_name
    method = lambda label: label.rsplit(" s", 1)[0]  # noqa: E731  (one colour per method, a line style per seed)
    target = dict(group=method, hline=suite["target"])
    paths = [plot_curves(by_q, d / "reward_vs_queries.png", "reward queries (samples scored)", f"held-out {suite['reward']}",
                         f"target {suite['target']} (dashed)", **target),
             plot_curves(by_s, d / "reward_vs_seconds.png", "training seconds (2-core CPU)", f"held-out {suite['reward']}",
                         f"target {suite['target']} (dashed)", **target)]
    if judge:
        paths.append(plot_curves(judge, d / "judge_vs_queries.png", "reward queries", "judge: count correct", "read by the judge",
                                 group=method))
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=list(SUITES), default="count")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the suite's methods")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/sample_efficiency"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.methods.split(",") if args.methods else SUITES[args.suite]["methods"]
    if not args.summary_only:
        for name in names:  # method by method, so a stopped benchmark has whole rows
            for seed in seeds:
                run_one(args.suite, name, seed, args.out)
    table = summarize(args.suite, args.out, seeds)
    if args.suite == "jpeg":
        table += "\n\n" + matched_compute(args.suite, args.out, seeds)
    (args.out / args.suite).mkdir(parents=True, exist_ok=True)
    (args.out / args.suite / "table.md").write_text(table + "\n")
    plot(args.suite, args.out, seeds)
    print(table)


if __name__ == "__main__":
    main()
