"""True QED (and QED + SA) against NFE per sample for inference-time methods on the masked
diffusion model of the molecules world.

Each point samples ``--samples`` molecules (seeds 0..n-1) with one method at one width and
reads them with RDKit: the reward itself (QED, or the mixed reward), validity, uniqueness
and, for every reward, QED and SA separately. The reward is a black box read on the
denoiser's clean-token estimate (SVDD-PM, DSearch, SMC) or on final samples (best-of-N).
With ``--value DIR`` (a value model from ``rewardiff train-value --model molecules``) it also
runs SVDD-MC points for the reward that value was trained on: M candidates a step kept by the
learned value, at T NFE per sample whatever M (the value net is no denoiser call; its CPU
time shows in ``wall_s``). Finished points are kept in ``points.jsonl`` and skipped on a rerun.

    python benchmarks/molecules_pareto.py --out benchmarks/results/molecules
    rewardiff train-value --reward qed --model molecules --out runs/value-qed
    python benchmarks/molecules_pareto.py --out runs/mc --rewards qed --value runs/value-qed \
        --methods best-of-n,svdd-pm,svdd-mc --max-nfe 120
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

STEPS = 15
PLAN = {
    "best-of-n": [1, 2, 4, 8, 16, 32],
    "svdd-pm": [2, 4],
    "smc": [2, 4, 8],
    "dsearch": [2],
    "svdd-mc": [2, 4, 8, 16],  # only with --value; every M costs STEPS NFE per sample
}


def run_point(model, reward_name: str, method: str, width: int, n: int, value=None) -> dict:
    import torch

    from rewardiff.guidance import guided_sample, make_method
    from rewardiff.rewards import get_reward
    from rewardiff.worlds.molecules.chem import property_values
    from rewardiff.worlds.molecules import data as molecules

    reward = get_reward(reward_name)
    m = make_method(method, reward, width=width, value=value)
    seeds = list(range(n))
    t0 = time.perf_counter()
    x, info = guided_sample(model, m, [""] * n, seeds, STEPS, guidance_scale=1.0, eta=1.0)
    wall = time.perf_counter() - t0
    smiles = molecules.tokenizer().decode_batch(x)
    with torch.no_grad():
        r = reward(x, [""] * n).float()
    return {"reward": reward_name, "method": method, "width": width, "samples": n, "nfe_per_sample": info["nfe_per_sample"],
            "reward_mean": float(r.mean()), "reward_sem": float(r.std() / n**0.5), "qed": float(property_values("qed", smiles).mean()),
            "sa": float(property_values("sa", smiles).mean()), "validity": molecules.validity(smiles),
            "uniqueness": molecules.uniqueness(smiles), "wall_s": wall,
            **({"value": str(value.path), "value_r2_heldout": value.config["metrics"]["r2_heldout"]} if value is not None else {})}


def table(rows: list[dict]) -> str:
    lines = ["| reward | method | width | NFE/sample | reward (± s.e.) | QED | SA | validity | uniqueness | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["reward"], r["method"], r["nfe_per_sample"])):
        lines.append(f"| {r['reward']} | {r['method']} | {r['width']} | {r['nfe_per_sample']:.0f} | {r['reward_mean']:.3f} ± {r['reward_sem']:.3f} | "
                     f"{r['qed']:.3f} | {r['sa']:.3f} | {r['validity']:.1%} | {r['uniqueness']:.1%} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def nearest(bon: list[dict], nfe: float) -> dict | None:
    """The best-of-N point nearest ``nfe`` NFE per sample, within 15 %, or None."""
    b = min(bon, key=lambda b: abs(math.log(b["nfe_per_sample"] / nfe)), default=None)
    return b if b is not None and abs(math.log(b["nfe_per_sample"] / nfe)) <= math.log(1.15) else None


def equal_nfe(rows: list[dict]) -> str:
    """Each guided point against best-of-N at the same NFE per sample (within 15 %)."""
    out = []
    for r in sorted(rows, key=lambda r: (r["reward"], r["method"], r["width"])):
        if r["method"] == "best-of-n":
            continue
        b = nearest([x for x in rows if x["reward"] == r["reward"] and x["method"] == "best-of-n"], r["nfe_per_sample"])
        if b is not None:
            out.append(f"- {r['reward']}: {r['method']} width {r['width']} at {r['nfe_per_sample']:.0f} NFE: {r['reward_mean']:.3f} "
                       f"± {r['reward_sem']:.3f} against best-of-{b['width']}: {b['reward_mean']:.3f} ± {b['reward_sem']:.3f}")
    return "\n".join(out)


def verdicts(rows: list[dict]) -> str:
    """SVDD-PM / DSearch / SMC at budget B against best-of-N at 4B (the point nearest 4B, within 15 %)."""
    out = []
    for reward in sorted({r["reward"] for r in rows}):
        bon = [r for r in rows if r["reward"] == reward and r["method"] == "best-of-n"]
        for r in rows:
            if r["reward"] != reward or r["method"] == "best-of-n":
                continue
            b = min(bon, key=lambda b: abs(math.log(b["nfe_per_sample"] / (4 * r["nfe_per_sample"]))), default=None)
            if b is None or abs(math.log(b["nfe_per_sample"] / (4 * r["nfe_per_sample"]))) > math.log(1.15):
                out.append(f"- {reward}: {r['method']} width {r['width']} ({r['nfe_per_sample']:.0f} NFE): no best-of-N point within 15 % of 4x")
                continue
            ok = r["reward_mean"] >= b["reward_mean"] - b["reward_sem"]
            out.append(f"- {reward}: {r['method']} width {r['width']} at {r['nfe_per_sample']:.0f} NFE: {r['reward_mean']:.3f} against "
                       f"best-of-{b['width']} at {b['nfe_per_sample']:.0f}: {b['reward_mean']:.3f} -> {'met' if ok else 'missed'}")
    return "\n".join(out)


def _noop():
    """A stand-in reward for building a method only to read its cost."""
    from rewardiff.rewards.base import RewardFn

    return RewardFn("noop", False, None, "", lambda x, p: x.new_zeros(x.shape[0]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/molecules"))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--rewards", default="qed,qed-sa")
    ap.add_argument("--methods", default=None, help="comma-separated subset of the plan (default: all; svdd-mc needs --value)")
    ap.add_argument("--value", type=Path, default=None, help="value model directory for the svdd-mc points")
    ap.add_argument("--max-nfe", type=float, default=None, help="skip points that cost more NFE per sample")
    args = ap.parse_args()
    import torch

    from rewardiff.guidance import make_method
    from rewardiff.rewards.value import load_value
    from rewardiff.worlds.molecules.masked import molecules_model

    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "points.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    have = {(r["reward"], r["method"], r["width"], r["samples"]) for r in rows}
    methods = args.methods.split(",") if args.methods else [m for m in PLAN if m != "svdd-mc" or args.value]
    unknown = [m for m in methods if m not in PLAN]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; the plan has {', '.join(PLAN)}")
    if "svdd-mc" in methods and args.value is None:
        raise SystemExit("svdd-mc points need --value DIR (rewardiff train-value --model molecules)")
    value = load_value(args.value) if args.value is not None else None
    model = molecules_model()
    for reward in args.rewards.split(","):
        for method in methods:
            if method == "svdd-mc" and value is not None and value.reward != reward:
                print(f"{reward} svdd-mc: skipped, the value in {args.value} predicts {value.reward!r}", flush=True)
                continue
            v = value if method == "svdd-mc" else None  # SMC could take a value too; here it reads x0_hat
            for w in PLAN[method]:
                cost = make_method(method, _noop(), width=w, value=v).cost(STEPS, 1)
                if (reward, method, w, args.samples) in have or (args.max_nfe is not None and cost > args.max_nfe):
                    continue
                row = run_point(model, reward, method, w, args.samples, v)
                rows.append(row)
                with path.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(f"{reward} {method} w={w}: NFE {row['nfe_per_sample']:.0f} reward {row['reward_mean']:.3f} "
                      f"QED {row['qed']:.3f} valid {row['validity']:.1%}", flush=True)
    text = (table(rows) + "\n\nAt equal NFE per sample, against best-of-N:\n\n" + equal_nfe(rows)
            + "\n\nSVDD-PM, DSearch, SMC and SVDD-MC at budget B against best-of-N at 4B:\n\n" + verdicts(rows) + "\n")
    (args.out / "table.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
