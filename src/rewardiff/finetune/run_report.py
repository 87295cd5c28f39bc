"""report.html of a fine-tuning run: curves, before/after grids, the judge, diversity (token
models: RDKit's measures of the molecules and their drawings)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rewardiff.finetune.config import FinetuneConfig

_ROWS = [
    ("eval_reward_mean", "reward (held-out set)"),
    ("eval_judge_count", "judge: count correct"),
    ("eval_judge_color", "judge: color correct"),
    ("eval_judge_both", "judge: count and color"),
    ("eval_diversity", "diversity (pairwise RMS within a prompt)"),
    ("eval_kl_to_base", "KL to the base model (nats per sample, eta = 1 paths)"),
]
# not on the judge/diversity axes (other scales)
_OWN_AXES = ("eval_reward_mean", "eval_reward_std", "eval_kl_to_base", "eval_true_reward_mean", "eval_fcd", "eval_fcd_n", "eval_heavy_atoms_mean")
_TOKEN_ROWS = [
    ("eval_reward_mean", "training reward (fixed seeds)"),
    ("eval_true_reward_mean", "true reward: RDKit's value of what the reward model predicts"),
    ("eval_qed", "QED (RDKit)"),
    ("eval_sa", "SA as (10 - SA) / 9 (RDKit)"),
    ("eval_validity", "validity"),
    ("eval_uniqueness", "uniqueness"),
    ("eval_novelty", "novelty against the training molecules"),
    ("eval_fcd", "FCD to the held-out molecules (ChemNet; biased up at small counts)"),
    ("eval_fcd_n", "valid molecules FCD was measured on"),
    ("eval_internal_diversity", "internal diversity (1 - Tanimoto, Morgan r2 2048)"),
    ("eval_aromatic_fraction", "share of molecules with an aromatic ring"),
    ("eval_qed_w1", "QED: Wasserstein-1 to the held-out molecules"),
    ("eval_heavy_atoms_mean", "heavy atoms, mean"),
    ("eval_kl_to_base", "KL to the base model (nats per sample, on its own samples)"),
]


# labels of the measures other worlds' judges give (any other eval_* measure is shown under its own name)
_LABELS = {
    "eval_judge_geneval_overall": "judge: GenEval overall accuracy (mean over the tasks)",
    "eval_judge_geneval_partial": "judge: GenEval partial credit",
    "eval_hallucination_rate": "judge: share of images with a hallucination",
    "eval_hallucination_count": "judge: hallucinations an image",
    "eval_psnr": "PSNR to the ground truth (dB)",
    "eval_ssim": "SSIM to the ground truth",
    "eval_sharpness": "sharpness (gradient magnitude over the truth's; below 1 is blurrier)",
}
# what the judge of a run is, by a measure only its world reports
_JUDGES = {
    "eval_hallucination_rate": "The judge counts the objects of each super-resolved image that the ground truth does not hold "
                               "(extra, missing, merged, split, recoloured, of the wrong kind); no reward uses it. A reward "
                               "that rises while the count does not fall is reward hacking; a falling sharpness is blur.",
    "eval_judge_geneval_overall": "The judge is the GenEval rule set (object counts, colours and positions read by classical "
                                  "segmentation), which no learned reward sees. A reward that rises while the judge's "
                                  "accuracy does not is reward hacking.",
}
_JUDGE = ("The judge is a classical counter (color segmentation and connected components) that no reward uses. "
          "A reward that rises while the judge's accuracy does not is reward hacking.")


def _rows(before: dict) -> list[tuple[str, str]]:
    """The measures of the run: a token model's when its evaluation has a validity; then every
    other measure ``before`` holds (a world's judge), labelled where known; the KL last."""
    rows = _TOKEN_ROWS if "eval_validity" in before else _ROWS
    known = {k for k, _ in rows}
    extra = [(k, _LABELS.get(k, k.removeprefix("eval_").replace("_", " "))) for k in before
             if k.startswith("eval_") and k not in known]
    return [*rows[:-1], *[r for r in extra if r[0] in _LABELS], *[r for r in extra if r[0] not in _LABELS], rows[-1]]


def _finite(v: Any) -> bool:
    """A measured value: a number, neither None (strict JSON's NaN) nor NaN nor infinite."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _fmt(v: Any) -> str:
    return f"{v:.3f}" if _finite(v) else "n/a"


def comparison_table(before: dict, after: dict) -> list[list[str]]:
    """Rows of (measure, before, after); "n/a" for a measure with no value (NaN, or null in JSON)."""
    rows = [["measure", "before", "after"]]
    for key, label in _rows(before):
        if key in before and key in after:
            rows.append([label, _fmt(before[key]), _fmt(after[key])])
    return rows


def eval_series(metrics: list[dict], before: dict, after: dict) -> dict[str, list[tuple[int, float]]]:
    """The held-out measures that share one 0-1 axis (judge accuracies and rates, diversity), as
    (step, value) at step 0, at each periodic evaluation and at the end, by label; measures of
    other scales (PSNR, KL, counts above one) and those that stay at zero are left to the table."""
    last = metrics[-1]["step"] if metrics else 0
    points = [(0, before)] + [(r["step"], r) for r in metrics if any(k.startswith("eval_") for k in r)] + [(last, after)]
    series = {label: [(s, e[key]) for s, e in points if _finite(e.get(key))] for key, label in _rows(before) if key not in _OWN_AXES}
    return {k: v for k, v in series.items() if v and all(0.0 <= y <= 1.0 for _, y in v) and any(y for _, y in v)}


def eval_curve(out: Path, metrics: list[dict], before: dict, after: dict) -> Path:
    """Plot :func:`eval_series` to ``eval_curve.png``."""
    from rewardiff.report import plot_curves

    path = out / "eval_curve.png"
    plot_curves(eval_series(metrics, before, after), path, "step", "held-out value", "held-out evaluations")
    return path


def kl_curve(out: Path, metrics: list[dict], before: dict, after: dict) -> Path | None:
    """Plot the held-out KL to the base model at each evaluation (None when never measured)."""
    from rewardiff.report import plot_curves

    last = metrics[-1]["step"] if metrics else 0
    points = [(0, before)] + [(r["step"], r) for r in metrics if "eval_kl_to_base" in r] + [(last, after)]
    series = [(s, e["eval_kl_to_base"]) for s, e in points if _finite(e.get("eval_kl_to_base"))]
    if not series:
        return None
    path = out / "kl_curve.png"
    plot_curves({"KL to the base model": series}, path, "step", "nats per sample", "distance from the base model")
    return path


def write_summary(out: Path, cfg: FinetuneConfig, summary: dict) -> Path:
    """The end of a run: ``eval_after.json`` and ``summary.json`` as strict JSON (a measure with
    no value, e.g. a diversity where no prompt has two samples, is ``null``), then ``report.html``,
    whose path it returns."""
    from rewardiff.report.strict import write_json

    write_json(out / "eval_after.json", summary["after"])
    write_json(out / "summary.json", summary)
    return write_run_report(out, cfg, summary["before"], summary["after"])


def grid_legend(out: Path, tag: str) -> tuple[str, list[list[Any]] | None]:
    """What the grid ``samples_{tag}.png`` shows, from the legend written beside it: a sentence
    ("48 of the evaluation's 96 samples") and a table of the prompt of each column (None for
    text outputs, or when the legend is missing, as in runs older than it)."""
    path = out / f"samples_{tag}.json"
    if not path.is_file():
        return "", None
    legend = json.loads(path.read_text())
    shown = f"{legend['shown']} of the evaluation's {legend['samples']} samples"
    columns = legend.get("columns")
    if not columns:
        return shown + ".", None
    if len(set(columns)) == 1:
        return f"{shown}, all of one prompt: {columns[0]!r}." if columns[0] else f"{shown} (unconditional).", None
    depth = legend["shown"] // len(columns)
    text = f"{shown}: one column per prompt, its first {depth} samples down the column."
    return text, [["column", "prompt"], *[[i + 1, p] for i, p in enumerate(columns)]]


def _samples_section(out: Path, tag: str, heading: str, text: str) -> Any:
    from rewardiff.report import Section

    shown, table = grid_legend(out, tag)
    return Section(heading, f"{shown} {text}".strip(), images=[out / f"samples_{tag}.png"], table=table)


def write_run_report(out: Path, cfg: FinetuneConfig, before: dict, after: dict) -> Path:
    from rewardiff.report import Section, plot_reward_curve, read_metrics, write_report

    metrics = read_metrics(out)
    curve = out / "reward_curve.png"
    plot_reward_curve(metrics, curve)
    evals = eval_curve(out, metrics, before, after)
    kl = kl_curve(out, metrics, before, after)
    if "eval_validity" in before:
        return _write_token_report(out, cfg, before, after, [curve, evals], kl)
    text = next((t for k, t in _JUDGES.items() if k in before), _JUDGE)
    sections = [
        Section("Before and after, on fixed held-out prompts and seeds", text, table=comparison_table(before, after)),
        Section("Training reward", "Mean reward of each training batch, with held-out evaluations where run.", images=[curve]),
        Section("Held-out evaluations", "Judge accuracy and diversity on the fixed held-out set as training goes: "
                "falling diversity with a flat judge is the usual face of reward hacking.", images=[evals]),
        *([Section("Distance from the base model", "KL divergence of the fine-tuned sampler's paths (eta = 1) to the base "
                    "model's, on the held-out set: a KL that climbs while the held-out reward stalls is drift bought "
                    "for nothing.", images=[kl])] if kl else []),
        _samples_section(out, "before", "Samples before fine-tuning", "'ok' where the judge finds the sample right."),
        _samples_section(out, "after", "Samples after fine-tuning", "Same prompts and seeds as above."),
    ]
    return write_report(out, f"rewardiff fine-tuning: {cfg.method} on {cfg.reward}", sections, meta=_head(cfg))


def _head(cfg: FinetuneConfig) -> dict:
    return {"method": cfg.method, "reward": cfg.reward, "steps": cfg.steps, "batch": cfg.batch_size, "lr": cfg.lr,
            "lora_rank": cfg.lora_rank, "k": cfg.k, "kl_weight": cfg.kl_weight, "seed": cfg.seed}


def _write_token_report(out: Path, cfg: FinetuneConfig, before: dict, after: dict, curves: list[Path], kl: Path | None) -> Path:
    """The report of a token model (molecules): RDKit's measures and drawings instead of the judge."""
    from rewardiff.report import Section, write_report

    text = ("RDKit measures the molecules of the fixed seeds; training sees only the training reward. A training reward "
            "that rises more than its true RDKit value is reward hacking of the reward model; falling uniqueness or "
            "validity is collapse.")
    sections = [
        Section("Before and after, on fixed seeds", text, table=comparison_table(before, after)),
        Section("Training reward and held-out evaluations", "Mean reward of each training batch; RDKit measures of "
                "the fixed seeds as training goes.", images=curves),
        *([Section("Distance from the base model", "KL of the fine-tuned model's sequences to the base model's, "
                   "on the fine-tuned model's own samples.", images=[kl])] if kl else []),
        _samples_section(out, "before", "Molecules before fine-tuning", "The first samples of the fixed seeds, with their QED; "
                         "every SMILES is in samples_before.txt."),
        _samples_section(out, "after", "Molecules after fine-tuning", "Same seeds; every SMILES is in samples_after.txt."),
    ]
    model = {"model": cfg.model, **({"gumbel_tau": cfg.gumbel_tau, "gumbel_estimator": cfg.gumbel_estimator} if cfg.method == "gumbel" else {})}
    return write_report(out, f"rewardiff fine-tuning: {cfg.method} on {cfg.reward}", sections, meta={**model, **_head(cfg)})
