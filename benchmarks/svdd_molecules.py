"""SVDD-PM against best-of-N on the masked molecules model, up to 16x a plain sample's NFE,
and why SVDD's per-step choice helps less as the budget grows.

Two parts, each resumable (finished points are kept and skipped on a rerun):

1. ``--curve``: true QED (RDKit) against NFE per sample for best-of-N (N = 1 .. 16, 15 to
   240 NFE) and SVDD-PM (M = 2 .. 17, 29 to 239 NFE), ``--samples`` molecules a point (seeds
   0 .. n-1), with the paper's look-ahead (the reward of the argmax decode of the predicted
   clean tokens), with ``lookahead=sample`` (the reward of one draw from them, a named
   deviation), and guided only from step ``GUIDE_FROM`` on (``guide_from``, a named
   deviation that part 2 motivates), and with the last step selected too (``final``, look-ahead
   label "final": the best of M final draws by the reward itself, no extra NFE; a named
   deviation). Standard errors over molecules beside every mean.
2. ``--diagnose``: how well each look-ahead predicts what a candidate leads to. At step j of
   the T-step chain, each of P parent states gets M candidates of x_{t-1}; each candidate is
   scored by both look-aheads, then completed C times by the base sampler, whose mean final
   QED is the candidate's (noisy) true value. Reported per step: the Spearman correlation
   between look-ahead and true value within each parent's candidates (what a selection sees),
   averaged over parents, and the true-value gain of the candidate each look-ahead picks over
   the parent's average candidate (what a selection earns).

    python benchmarks/svdd_molecules.py --curve --samples 1024
    python benchmarks/svdd_molecules.py --diagnose --parents 64 --m 4 --completions 4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "molecules" / "svdd"
STEPS = 15
GUIDE_FROM = 6  # the first step whose look-ahead reads something (the diagnosis: Spearman 0.16 there, 0.02 before)
CURVE = ([("best-of-n", w, "mean", 0) for w in (1, 2, 4, 8, 16)] + [("svdd-pm", m, "mean", 0) for m in (2, 4, 8, 17)]
         + [("svdd-pm", m, "final", 0) for m in (2, 4, 8, 17)]  # the last step selected too, at no NFE
         + [("svdd-pm", m, "mean", GUIDE_FROM) for m in (3, 7, 14, 29)]  # 7 + 8 M NFE: 31, 63, 119, 239
         + [("svdd-pm", m, "sample", 0) for m in (2, 4, 8, 17)])


def _model():
    from rewardiff.models.registry import base_model

    return base_model("molecules")


def curve_point(model, method: str, width: int, lookahead: str, guide_from: int, n: int) -> dict:
    from rewardiff.guidance import guided_sample, make_method
    from rewardiff.rewards import get_reward
    from rewardiff.worlds.molecules import data as molecules
    from rewardiff.worlds.molecules.chem import property_values

    reward = get_reward("qed")
    opts = {"lookahead": "mean" if lookahead == "final" else lookahead, "guide_from": guide_from, "final": lookahead == "final"}
    opts = opts if method == "svdd-pm" else {}
    meth = make_method(method, reward, width=width, **opts)
    t0 = time.perf_counter()
    x, info = guided_sample(model, meth, [""] * n, list(range(n)), STEPS, guidance_scale=1.0, eta=1.0)
    smiles = model.texts(x)
    qed = property_values("qed", smiles).numpy()
    return {"method": method, "width": width, "lookahead": lookahead, "guide_from": guide_from, "samples": n, "nfe_per_sample": info["nfe_per_sample"],
            "qed": float(qed.mean()), "qed_se": float(qed.std(ddof=1) / np.sqrt(n)), "sa": float(property_values("sa", smiles).mean()),
            "validity": molecules.validity(smiles), "uniqueness": molecules.uniqueness(smiles), "wall_s": time.perf_counter() - t0}


def run_curve(n: int, out: Path) -> list[dict]:
    path = out / "curve.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    have = {(r["method"], r["width"], r["lookahead"], r.get("guide_from", 0), r["samples"]) for r in rows}
    model = _model()
    for method, width, la, k in CURVE:
        if (method, width, la, k, n) in have:
            continue
        row = curve_point(model, method, width, la, k, n)
        rows.append(row)
        out.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"{method} {width} {la} from {k}: {row['nfe_per_sample']:.0f} NFE, QED {row['qed']:.3f} ± {row['qed_se']:.3f} "
              f"({row['wall_s']:.0f} s)", flush=True)
    return [r for r in rows if r["samples"] == n]


def curve_table(rows: list[dict]) -> str:
    lines = ["| method | look-ahead | guided from step | width | NFE/sample | QED ± s.e. | SA | validity | uniqueness |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["method"], r["lookahead"], r.get("guide_from", 0), r["nfe_per_sample"])):
        svdd = r["method"] == "svdd-pm"
        lines.append(f"| {r['method']} | {r['lookahead'] if svdd else '-'} | {r.get('guide_from', 0) if svdd else '-'} | "
                     f"{r['width']} | {r['nfe_per_sample']:.0f} | "
                     f"{r['qed']:.3f} ± {r['qed_se']:.3f} | {r['sa']:.3f} | {r['validity']:.1%} | {r['uniqueness']:.1%} |")
    return "\n".join(lines)


def plot_curve(rows: list[dict], path: Path) -> Path:
    from rewardiff.report import plot_curves

    series: dict[str, list] = {}
    for r in sorted(rows, key=lambda r: r["nfe_per_sample"]):
        la = "mean look-ahead, last step selected" if r["lookahead"] == "final" else f"{r['lookahead']} look-ahead"
        label = r["method"] if r["method"] == "best-of-n" else (
            f"svdd-pm ({la}" + (f", from step {r['guide_from']})" if r.get("guide_from") else ")"))
        series.setdefault(label, []).append((r["nfe_per_sample"], r["qed"]))
    return plot_curves(series, path, "NFE per sample", "true QED (RDKit)", f"masked molecules model, {rows[0]['samples']} a point")


# ----------------------------------------------------------------------------- the diagnosis


def _complete(model, states: torch.Tensor, ts: list[int], seeds: list[int]) -> torch.Tensor:
    """Run the base sampler from ``states`` [N, L] through the timesteps ``ts``: final ids [N, L]."""
    from rewardiff.rollout import rollout

    if not ts:
        return states
    with torch.no_grad():
        traj = rollout(model.net, model.process, states, model.encode([""] * len(seeds)), ts, eta=1.0,
                       generator=model.step_generators(seeds))
    return traj.x0


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def diagnose_step(model, j: int, parents: int, m: int, completions: int, seed: int = 0) -> dict:
    """The look-aheads' fidelity at step ``j`` (see the module doc, part 2)."""
    from rewardiff.guidance.base import candidates
    from rewardiff.rewards import get_reward
    from rewardiff.rollout import rollout
    from rewardiff.types import StepContext
    from rewardiff.worlds.molecules.chem import property_values

    proc, qed = model.process, get_reward("qed")
    ts = proc.timesteps(STEPS)
    prev = proc.prev_timesteps(ts)
    seeds = [seed * 100_003 + i for i in range(parents)]
    with torch.no_grad():  # the parents: base-sampler states x_t at step j
        x_t = rollout(model.net, model.process, model.noise(seeds), model.encode([""] * parents), ts[:j], eta=1.0,
                      generator=model.step_generators(seeds), t_final=ts[j]).x0 if j else model.noise(seeds)
        cond = model.encode([""] * parents)
        out = proc.step(model.net(x_t, torch.full((parents,), ts[j]), cond), ts[j], prev[j], x_t, 1.0, proc.noise_like(x_t))
        gen = torch.Generator().manual_seed(seed + 17)
        ctx = StepContext(j, ts[j], prev[j], x_t, out, cond, [""] * parents)
        cands, rows = candidates(ctx, m, gen, proc)  # [P*m, L]
        x0 = proc.split(model.net(cands, torch.full((len(cands),), prev[j]), model.encode([""] * len(cands))), cands, prev[j])[0]
        look_mean = qed(x0, [""] * len(cands)).numpy()
        look_sample = qed(proc.draw(x0, out.std, proc.noise_like(cands, gen)), [""] * len(cands)).numpy()
    true = np.zeros(len(cands))
    for c in range(completions):
        fin = _complete(model, cands, ts[j + 1 :], [10_000_019 * (c + 1) + i for i in range(len(cands))])
        true += property_values("qed", model.texts(fin)).numpy() / completions
    by = lambda v: v.reshape(parents, m)  # noqa: E731
    res = {"step": j, "parents": parents, "m": m, "completions": completions}
    for name, look in (("mean", look_mean), ("sample", look_sample)):
        rho = [_spearman(a, b) for a, b in zip(by(look), by(true))]
        pick = by(true)[np.arange(parents), by(look).argmax(1)]
        res[f"spearman_{name}"] = float(np.nanmean(rho))
        res[f"gain_{name}"] = float((pick - by(true).mean(1)).mean())
    res["gain_oracle"] = float((by(true).max(1) - by(true).mean(1)).mean())
    return res


