"""What ``rewardiff tune`` reports: summary.json, the regret plot, the sample grid and report.html.

Per agent: cumulative regret after the stream and simple regret of the settings it would pick
per prompt (mean and standard deviation over stream seeds), the privacy it spent, its picks
against the bank's best arm, and the world judge's accuracy on the bank samples of its picks
beside the base sampler's.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from rewardiff.tune import BASE, Bank, TuneConfig, load_cell_images, simple_regret

DEFAULT_GUIDANCE_SCALE = 2.0  # the base arm nearest this guidance scale is the reference sampler


def _spread(values: np.ndarray) -> dict[str, Any]:
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "per_seed": v.tolist()}


def reference_arm(bank: Bank) -> int | None:
    """The base arm whose guidance scale is nearest :data:`DEFAULT_GUIDANCE_SCALE` (the lower on a tie), or None."""
    base = [j for j, a in enumerate(bank.arms) if a.method == BASE]
    return min(base, key=lambda j: (abs(bank.arms[j].guidance_scale - DEFAULT_GUIDANCE_SCALE), bank.arms[j].guidance_scale),
               default=None)


def _read(bank: Bank, chosen: np.ndarray) -> dict[str, float]:
    """Mean rating and judge measures over prompts of the cells ``chosen`` [P] (or [S, P], averaged over seeds too)."""
    chosen = np.atleast_2d(chosen)
    rows = np.arange(chosen.shape[1])[None]
    out = {"rating": float(bank.means[rows, chosen].mean())}
    out.update({name: float(v[rows, chosen].mean()) for name, v in bank.judge.items()})
    return out


def summarize(cfg: TuneConfig, bank: Bank, results: dict[str, dict], seconds: dict[str, float]) -> dict:
    """The figures of a run (summary.json)."""
    from rewardiff.provenance import stamp

    best = bank.means.argmax(axis=1)
    names = [a.name for a in bank.arms]
    agents = {}
    for name, r in results.items():
        chosen = r["picks"]  # [S, P]
        agents[name] = {
            "cumulative_regret": _spread(r["regret"].sum(axis=1)),
            "simple_regret": _spread(np.array([simple_regret(bank, c) for c in chosen])),
            "privacy_spent": sorted({tuple(p) for p in r["privacy"]}),
            "picks_best_share": float((chosen == best[None]).mean()),
            "picks": {p: [names[c[i]] for c in chosen] for i, p in enumerate(bank.prompts)},
            "picked": _read(bank, chosen),
        }
    ref = reference_arm(bank)
    reference = {"bank_best": {"arms": {p: names[best[i]] for i, p in enumerate(bank.prompts)}, **_read(bank, best)}}
    if ref is not None:
        reference["base"] = {"arm": names[ref], **_read(bank, np.full(len(bank.prompts), ref))}
    return {"config": asdict(cfg), "explore_rounds": cfg.explore_rounds, "prompts": bank.prompts, "arms": names,
            "bank": {"cells": int(bank.means.size), "samples_per_cell": cfg.samples, "rating_range": list(bank.value_range),
                     "mean_rating": bank.means.tolist(), "judge": {k: v.tolist() for k, v in bank.judge.items()}},
            "agents": agents, "reference": reference, "seconds": seconds, **stamp()}


def _pm(d: dict) -> str:
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def _privacy(spent: list) -> str:
    return "; ".join(f"({e:g}, {d:g})" for e, d in spent)


def _agent_rows(summary: dict, judge_names: list[str]) -> list[list[Any]]:
    rows = [["agent", "cumulative regret", "simple regret", "privacy spent (eps, delta)", "picks = best arm",
             "rating of picks", *judge_names]]
    for name, a in summary["agents"].items():
        rows.append([name, _pm(a["cumulative_regret"]), _pm(a["simple_regret"]), _privacy(a["privacy_spent"]),
                     f"{a['picks_best_share']:.0%}", a["picked"]["rating"], *[a["picked"][j] for j in judge_names]])
    ref = summary["reference"]
    for label, r in (("bank's best arm per prompt", ref["bank_best"]), (f"base sampler ({ref.get('base', {}).get('arm')})", ref.get("base"))):
        if r is not None:
            rows.append([label, "", "", "", "", r["rating"], *[r[j] for j in judge_names]])
    return rows


def _pick_rows(summary: dict, bank: Bank) -> list[list[Any]]:
    agents = list(summary["agents"])
    rows = [["prompt", "bank's best arm (mean rating)", *[f"{a} (seed {summary['config']['seeds'][0]})" for a in agents]]]
    names = summary["arms"]
    for i, p in enumerate(bank.prompts):
        best = summary["reference"]["bank_best"]["arms"][p]
        cells = []
        for a in agents:
            pick = summary["agents"][a]["picks"][p][0]
            cells.append("= best" if pick == best else f"{pick} ({bank.means[i, names.index(pick)]:.3f})")
        rows.append([p, f"{best} ({bank.means[i].max():.3f})", *cells])
    return rows


def _bank_rows(bank: Bank, judge_names: list[str]) -> list[list[Any]]:
    best = bank.means.argmax(axis=1)
    rows = [["arm", "mean rating", "best for prompts", *judge_names]]
    for j, a in enumerate(bank.arms):
        rows.append([a.name, float(bank.means[:, j].mean()), int((best == j).sum()), *[float(bank.judge[n][:, j].mean()) for n in judge_names]])
    return rows


def save_bank_grid(out: Path, bank: Bank, path: Path) -> Path | None:
    """A row per prompt: the reference base arm's K bank samples, then the bank's best arm's."""
    from rewardiff.report import save_grid

    ref = reference_arm(bank)
    if ref is None:
        return None
    best = bank.means.argmax(axis=1)
    cells, labels = [], []
    for i, p in enumerate(bank.prompts):
        for j, label in ((ref, p), (int(best[i]), bank.arms[int(best[i])].name)):
            imgs = load_cell_images(out, i, j)
            cells.extend(imgs)
            labels.extend([label] + [None] * (len(imgs) - 1))
    return save_grid(np.stack(cells), path, nrow=2 * bank.ratings.shape[2], labels=labels)


