"""``rewardiff sample``: sample a model to a directory, scored by a reward when given."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.models.base import DiffusionModel


def load_model(model: str, checkpoint: Path | None = None) -> DiffusionModel:
    """The base model by name, or the fine-tuned model in ``checkpoint``."""
    from rewardiff.finetune.weights import base_model, load_finetuned

    if checkpoint is not None:
        return load_finetuned(checkpoint)
    return base_model(model)


def parse_options(items: list[str] | None) -> dict[str, Any]:
    """``["alpha=0.1", "final=sample"]`` -> ``{"alpha": 0.1, "final": "sample"}`` (ints, floats,
    true/false and inf are typed; anything else stays a string)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UserError(f"--option must look like key=value, got {item!r}")
        val: Any = raw.strip()
        low = val.lower()
        if low in ("true", "false"):
            val = low == "true"
        else:
            for conv in (int, float):
                try:
                    val = conv(val)
                    break
                except ValueError:
                    pass
        out[key] = val
    return out


def sample_to_dir(out: Path, model: str, checkpoint: Path | None, prompts: list[str], n: int, seed: int,
                  reward: str | None, steps: int, guidance_scale: float, eta: float | None, method: str = "base",
                  width: int | None = None, nfe_budget: int | None = None, value: Path | None = None,
                  options: dict[str, Any] | None = None) -> dict:
    """Sample with ``method`` and write ``grid.png``, ``samples/NNNN.png`` and ``summary.json`` into ``out``
    (for a model of text outputs, e.g. molecules, ``samples.txt`` instead of the images, and
    for molecules ``grid.png`` of their drawings).

    The summary holds ``nfe`` (denoiser evaluations, classifier-free guidance counting 2),
    ``nfe_per_sample``, with a reward ``reward_mean`` and ``reward_std``, and for text outputs
    ``texts``. An unconditional model samples with "" for every prompt and no classifier-free
    guidance (guidance scale 1).
    """
    from PIL import Image

    from rewardiff.guidance import budget_plan, guided_sample, make_method
    from rewardiff.guidance.value import load_value
    from rewardiff.report import save_grid
    from rewardiff.rewards import get_reward
    from rewardiff.worlds import shapes

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta must be in [0, 1], got {eta}")
    if width is not None and nfe_budget is not None:
        raise UserError("give --width or --nfe-budget, not both")
    reward_fn = get_reward(reward) if reward else None
    value_fn = load_value(value) if value is not None else None
    meth = make_method(method, reward_fn, width=width, seed=seed, value=value_fn, **(options or {}))
    m = load_model(model, checkpoint)
    if not m.conditional:  # prompts and classifier-free guidance mean nothing to it
        prompts, guidance_scale = [""] * len(prompts), 1.0
    if nfe_budget is not None:
        budget_plan(meth, nfe_budget, steps, guidance_scale)
    meth.check(meth.default_eta if eta is None else eta)
    if m.name == "shapes":  # the shapes world's text encoder knows its own words only
        try:
            shapes.tokenize(prompts)
        except ValueError as e:
            raise UserError(str(e)) from None
    all_prompts = [p for p in prompts for _ in range(n)]
    seeds = [seed + i for i in range(len(all_prompts))]
    with progress_bar(len(all_prompts), f"sampling ({meth.name})") as bar:
        x, info = guided_sample(m, meth, all_prompts, seeds, steps, guidance_scale=guidance_scale, eta=eta, progress=bar)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"prompts": prompts, "n": len(all_prompts), **info}
    if m.texts is not None:
        summary["texts"] = m.texts(x)
        atomic_write_text(out / "samples.txt", "\n".join(summary["texts"]) + "\n")
        if m.name.startswith("molecules"):  # SMILES: their drawings, 48 at most
            from rewardiff.report.molecules import save_molecule_grid

            save_molecule_grid(summary["texts"][:48], out / "grid.png")
    else:
        (out / "samples").mkdir(exist_ok=True)
        for i, im in enumerate(shapes.to_uint8(x)):  # any [-1, 1] RGB batch
            Image.fromarray(im).save(out / "samples" / f"{i:04d}.png")
        save_grid(x, out / "grid.png", nrow=n if n <= 16 else 16)
    if nfe_budget is not None:
        summary["nfe_budget"] = nfe_budget
    if reward_fn is not None:
        with torch.no_grad():
            r = reward_fn(x, all_prompts)
        summary.update(reward=reward, reward_mean=float(r.mean()), reward_std=float(r.std()) if len(r) > 1 else 0.0)
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


class progress_bar:
    """A tqdm bar on a terminal (silent otherwise); ``bar(k)`` advances it by k."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.bar = total, desc, None

    def __enter__(self):
        import sys

        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="sample")
        return self

    def __call__(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
