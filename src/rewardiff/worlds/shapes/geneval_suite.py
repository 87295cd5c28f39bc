"""GenEval in miniature for the shapes world: the ``geneval-shapes`` reward and ``rewardiff eval geneval-shapes``.

The reward and the evaluation read images with the world's classical judge
(:func:`rewardiff.worlds.shapes.judge.detect`) and score them by GenEval's rules
(:mod:`rewardiff.geneval`); prompts are those of the GenEval grammar
(:mod:`~rewardiff.worlds.shapes.compositions`) or the counting world's.
"""

from __future__ import annotations

import math
from itertools import zip_longest
from pathlib import Path
from typing import Any

import numpy as np

from rewardiff.errors import UserError
from rewardiff.geneval import GenEvalSpec, summarize
from rewardiff.worlds.shapes import compositions

SPLITS = {"held-out": compositions.held_out_prompts, "train": compositions.train_prompts, "all": compositions.all_prompts}
GRID_PER_TASK = 8  # samples of each task in grid.png, one row a task
PRETRAIN_HINT = "rewardiff pretrain shapes-geneval"


def _spec_for(prompt: str) -> GenEvalSpec:
    try:
        return compositions.spec_of(prompt)
    except ValueError as e:
        raise UserError(f"reward geneval-shapes: {e}") from None


def geneval_shapes(strict: bool = False):
    """Shapes world: GenEval's rules read by the judge; flow_grpo's partial credit in [0, 1] (strict: 1/0)."""
    from rewardiff.geneval import geneval_reward
    from rewardiff.worlds.shapes.judge import detect

    return geneval_reward(detect, _spec_for, strict=strict, name="geneval-shapes-strict" if strict else "geneval-shapes")


def geneval_shapes_strict():
    """Shapes world: 1 when GenEval's rules hold for the judge's reading of the image, else 0."""
    return geneval_shapes(strict=True)


# ----------------------------------------------------------------------------- rewardiff eval geneval-shapes


def _check_args(split: str, n: int, steps: int, guidance_scale: float | None, eta: float, seed: int, prompts: int) -> None:
    from rewardiff.finetune.config import MAX_SEED

    if split not in SPLITS:
        raise UserError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise UserError(f"--guidance-scale must be a number >= 0, got {guidance_scale}")
    if not (math.isfinite(eta) and 0 <= eta <= 1):
        raise UserError(f"--eta must be in [0, 1], got {eta}")
    if not 0 <= seed <= MAX_SEED - n * prompts:
        raise UserError(f"--seed must be between 0 and {MAX_SEED - n * prompts}, got {seed}")


def _load(model: str, checkpoint: Path | None, prompts: list[str]):
    """The model to evaluate; a one-line UserError when it cannot read the grammar's words."""
    from rewardiff.sampling import load_model

    m = load_model(model, checkpoint)
    if getattr(m, "world", None) != "shapes" or m.texts is not None:
        raise UserError(f"the geneval-shapes suite evaluates shapes-world image models; {model!r} is not one")
    try:
        if m.check_prompts is not None:
            m.check_prompts(prompts)
    except UserError as e:
        raise UserError(f"model {m.name!r} cannot read the GenEval prompts: its vocabulary lacks the GenEval words "
                        f"({e}); train a model that has them with: {PRETRAIN_HINT}") from None
    return m


def evaluate(out: Path, model: str = "shapes-geneval", checkpoint: Path | None = None, split: str = "held-out", n: int = 4,
             steps: int = 15, guidance_scale: float | None = None, eta: float = 0.0, seed: int = 10_000) -> dict[str, Any]:
    """Sample every prompt of ``split`` ``n`` times (seeds ``seed``, ``seed`` + 1, ...), judge
    them, write ``out/geneval.json`` and ``out/grid.png``; returns the summary."""
    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json
    from rewardiff.sampling import progress_bar, resolve_guidance_scale
    from rewardiff.worlds.shapes.judge import geneval_judge

    pool = SPLITS[split]() if split in SPLITS else []
    _check_args(split, n, steps, guidance_scale, eta, seed, len(pool))
    m = _load(model, checkpoint, pool)
    scale = resolve_guidance_scale(m, guidance_scale)
    prompts = [p for p in pool for _ in range(n)]
    with progress_bar(len(prompts), "sampling (geneval-shapes)") as bar:
        images = m.generate(prompts, [seed + i for i in range(len(prompts))], num_inference_steps=steps,
                            guidance_scale=scale, eta=eta, progress=bar)
    verdict = geneval_judge(images, prompts)
    summary = {"suite": "geneval-shapes", "model": str(checkpoint) if checkpoint is not None else model, "split": split,
               "prompts": len(pool), "n_per_prompt": n, "steps": steps, "guidance_scale": scale, "eta": eta, "seed": seed,
               **summarize(verdict["specs"], verdict["correct"], verdict["partial"]), **stamp()}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "geneval.json", summary)
    _grid(images, verdict, out / "grid.png")
    return summary


