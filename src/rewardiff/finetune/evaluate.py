"""Evaluation on a fixed set of prompts and seeds: reward, the judge, diversity, a grid.

The judge (shapes world only) never feeds any reward, so a rising reward with a flat or
falling judge accuracy is reward hacking, and the report shows it as such. Token models
(molecules) are judged the same way by RDKit (:func:`evaluate_tokens`): the true QED and SA
of the samples, the true counterpart of a reward-model reward, validity, uniqueness, novelty.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rewardiff.models.base import DiffusionModel
from rewardiff.types import Reward
from rewardiff.worlds import shapes

EVAL_SEED = 10_000  # evaluation seeds are EVAL_SEED + i: never used by training (seeds < EVAL_SEED)


# Simple animals, as DDPO and AlignProp train on; the held-out ones are for evaluation only.
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
           "tiger", "bear", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat",
           "gorilla", "hedgehog", "kangaroo", "owl", "fox", "wolf", "squirrel", "mouse", "elephant", "giraffe"]
ANIMALS_HELD_OUT = ["panda", "koala", "penguin", "otter", "raccoon", "dolphin", "cheetah", "flamingo", "beaver"]


def prompt_set(spec: str) -> list[str]:
    """Prompts by name or from a file.

    Names: ``train``, ``held-out``, ``all`` (the shapes world), ``animals`` and
    ``animals-held-out`` (simple animals). Files: a text file with one prompt a line, or a
    JSON file holding a list of strings or ``{"prompts": [...]}``.
    """
    import json

    from rewardiff.errors import UserError

    named = {"train": shapes.train_prompts, "held-out": shapes.held_out_prompts, "all": lambda: [s.prompt for s in shapes.all_specs()],
             "animals": lambda: list(ANIMALS), "animals-held-out": lambda: list(ANIMALS_HELD_OUT)}
    if spec in named:
        return named[spec]()
    p = Path(spec)
    if not p.is_file():
        raise UserError(f"prompt set {spec!r} is neither {', '.join(named)} nor a file")
    if p.suffix == ".json":
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"prompt file {p} is not valid JSON: {e}") from None
        data = data.get("prompts") if isinstance(data, dict) else data
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise UserError(f"prompt file {p} must hold a list of strings or {{\"prompts\": [...]}}")
        prompts = [x.strip() for x in data if x.strip()]
    else:
        prompts = [line.strip() for line in p.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts")
    return prompts


def eval_set(prompts: list[str], n: int) -> tuple[list[str], list[int]]:
    """``n`` (prompt, seed) pairs cycling through ``prompts``; the same for every run."""
    return [prompts[i % len(prompts)] for i in range(n)], [EVAL_SEED + i for i in range(n)]


def is_shapes_prompt(prompt: str) -> bool:
    try:
        shapes.parse_prompt(prompt)
        return True
    except ValueError:
        return False


@torch.no_grad()
def evaluate(model: DiffusionModel, reward: Reward | None, prompts: list[str], seeds: list[int], *,
             num_inference_steps: int, guidance_scale: float, grid_path: Path | None = None) -> dict[str, float]:
    """Sample the fixed set and measure it; writes a grid of the first 48 samples when asked."""
    from rewardiff.report import diversity_by_prompt, save_grid
    from rewardiff.worlds.judge import judge

    images = model.generate(prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale)
    out: dict[str, float] = {"diversity": diversity_by_prompt(images, prompts)}
    labels = None
    if reward is not None:
        r = torch.cat([reward(images[i : i + 64], prompts[i : i + 64]) for i in range(0, len(prompts), 64)])
        out["reward_mean"], out["reward_std"] = float(r.mean()), float(r.std()) if len(r) > 1 else 0.0
    if all(is_shapes_prompt(p) for p in prompts):
        verdict = judge(images, prompts)
        out.update({f"judge_{k}": float(v.mean()) for k, v in verdict.items()})
        labels = ["ok" if c else "x" for c in verdict["count"]]
    if grid_path is not None:
        k = min(48, len(images))
        # one column per prompt (they cycle), so a column reads as one prompt across seeds
        save_grid(images[:k], grid_path, nrow=min(8, len(set(prompts))), labels=labels[:k] if labels else None)
    return out


# the RDKit reward that each reward-model reward stands in for
TRUE_REWARDS = {"chem-rm-qed": "qed", "chem-rm-sa": "sa", "chem-rm-logp": "logp", "chem-rm": "qed-sa"}
TOKEN_GRID = 24  # molecules drawn in a token model's sample grid


@torch.no_grad()
def evaluate_tokens(model, reward: Reward | None, seeds: list[int], *, num_inference_steps: int, reward_name: str = "",
                    samples_path: Path | None = None, grid_path: Path | None = None) -> dict[str, float]:
    """Sample a token model (molecules) at fixed seeds and measure the molecules with RDKit.

    Returns the training reward's mean (``reward_mean``), the true RDKit value of a
    reward-model reward (``true_reward_mean``, see ``TRUE_REWARDS``), mean QED and SA, and
    validity, uniqueness and novelty against the training molecules. Writes the SMILES (one a
    line) to ``samples_path`` and drawings of the first molecules to ``grid_path`` when asked.
    """
    from rewardiff.report.molecules import save_molecule_grid
    from rewardiff.rewards import get_reward
    from rewardiff.rewards.chem import property_values
    from rewardiff.worlds import molecules

    prompts = [""] * len(seeds)
    ids = model.generate(prompts, seeds, num_inference_steps=num_inference_steps, guidance_scale=1.0).to(model.device)
    smiles = model.texts(ids)
    qed = property_values("qed", smiles)
    out: dict[str, float] = {"qed": float(qed.mean()), "sa": float(property_values("sa", smiles).mean())}
    for key, fn in (("reward", reward), ("true_reward", get_reward(TRUE_REWARDS[reward_name]) if reward_name in TRUE_REWARDS else None)):
        if fn is not None:
            r = torch.cat([fn(ids[i : i + 64], prompts[i : i + 64]) for i in range(0, len(prompts), 64)]).float()
            out[f"{key}_mean"], out[f"{key}_std"] = float(r.mean()), float(r.std()) if len(r) > 1 else 0.0
    _, train = molecules.data("train")
    out.update(validity=molecules.validity(smiles), uniqueness=molecules.uniqueness(smiles), novelty=molecules.novelty(smiles, train))
    if samples_path is not None:
        from rewardiff.io import atomic_write_text

        atomic_write_text(samples_path, "\n".join(smiles) + "\n")
    if grid_path is not None:
        save_molecule_grid(smiles[:TOKEN_GRID], grid_path, legends=[f"QED {q:.2f}" if m else "(empty)" for m, q in zip(smiles, qed[:TOKEN_GRID].tolist())])
    return out
