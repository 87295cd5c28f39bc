"""Gumbel-softmax reward fine-tuning (DiffRO 2025) of the shipped autoregressive molecules model.

Fine-tunes ``molecules-ar`` with method ``gumbel`` on a differentiable reward-model reward
(``chem-rm-qed`` by default) and measures, on the same fixed seeds before and after: the
reward model's prediction (the surrogate, what training maximizes), its true RDKit value,
QED and SA, validity, uniqueness and novelty, and the KL to the base model. A surrogate
that rises more than the truth is reward hacking of the reward model. The run folder holds
the report, the SMILES and drawings; a finished run is kept and only re-measured.

With ``--agreement``, also measures how well the straight-through gradient points: its
cosine with the unbiased score-function gradient of the same reward, on the base model.

    python benchmarks/gumbel_molecules.py --steps 300 --out benchmarks/results/gumbel
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
                          gumbel_tau=args.tau, eval_samples=args.samples, eval_every=args.eval_every,
                          checkpoint_every=args.eval_every, seed=args.seed)


def table(summary: dict) -> dict:
    """Before, after and their difference for each measure; the surrogate's rise over the truth's."""
    b, a = summary["before"], summary["after"]
    rows = {k: {"before": b[f"eval_{k}"], "after": a[f"eval_{k}"], "change": a[f"eval_{k}"] - b[f"eval_{k}"]}
            for k in KEYS if f"eval_{k}" in b}
    if "true_reward_mean" in rows:
        rows["surrogate_minus_true_change"] = rows["reward_mean"]["change"] - rows["true_reward_mean"]["change"]
    return rows


def gradient_agreement(model_name: str, reward: str, taus: list[float], n: int = 512, batch: int = 64) -> dict[str, float]:
    """Cosine between the straight-through gradient of the mean reward and the score-function
    (REINFORCE, mean baseline) gradient, with respect to the base model's output bias [V]; the
    latter is unbiased, from 4 n samples. One cosine per temperature."""
    import torch

    from rewardiff.finetune.gumbel import straight_through_pick
    from rewardiff.finetune.weights import base_model
    from rewardiff.rewards import get_reward

    model, reward_fn = base_model(model_name), get_reward(reward)
    model.net.requires_grad_(False)
    bias = model.net.head.bias.requires_grad_(True)

    def grad(value) -> torch.Tensor:
        return torch.autograd.grad(value, bias)[0]

    with torch.no_grad():
        seeds = [10**6 + i for i in range(4 * n)]
        tokens = torch.cat([model.sample(seeds[i : i + batch]).tokens for i in range(0, len(seeds), batch)])
        r = torch.cat([reward_fn(tokens[i : i + batch], [""] * len(tokens[i : i + batch])) for i in range(0, len(tokens), batch)])
    score = torch.zeros_like(bias)
    for i in range(0, len(tokens), batch):
        t = tokens[i : i + batch]
        alive = torch.cat([torch.ones(len(t), 1), 1 - t[:, :-1, model.pad_id].cumsum(1).clamp(max=1)], 1)  # [B, L]
        log_p = ((model.teacher_forced_logits(model.net, t).log_softmax(-1) * t).sum(-1) * alive).sum(1)  # [B]
        score += grad(((r[i : i + batch] - r.mean()) * log_p).sum())
    out = {}
    for tau in taus:
        st = sum(grad(reward_fn(model.sample(list(range(i, i + batch)), straight_through_pick(tau)).tokens, [""] * batch).sum())
                 for i in range(0, n, batch))
        out[f"tau={tau:g}"] = round(float(torch.cosine_similarity(st, score, 0)), 3)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="molecules-ar")
    p.add_argument("--reward", default="chem-rm-qed")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--kl-weight", type=float, default=0.05)
    p.add_argument("--tau", type=float, default=1.0)
    p.add_argument("--samples", type=int, default=256, help="fixed evaluation seeds")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--agreement", default="", help="comma-separated temperatures: also measure the gradient's agreement "
                   "with the score-function gradient at each (the autoregressive model's output bias)")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gumbel"))
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from rewardiff.finetune.trainer import finetune

    cfg = config(args)
    run = args.out / f"{args.model.replace(':', '_').replace('/', '_')}-{args.reward}-tau{args.tau:g}-seed{args.seed}"
    t0 = time.time()
    summary = finetune(cfg, run, resume=True, progress=False)
    result = {
        "command": "python benchmarks/gumbel_molecules.py " + shlex.join(sys.argv[1:]),
        "config": {k: getattr(cfg, k) for k in ("model", "method", "reward", "steps", "batch_size", "lr", "lora_rank", "lora_alpha",
                                                 "kl_weight", "gumbel_tau", "eval_samples", "seed")},
        "measures": table(summary),
        "seconds": round(time.time() - t0, 1),
        "seconds_per_step_median": _median_seconds(run),
        "machine": f"{platform.machine()} CPU, 1 thread, torch {torch.__version__}",
        "run": str(run),
    }
    if args.agreement:
        taus = [float(v) for v in args.agreement.split(",")]
        result["gradient_cosine_with_score_function"] = gradient_agreement(args.model, args.reward, taus)
    (args.out / f"{run.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["measures"], indent=2))


def _median_seconds(run: Path) -> float:
    import statistics

    from rewardiff.report import read_metrics

    rows = read_metrics(run)
    return round(statistics.median(r["seconds"] for r in rows), 3) if rows else 0.0


if __name__ == "__main__":
    main()
