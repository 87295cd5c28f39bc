"""Error of the private kernel-bandit release against the exploration length T, per epsilon.

For each kernel (RBF and Matern-5/2, lengthscale 0.2, on z = (context, action) in [0, 1]^2 with
8 arms), seed and T in ``T_GRID``, a fresh RKHS environment (||f|| = 1, noise 0.1) is played by
:class:`rewardiff.bandits.PrivateKernelBandit` for T exploration rounds, and the released
estimate is scored on a held-out set (300 fresh contexts x every arm):

- ``rmse``: ||f_hat - f|| in L2 over the held-out inputs;
- ``simple_regret``: mean over held-out contexts of f(c, a*(c)) - f(c, argmax_a f_hat(c, a)).

Methods: the covariance estimator (Pavlovic, Salgia & Zhao 2025) and the output-perturbation
ridge baseline, each at epsilon in ``EPSILONS`` (delta = 1e-5); ``ridge`` at epsilon = inf is
plain (Nystrom) kernel ridge regression, the non-private reference. Slopes are least-squares
fits of log rmse on log T per seed, reported as mean and standard deviation over seeds, beside
the slopes of the bound O(sqrt(gamma_T / T) + gamma_T / (T eps)) (gamma_T ~ log^{d+1} T for the
RBF, T^{d / (2 nu + d)} for Matern-nu, d = 2, logarithms ignored). An audit section runs
:func:`rewardiff.bandits.audit` on worst-case neighbours, correct and broken (noise x 0.3).

    python benchmarks/bandits_rate.py                 # resumable: finished cells are kept
    python benchmarks/bandits_rate.py --summary-only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from rewardiff.bandits import (  # noqa: E402
    Arms, CovarianceEstimator, PrivateKernelBandit, RKHSEnvironment, audit, joint, landmarks, matern,
    nystrom_features, rbf, worst_case_neighbours,
)
from rewardiff.io import atomic_write_bytes, atomic_write_text  # noqa: E402

OUT = HERE / "results" / "bandits"
T_GRID = [100, 200, 400, 800, 1600]
EPSILONS = [0.5, 1.0, 2.0, 4.0, math.inf]
KERNELS = {"rbf": rbf(0.2), "matern2.5": matern(2.5, 0.2)}
METHODS = [(est, eps) for est in ("covariance", "ridge") for eps in EPSILONS]
BOUND_SLOPES = {  # (statistical term sqrt(gamma/T), privacy term gamma/(T eps)), d = 2
    "rbf": (-0.5, -1.0), "matern2.5": (-2.5 / 7, -5 / 7)}


def method_name(est: str, eps: float) -> str:
    return f"{est}-eps{'inf' if math.isinf(eps) else f'{eps:g}'}"


def run_cell(kernel_name: str, seed: int, horizon: int) -> dict:
    """Every method on one (kernel, seed, T): its held-out rmse and simple regret."""
    kernel, arms = KERNELS[kernel_name], Arms.grid(0.0, 1.0, 8)
    out = {}
    for est, eps in METHODS:
        env = RKHSEnvironment(kernel, 1, arms, rkhs_norm=1.0, noise_std=0.1, seed=seed)
        agent = PrivateKernelBandit(arms, kernel, horizon, epsilon=eps, estimator=est, seed=1000 + seed)
        for _ in range(horizon):
            c = env.sample_context()
            a = agent.act(c)
            agent.update(c, a, env.reward(c, a))
        contexts = np.random.default_rng(10_000 + seed).uniform(0, 1, (300, 1))
        z = joint(contexts, arms.features)  # [300, 8, 2]
        f, f_hat = env.f(z), agent.predict(z)
        chosen = f[np.arange(len(f)), f_hat.argmax(1)]
        out[method_name(est, eps)] = {"rmse": float(np.sqrt(np.mean((f_hat - f) ** 2))),
                                      "simple_regret": float(np.mean(f.max(1) - chosen)),
                                      "privacy_spent": list(agent.privacy_spent())}
    return out


def slope(ts: list[int], ys: list[float]) -> float:
    return float(np.polyfit(np.log(ts), np.log(ys), 1)[0])


def summarise(cells: dict, seeds: list[int]) -> dict:
    summary = {}
    for kname in KERNELS:
        for est, eps in METHODS:
            name = method_name(est, eps)
            per_seed = {s: [cells[f"{kname}-s{s}-T{t}"][name]["rmse"] for t in T_GRID] for s in seeds}
            slopes = [slope(T_GRID, v) for v in per_seed.values()]
            mean_rmse = np.mean(list(per_seed.values()), axis=0)
            regret = np.mean([[cells[f"{kname}-s{s}-T{t}"][name]["simple_regret"] for t in T_GRID] for s in seeds], 0)
            summary[f"{kname}/{name}"] = {
                "rmse_mean": mean_rmse.round(5).tolist(), "simple_regret_mean": regret.round(5).tolist(),
                "slope_mean": round(float(np.mean(slopes)), 3), "slope_std": round(float(np.std(slopes)), 3)}
    return summary


def plot(summary: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    import io

    for kname in KERNELS:
        fig = Figure(figsize=(7.5, 5), dpi=100)
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        for est, style in (("covariance", "-o"), ("ridge", "--s")):
            for i, eps in enumerate(EPSILONS):
                y = summary[f"{kname}/{method_name(est, eps)}"]["rmse_mean"]
                ax.loglog(T_GRID, y, style, color=f"C{i}", label=method_name(est, eps), markersize=4)
        y0 = summary[f"{kname}/covariance-eps1"]["rmse_mean"][0]
        for s, lab in zip(BOUND_SLOPES[kname], ("sqrt(gamma/T)", "gamma/(T eps)")):
            ax.loglog(T_GRID, [y0 * (t / T_GRID[0]) ** s for t in T_GRID], ":", color="gray")
            ax.text(T_GRID[-1], y0 * (T_GRID[-1] / T_GRID[0]) ** s, f"slope {s:.2f} ({lab})", fontsize=7)
        ax.set_xlabel("T (exploration rounds)")
        ax.set_ylabel("held-out rmse ||f_hat - f||")
        ax.set_title(f"{kname}: private release error vs T")
        ax.legend(fontsize=7, ncol=2)
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png")
        atomic_write_bytes(OUT / f"rate_{kname}.png", buf.getvalue())


def run_audits(n_draws: int) -> list[dict]:
    kernel, arms = rbf(0.2), Arms.grid(0.0, 1.0, 4)
    marks = landmarks(arms, 0.0, 1.0, 8, np.random.default_rng(0))
    phi = nystrom_features(kernel, marks)
    rows = []
    for eps in EPSILONS[:-1]:
        for mult in (1.0, 0.3):
            est = CovarianceEstimator(phi, 8, epsilon=eps, delta=1e-5, noise_multiplier=mult)
            for kind in ("reward", "context"):
                r = audit(est, *worst_case_neighbours(est, marks, 40, kind), n_draws=n_draws, seed=1)
                rows.append({"epsilon": eps, "noise_multiplier": mult, "neighbours": kind,
                             "epsilon_lower": round(r.epsilon_lower, 3), "tpr": r.tpr, "fpr": r.fpr})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--audit-draws", type=int, default=200_000)
    ap.add_argument("--summary-only", action="store_true")
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    cells_path = OUT / "cells.json"
    cells = json.loads(cells_path.read_text()) if cells_path.exists() else {}
    start = time.time()
    if not args.summary_only:
        for kname in KERNELS:
            for s in seeds:
                for t in T_GRID:
                    key = f"{kname}-s{s}-T{t}"
                    if key not in cells:
                        cells[key] = run_cell(kname, s, t)
                        atomic_write_text(cells_path, json.dumps(cells, indent=1))
                        print(f"{key} done ({time.time() - start:.0f}s)", flush=True)
    summary = summarise(cells, seeds)
    audits = json.loads((OUT / "audit.json").read_text()) if (OUT / "audit.json").exists() else None
    if audits is None and not args.summary_only:
        audits = run_audits(args.audit_draws)
        atomic_write_text(OUT / "audit.json", json.dumps(audits, indent=1))
    atomic_write_text(OUT / "summary.json", json.dumps({"T": T_GRID, "seeds": seeds, "bound_slopes": BOUND_SLOPES,
                                                        "methods": summary, "audit": audits}, indent=1))
    plot(summary)
    for k, v in summary.items():
        print(f"{k:28s} slope {v['slope_mean']:+.3f} +- {v['slope_std']:.3f}  rmse {v['rmse_mean']}  "
              f"regret {v['simple_regret_mean']}")
    for row in audits or []:
        print(row)


if __name__ == "__main__":
    main()