def run_diagnosis(out: Path, parents: int, m: int, completions: int, steps: list[int]) -> list[dict]:
    path = out / "diagnosis.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    have = {(r["step"], r["parents"], r["m"], r["completions"]) for r in rows}
    model = _model()
    for j in steps:
        if (j, parents, m, completions) in have:
            continue
        row = diagnose_step(model, j, parents, m, completions)
        rows.append(row)
        out.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    return rows


def diagnosis_table(rows: list[dict]) -> str:
    lines = ["| step j of 15 | Spearman: argmax look-ahead | Spearman: sampled look-ahead | gain: argmax | gain: sampled | gain: oracle |",
             "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: r["step"]):
        lines.append(f"| {r['step']} | {r['spearman_mean']:.2f} | {r['spearman_sample']:.2f} | {r['gain_mean']:+.3f} | "
                     f"{r['gain_sample']:+.3f} | {r['gain_oracle']:+.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--curve", action="store_true")
    ap.add_argument("--diagnose", action="store_true")
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--parents", type=int, default=64)
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--completions", type=int, default=4)
    ap.add_argument("--steps", default="0,3,6,9,12,13")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    parts = []
    if args.diagnose:
        rows = run_diagnosis(args.out, args.parents, args.m, args.completions, [int(s) for s in args.steps.split(",")])
        parts.append(diagnosis_table([r for r in rows if r["parents"] == args.parents and r["m"] == args.m]))
    if args.curve:
        rows = run_curve(args.samples, args.out)
        parts.append(curve_table(rows))
        plot_curve(rows, args.out / "qed_vs_nfe.png")
    text = "\n\n".join(parts)
    (args.out / ("table.md" if args.curve else "diagnosis.md")).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
