"""Evaluation on a fixed set of prompts and seeds: the reward, the worlds' judges, diversity, a grid.

The generic part measures the reward and, for images, their diversity; every world's
evaluation hook (``rewardiff.plugins.EVALUATIONS``) then adds what its judge reads where it
applies: the shapes world's classical counter on shapes prompts, RDKit's chemistry on
molecules. No judge feeds any reward, so a rising reward with a flat or falling judge is
reward hacking, and the report shows it as such.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from rewardiff import plugins
from rewardiff.io import atomic_write_text
from rewardiff.types import Evaluation, Reward

TEXT_GRID = 24  # text outputs (molecules) drawn in an evaluation's grid
IMAGE_GRID = 48  # images in an evaluation's grid
GRID_COLUMNS = 8  # columns of an evaluation's image grid: one prompt each


def world_evaluations(model, outputs: Tensor, prompts: list[str], reward_name: str = "") -> Evaluation:
    """Every registered world hook that applies, merged (the first hook's labels win)."""
    metrics: dict[str, float] = {}
    labels = None
    for target in plugins.EVALUATIONS.values():
        ev = plugins.load(target)(model, outputs, prompts, reward_name)
        if ev is not None:
            metrics.update(ev.metrics)
            labels = labels or ev.labels
    return Evaluation(metrics, labels)


def reward_summary(reward: Reward, outputs: Tensor, prompts: list[str]) -> dict[str, float]:
    """``reward_mean`` and ``reward_std`` of ``outputs``, scored 64 at a time."""
    r = torch.cat([reward(outputs[i : i + 64], prompts[i : i + 64]) for i in range(0, len(prompts), 64)]).float()
    return {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if len(r) > 1 else 0.0}


@torch.no_grad()
def evaluate(model, reward: Reward | None, prompts: list[str], seeds: list[int], *, num_inference_steps: int,
             guidance_scale: float, reward_name: str = "", grid_path: Path | None = None,
             samples_path: Path | None = None, progress=None) -> dict[str, float]:
    """Sample the fixed set and measure it.

    ``progress(k)``, when given, is called after each batch of k samples. Writes a grid of the
    first samples when asked (images: one column per prompt, see :func:`grid_columns`; text
    outputs: their world's picture of them) with its legend beside it, and for text outputs the
    texts, one a line, to ``samples_path``.
    """
    from rewardiff.report import diversity_by_prompt

    outputs = model.generate(prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                             progress=progress)
    outputs = outputs.to(model.device)
    texts = model.texts(outputs) if model.texts is not None else None
    out: dict[str, float] = {} if texts is not None else {"diversity": diversity_by_prompt(outputs, prompts)}
    if reward is not None:
        out.update(reward_summary(reward, outputs, prompts))
    ev = world_evaluations(model, outputs, prompts, reward_name)
    out.update(ev.metrics)
    if texts is not None and samples_path is not None:
        atomic_write_text(samples_path, "\n".join(texts) + "\n")
    if grid_path is not None:
        _grid(model, outputs, texts, prompts, ev.labels, grid_path)
    return out


def grid_columns(prompts: list[str], limit: int = IMAGE_GRID, max_columns: int = GRID_COLUMNS) -> tuple[list[str], list[int]]:
    """The prompt of each column of an evaluation's image grid, and the samples it shows, row by row.

    One column per prompt, in the order the prompts first appear (the first ``max_columns`` of
    them), each holding that prompt's samples in order, as deep as every column can go within
    ``limit`` images; so a column reads as one prompt across seeds. Samples of a single prompt
    fill ``max_columns`` columns instead.

    >>> grid_columns(["a", "b", "c", "a", "b", "c", "a"], limit=6, max_columns=2)
    (['a', 'b'], [0, 1, 3, 4])
    """
    columns = list(dict.fromkeys(prompts))[: max(1, min(max_columns, limit))]
    if len(columns) == 1:
        shown = list(range(min(limit, len(prompts))))
        return columns * min(max_columns, len(shown)), shown
    rows = {p: [i for i, q in enumerate(prompts) if q == p] for p in columns}
    depth = min(min(len(r) for r in rows.values()), limit // len(columns))
    return columns, [rows[p][d] for d in range(depth) for p in columns]


def _grid(model, outputs: Tensor, texts: list[str] | None, prompts: list[str], labels: list[str] | None, path: Path) -> None:
    """The grid at ``path`` and its legend beside it (``path`` with ``.json``): ``samples`` (the
    evaluation's), ``shown`` (the grid's), and for images ``columns``, the prompt of each column."""
    from rewardiff.report import save_grid
    from rewardiff.report.strict import write_json

    if texts is None:
        columns, shown = grid_columns(prompts)
        save_grid(outputs[shown].cpu(), path, nrow=len(columns), labels=[labels[i] for i in shown] if labels else None)
        write_json(path.with_suffix(".json"), {"samples": len(prompts), "shown": len(shown), "columns": columns})
    elif getattr(model, "world", None) in plugins.TEXT_GRIDS:
        draw = plugins.load(plugins.TEXT_GRIDS[model.world])
        draw(texts[:TEXT_GRID], path, legends=labels[:TEXT_GRID] if labels else None)
        write_json(path.with_suffix(".json"), {"samples": len(texts), "shown": min(TEXT_GRID, len(texts))})