def write_tune_report(out: Path, cfg: TuneConfig, bank: Bank, results: dict[str, dict], summary: dict) -> None:
    """``summary.json``, ``regret.png``, ``grid.png`` and ``report.html`` in ``out``."""
    from rewardiff.report import Section, plot_bands, write_json, write_report

    write_json(out / "summary.json", summary)
    plot_bands({n: np.cumsum(r["regret"], axis=1) for n, r in results.items()}, out / "regret.png", xlabel="round (user)",
               ylabel=f"cumulative regret ({cfg.rating})", title=f"mean over {len(cfg.seeds)} streams; band: lowest to highest")
    grid = save_bank_grid(out, bank, out / "grid.png")
    judge_names = sorted(bank.judge)
    s = summary["seconds"]
    sections = [
        Section("Cumulative regret", f"regret_t = max_a mean(p_t, a) - mean(p_t, a_t), in units of {cfg.rating}, the bank's mean "
                "over its samples of each (prompt, arm). Every agent plays the same streams (same prompts, bank draws and "
                f"noise). The private agent explores uniformly for {cfg.explore_rounds} rounds, releases one (eps, delta)-DP "
                "estimate, then plays greedily on it.", images=[out / "regret.png"]),
        Section("Agents", "Simple regret: the mean over prompts of the gap between the bank's best arm and the arm the "
                "agent's estimate ranks first after the stream. Judge columns: the world's judge (never used by the "
                "rating) on the bank samples of those picks, averaged over prompts and seeds.",
                table=_agent_rows(summary, judge_names)),
        Section("Picks per prompt", table=_pick_rows(summary, bank)),
        Section("The bank", f"{bank.means.size} cells of {cfg.samples} samples ({len(bank.prompts)} prompts x {len(bank.arms)} "
                f"arms), {s['bank_sampling']:.0f} s of sampling. Grid: per prompt, the base sampler's samples, then the best "
                "arm's.", images=[grid] if grid is not None else [], table=_bank_rows(bank, judge_names)),
    ]
    meta = {"model": cfg.model, "prompt set": cfg.prompt_set, "prompts": len(bank.prompts), "arms": len(bank.arms),
            "rating": cfg.rating, "steering reward": cfg.reward, "noise": cfg.noise, "rounds": cfg.rounds,
            "seeds": ",".join(map(str, cfg.seeds)), "epsilons": ",".join(f"{e:g}" for e in cfg.epsilons)}
    write_report(out, "rewardiff tune: which setting users prefer, learned privately", sections, meta)