def _grid(images, verdict: dict, path: Path) -> None:
    """A row a task of up to :data:`GRID_PER_TASK` samples, one a prompt in turn, labelled ok / x
    (the first also with its task)."""
    from rewardiff.report import save_grid
    from rewardiff.report.grid import BACKGROUND, to_uint8_hwc

    arr = to_uint8_hwc(images)
    blank = np.full(arr.shape[1:], BACKGROUND, np.uint8)
    cells, labels = [], []
    tags = [s.tag for s in verdict["specs"]]
    for tag in dict.fromkeys(tags):
        idx = [i for i, t in enumerate(tags) if t == tag]
        by_prompt: dict[str, list[int]] = {}
        for i in idx:
            by_prompt.setdefault(verdict["specs"][i].prompt, []).append(i)
        rounds = zip_longest(*by_prompt.values())  # the first sample of each prompt, then the second, ...
        pick = [i for r in rounds for i in r if i is not None][:GRID_PER_TASK]
        cells += [arr[i] for i in pick] + [blank] * (GRID_PER_TASK - len(pick))
        marks = ["ok" if verdict["correct"][i] else "x" for i in pick]
        labels += [f"{marks[0]} {tag}", *marks[1:]] + [None] * (GRID_PER_TASK - len(pick))
    save_grid(np.stack(cells), path, nrow=GRID_PER_TASK, labels=labels)


def table(summary: dict[str, Any]) -> str:
    """The per-task table ``rewardiff eval`` prints."""
    rows = [f"{'task':16s} {'accuracy':>9s} {'partial':>8s} {'images':>7s}"]
    rows += [f"{t:16s} {v['accuracy']:9.1%} {v['partial']:8.3f} {v['n']:7d}" for t, v in summary["tasks"].items()]
    rows.append(f"{'overall':16s} {summary['overall']:9.1%} {summary['partial']:8.3f} {summary['images']:7d}"
                "   (mean over tasks, as GenEval)")
    return "\n".join(rows)


def eval_command(out: Path, model: str, checkpoint: Path | None, split: str, n: int, steps: int,
                 guidance_scale: float | None, eta: float, seed: int) -> str:
    """``rewardiff eval geneval-shapes``: what it prints (the table and where the files are)."""
    summary = evaluate(out, model, checkpoint, split, n, steps, guidance_scale, eta, seed)
    return table(summary) + f"\nsummary: {out / 'geneval.json'}; samples: {out / 'grid.png'}"


def card_measure(model, n_per_prompt: int, steps: int, guidance_scale: float, seed: int) -> dict[str, float]:
    """GenEval held-out accuracy of a model for its card: ``judge_geneval_<task>_held_out``,
    ``judge_geneval_overall_held_out`` and ``judge_geneval_partial_held_out``."""
    from rewardiff.worlds.shapes.judge import geneval_accuracy

    prompts = [p for p in compositions.held_out_prompts() for _ in range(n_per_prompt)]
    images = model.generate(prompts, [seed + i for i in range(len(prompts))], num_inference_steps=steps,
                            guidance_scale=guidance_scale)
    s = geneval_accuracy(images, prompts)
    res = {f"judge_geneval_{t}_held_out": d["accuracy"] for t, d in s["tasks"].items()}
    return {**res, "judge_geneval_overall_held_out": s["overall"], "judge_geneval_partial_held_out": s["partial"]}
