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

    ``progress(k)``, when given, is called after each batch of k samples. Writes a grid of the first samples when asked (images: one column per prompt; text outputs:
    their world's picture of them), and for text outputs the texts, one a line, to
    ``samples_path``.
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


def _grid(model, outputs: Tensor, texts: list[str] | None, prompts: list[str], labels: list[str] | None, path: Path) -> None:
    from rewardiff.report import save_grid

    if texts is None:
        k = min(IMAGE_GRID, len(outputs))
        # one column per prompt (they cycle), so a column reads as one prompt across seeds
        save_grid(outputs[:k].cpu(), path, nrow=min(8, len(set(prompts))), labels=labels[:k] if labels else None)
    elif getattr(model, "world", None) in plugins.TEXT_GRIDS:
        draw = plugins.load(plugins.TEXT_GRIDS[model.world])
        draw(texts[:TEXT_GRID], path, legends=labels[:TEXT_GRID] if labels else None)
