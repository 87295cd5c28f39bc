"""``rewardiff sample``: sample a model to a directory, scored by a reward when given."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rewardiff.errors import UserError
from rewardiff.models.base import DiffusionModel


def load_model(model: str, checkpoint: Path | None = None) -> DiffusionModel:
    """The base model by name, or the fine-tuned model in ``checkpoint``."""
    from rewardiff.finetune.weights import base_model, load_finetuned

    if checkpoint is not None:
        return load_finetuned(checkpoint)
    return base_model(model)


def sample_to_dir(out: Path, model: str, checkpoint: Path | None, prompts: list[str], n: int, seed: int,
                  reward: str | None, steps: int, guidance_scale: float, eta: float) -> dict:
    """Write ``grid.png``, ``samples/NNNN.png`` and ``summary.json`` into ``out``."""
    from PIL import Image

    from rewardiff.report import save_grid
    from rewardiff.rewards import get_reward
    from rewardiff.worlds import shapes

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    reward_fn = get_reward(reward) if reward else None
    try:
        shapes.tokenize(prompts)
    except ValueError as e:
        raise UserError(str(e)) from None
    m = load_model(model, checkpoint)
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(all_prompts))]
    nfe = 0
    images = []
    with torch.no_grad():
        for i in range(0, len(all_prompts), 64):
            traj = m.sample(all_prompts[i : i + 64], seeds[i : i + 64], steps, eta=eta, guidance_scale=guidance_scale)
            nfe += traj.nfe
            images.append(m.decode(traj.x0).clamp(-1, 1))
    x = torch.cat(images)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    for i, im in enumerate(shapes.to_uint8(x)):
        Image.fromarray(im).save(out / "samples" / f"{i:04d}.png")
    save_grid(x, out / "grid.png", nrow=n if n <= 16 else 16)
    summary: dict = {"prompts": prompts, "n": len(all_prompts), "nfe": nfe, "nfe_per_sample": nfe / len(all_prompts)}
    if reward_fn is not None:
        with torch.no_grad():
            r = reward_fn(x, all_prompts)
        summary.update(reward=reward, reward_mean=float(r.mean()), reward_std=float(r.std()) if len(r) > 1 else 0.0)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
