"""Gumbel-softmax reward fine-tuning (DiffRO 2025) of the shipped autoregressive molecules model.

Fine-tunes ``molecules-ar`` with method ``gumbel`` on a differentiable reward-model reward
(``chem-rm-qed`` by default) and measures, on the same fixed seeds before and after: the
reward model's prediction (the surrogate, what training maximizes), its true RDKit value,
QED and SA, validity, uniqueness and novelty, and the KL to the base model. A surrogate
that rises more than the truth is reward hacking of the reward model. The run folder holds
the report, the SMILES and drawings; a finished run is kept and only re-measured.

With ``--ascent``, also checks on the base model whether each estimator's gradient points
uphill (:func:`ascent_check`): a step of every weight along it, against the unbiased
score-function (REINFORCE) gradient of the same reward.

    python benchmarks/gumbel_molecules.py --steps 300 --estimator relaxed --out benchmarks/results/gumbel
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path

KEYS = ["reward_mean", "true_reward_mean", "qed", "sa", "validity", "uniqueness", "novelty", "kl_to_base"]


def config(args: argparse.Namespace):
    from rewardiff.finetune.config import FinetuneConfig

    return FinetuneConfig(model=args.model, method="gumbel", reward=args.reward, steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, lora_rank=args.lora_rank, lora_alpha=float(args.lora_rank), kl_weight=args.kl_weight,
                          gumbel_tau=args.tau, gumbel_estimator=args.estimator, eval_samples=args.samples, eval_every=args.eval_every,
                          num_inference_steps=args.sampler_steps, k=args.k,
                          checkpoint_every=args.eval_every, seed=args.seed)


def table(summary: dict) -> dict:
    """Before, after and their difference for each measure; the surrogate's rise over the truth's."""
    b, a = summary["before"], summary["after"]
    rows = {k: {"before": b[f"eval_{k}"], "after": a[f"eval_{k}"], "change": a[f"eval_{k}"] - b[f"eval_{k}"]}
            for k in KEYS if f"eval_{k}" in b}
    if "true_reward_mean" in rows:
        rows["surrogate_minus_true_change"] = rows["reward_mean"]["change"] - rows["true_reward_mean"]["change"]
    return rows


def ascent_check(model_name: str, reward: str, truth: str, estimators: list[tuple[str, float]], n: int = 1024,
                 eval_n: int = 1024, steps: tuple[float, ...] = (0.1, 0.3), batch: int = 64) -> dict:
    """Whether a gradient estimate points uphill, read directly: move every weight of the base
    model by ``eps`` (L2 norm over all weights) along the estimate and measure the change of the
    mean surrogate reward and of the mean true reward on ``eval_n`` fixed seeds (the same seeds,
    and so the same Gumbel noise, before and after: common random numbers).

    The estimates: the score-function gradient (sum of (r - mean r) grad log p over ``2 n``
    samples; unbiased) and each (estimator, tau) of method ``gumbel`` over ``n`` samples. Also
    reports each estimate's cosine with the score-function one."""
    import torch

    from rewardiff.finetune.gumbel import relaxed_pick, straight_through_pick
    from rewardiff.models.registry import base_model
    from rewardiff.rewards import get_reward

    model, reward_fn, true_fn = base_model(model_name), get_reward(reward), get_reward(truth)
    params = list(model.net.parameters())

    def add(acc, value):
        for a, g in zip(acc, torch.autograd.grad(value, params)):
            a += g

    def score_function() -> list:
        seeds = list(range(2 * n))
        with torch.no_grad():
            tokens = torch.cat([model.sample(seeds[i : i + batch]).tokens for i in range(0, len(seeds), batch)])
            r = torch.cat([reward_fn(tokens[i : i + batch], [""] * len(tokens[i : i + batch])) for i in range(0, len(tokens), batch)])
        acc = [torch.zeros_like(p) for p in params]
        for i in range(0, len(tokens), batch):
            t = tokens[i : i + batch]
            alive = torch.cat([torch.ones(len(t), 1), 1 - t[:, :-1, model.pad_id].cumsum(1).clamp(max=1)], 1)  # [B, L]
            log_p = ((model.teacher_forced_logits(model.net, t).log_softmax(-1) * t).sum(-1) * alive).sum(1)  # [B]
            add(acc, ((r[i : i + batch] - r.mean()) * log_p).sum())
        return acc

    def gumbel_estimate(estimator: str, tau: float) -> list:
        relaxed = estimator == "relaxed"
        pick = (relaxed_pick if relaxed else straight_through_pick)(tau)
        acc = [torch.zeros_like(p) for p in params]
        for i in range(0, n, batch):
            add(acc, reward_fn(model.sample(list(range(i, i + batch)), pick, drawn_back=relaxed).tokens, [""] * batch).sum())
        return acc

    eval_seeds = list(range(10**7, 10**7 + eval_n))

    @torch.no_grad()
    def measure() -> tuple[float, float]:
        tokens = torch.cat([model.sample(eval_seeds[i : i + batch]).tokens for i in range(0, eval_n, batch)])
        surrogate = torch.cat([reward_fn(tokens[i : i + batch], [""] * len(tokens[i : i + batch])) for i in range(0, eval_n, batch)])
        return float(surrogate.mean()), float(true_fn(tokens.argmax(-1), [""] * eval_n).float().mean())

    base = measure()
    estimates = {"score-function": score_function(), **{f"{e} tau={t:g}": gumbel_estimate(e, t) for e, t in estimators}}
    flat = {k: torch.cat([g.flatten() for g in v]) for k, v in estimates.items()}
    out = {"reward": reward, "truth": truth, "base": {"surrogate": round(base[0], 4), "true": round(base[1], 4)}, "estimates": {}}
    for name, grads in estimates.items():
        norm = flat[name].norm()
        row = {"cosine_with_score_function": round(float(torch.cosine_similarity(flat[name], flat["score-function"], 0)), 3)}
        for eps in steps:
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p += eps * g / norm
            after = measure()
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p -= eps * g / norm
            row[f"eps={eps:g}"] = {"surrogate_change": round(after[0] - base[0], 4), "true_change": round(after[1] - base[1], 4)}
        out["estimates"][name] = row
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="molecules-ar")
    p.add_argument("--reward", default="chem-rm-qed")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--kl-weight", type=float, default=0.05)
    p.add_argument("--tau", type=float, default=0.3)
    p.add_argument("--samples", type=int, default=256, help="fixed evaluation seeds")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--estimator", default="relaxed", choices=["relaxed", "straight-through"])
    p.add_argument("--sampler-steps", type=int, default=32, help="masked diffusion: unmasking steps of the chain")
    p.add_argument("--k", type=int, default=4, help="masked diffusion: last steps that carry gradient")
    p.add_argument("--ascent", default="", help="also check whether gradients point uphill: comma-separated estimator:tau "
                   "pairs, e.g. relaxed:0.3,straight-through:1 (the score-function gradient is always included)")
    p.add_argument("--truth", default="qed", help="the true reward read beside the surrogate in --ascent")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gumbel"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from rewardiff.finetune.trainer import finetune, is_run

    cfg = config(args)
    tag = "" if args.estimator == "relaxed" else "-st"
    run = args.out / f"{args.model.replace(':', '_').replace('/', '_')}-{args.reward}{tag}-tau{args.tau:g}-seed{args.seed}"
    t0 = time.time()
    summary = finetune(cfg, run, resume=is_run(run), progress=False)  # a finished or stopped run is continued
    result = {
        "command": "python benchmarks/gumbel_molecules.py " + shlex.join(sys.argv[1:]),
        "config": {k: getattr(cfg, k) for k in ("model", "method", "reward", "steps", "batch_size", "lr", "lora_rank", "lora_alpha",
                                                 "kl_weight", "gumbel_tau", "gumbel_estimator", "num_inference_steps", "k",
                                                 "eval_samples", "seed")},
        "measures": table(summary),
        "seconds": round(time.time() - t0, 1),
        "seconds_per_step_median": _median_seconds(run),
        "machine": f"{platform.machine()} CPU, 1 thread, torch {torch.__version__}",
        "run": str(run),
    }
    if args.ascent:
        pairs = [(e, float(t)) for e, t in (v.split(":") for v in args.ascent.split(","))]
        result["ascent_check"] = ascent_check(args.model, args.reward, args.truth, pairs)
    (args.out / f"{run.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["measures"], indent=2))


def _median_seconds(run: Path) -> float:
    import statistics

    from rewardiff.report import read_metrics

    rows = read_metrics(run)
    return round(statistics.median(r["seconds"] for r in rows), 3) if rows else 0.0


if __name__ == "__main__":
    main()
