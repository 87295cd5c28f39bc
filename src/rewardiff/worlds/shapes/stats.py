"""Reward statistics on the shapes base model's samples, used to standardize rewards: ``z(name)``.

The mean and standard deviation of a reward are measured once on samples of the shipped shapes
base model (training prompts, 15 DDIM steps, eta 0, guidance scale 2.0) and shipped in
``worlds/weights/reward-stats.json``::

    {"rewards": {"shapes-count": {"mean": ..., "std": ..., "n": 512, "seed": 0, ...settings}, ...}}

Measure and record statistics (merged into the file, which is written atomically)::

    python -m rewardiff.worlds.shapes.stats shapes-count brightness --n 512 --seed 0

or from Python: ``save_reward_stats(measure_reward_stats(["shapes-count"]))``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.rewards.base import first_line
from rewardiff.worlds.shapes import data as shapes
from rewardiff.worlds import WEIGHTS

STATS_FILE = WEIGHTS / "reward-stats.json"
STATS_SEED = 70_000_000  # noise seeds of the measuring samples are STATS_SEED + seed * n + i
SETTINGS: dict[str, Any] = {
    "model": "shapes-base",
    "prompts": "train",
    "num_inference_steps": 15,
    "eta": 0.0,
    "guidance_scale": 2.0,
}
MEASURE_COMMAND = "python -m rewardiff.worlds.shapes.stats"


def load_reward_stats(path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """The recorded statistics, ``{reward name: {"mean", "std", "n", settings...}}``.

    Args:
        path: the statistics file (``STATS_FILE`` when None); a missing file holds no statistics.
    """
    path = Path(path) if path is not None else STATS_FILE
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"reward statistics file {path} is not valid JSON ({e}); measure again with: {MEASURE_COMMAND} NAME...") from None
    return dict(data.get("rewards", {}))


def reward_stats(name: str, path: str | Path | None = None) -> tuple[float, float]:
    """(mean, std) recorded for the reward ``name``.

    Args:
        name: the reward's spec as written inside ``z(...)``, e.g. ``"shapes-count"``.
        path: the statistics file (``STATS_FILE`` when None).

    Raises:
        UserError: when no statistics are recorded for ``name`` (the message says how to measure them).
    """
    entry = load_reward_stats(path).get(name)
    if entry is None:
        where = Path(path) if path is not None else STATS_FILE
        raise UserError(
            f"no recorded statistics for reward {name!r} in {where}, so z({name}) cannot standardize it; "
            f"measure them with: {MEASURE_COMMAND} {name}  (or rewardiff.worlds.shapes.stats.measure_reward_stats)"
        )
    return float(entry["mean"]), float(entry["std"])


def stats_prompts(n: int, seed: int) -> tuple[list[str], list[int]]:
    """The ``n`` training prompts (each about equally often, shuffled) and noise seeds of a measurement.

    Args:
        n: number of samples.
        seed: picks the prompt order and the noise seeds.
    """
    pool = shapes.train_prompts()
    order = np.random.default_rng(seed).permutation(n) % len(pool)
    return [pool[int(i)] for i in order], [STATS_SEED + seed * n + i for i in range(n)]


def measure_reward_stats(
    names: list[str], n: int = 512, seed: int = 0, *, batch_size: int = 64, model: Any = None
) -> dict[str, dict[str, Any]]:
    """Mean and standard deviation of each reward on ``n`` samples of the shapes base model.

    Samples are drawn without gradient in batches of ``batch_size`` for the training prompts
    (see :func:`stats_prompts`) with 15 DDIM steps, eta 0 and guidance scale 2.0; every reward
    scores each batch as it comes. The standard deviation is the sample one (divisor n - 1).

    Args:
        names: reward specs (anything :func:`rewardiff.rewards.get_reward` takes).
        n: number of samples (at least 2).
        seed: picks prompts and noise seeds.
        batch_size: samples per generation batch.
        model: a model with ``generate(prompts, seeds, batch_size, **kwargs)`` (the shipped
            shapes base model when None).

    Returns:
        ``{name: {"mean", "std", "min", "max", "n", "seed", **SETTINGS}}``.
    """
    from rewardiff.rewards.registry import get_reward

    if n < 2:
        raise UserError(f"measuring reward statistics needs at least 2 samples, got n={n}")
    if not names:
        raise UserError("name at least one reward to measure")
    rewards = {name: get_reward(name) for name in names}
    if model is None:
        from rewardiff.worlds.shapes.denoiser import shapes_model

        model = shapes_model()
    prompts, seeds = stats_prompts(n, seed)
    values: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    sample_kwargs = {k: SETTINGS[k] for k in ("num_inference_steps", "eta", "guidance_scale")}
    with torch.no_grad():
        for i in range(0, n, batch_size):
            p, s = prompts[i : i + batch_size], seeds[i : i + batch_size]
            x = model.generate(p, s, batch_size, **sample_kwargs)  # [b, 3, 32, 32] in [-1, 1]
            for name, reward in rewards.items():
                values[name].append(reward(x, p).detach().double().cpu())
    out = {}
    for name in names:
        r = torch.cat(values[name])  # [n]
        if not torch.isfinite(r).all():
            raise UserError(f"reward {name!r} gave non-finite values on base-model samples; no statistics recorded")
        out[name] = {
            "mean": float(r.mean()), "std": float(r.std()), "min": float(r.min()), "max": float(r.max()),
            "n": n, "seed": seed, **SETTINGS,
        }
    return out


def save_reward_stats(stats: dict[str, dict[str, Any]], path: str | Path | None = None) -> Path:
    """Merge ``stats`` into the statistics file (entries of the same name are replaced), atomically.

    Args:
        stats: ``{name: entry}`` as :func:`measure_reward_stats` returns.
        path: the statistics file (``STATS_FILE`` when None).

    Returns:
        The file written.
    """
    path = Path(path) if path is not None else STATS_FILE
    for name, entry in stats.items():
        if not (math.isfinite(entry["mean"]) and math.isfinite(entry["std"]) and entry["std"] > 0):
            raise UserError(f"statistics of reward {name!r} need a finite mean and std > 0, got {entry['mean']}, {entry['std']}")
    merged = {**load_reward_stats(path), **stats}
    doc = {
        "about": "mean and std of each reward on shapes base-model samples; z(name) in a reward spec uses them",
        "rewards": {name: merged[name] for name in sorted(merged)},
    }
    return atomic_write_text(path, json.dumps(doc, indent=2) + "\n")


def main(argv: list[str] | None = None) -> None:
    """Command line: measure the named rewards and merge their statistics into the file."""
    parser = argparse.ArgumentParser(prog=MEASURE_COMMAND, description=first_line(__doc__))
    parser.add_argument("names", nargs="+", help="reward specs, e.g. shapes-count brightness")
    parser.add_argument("--n", type=int, default=512, help="number of base-model samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help=f"statistics file (default {STATS_FILE})")
    args = parser.parse_args(argv)
    stats = measure_reward_stats(args.names, n=args.n, seed=args.seed)
    path = save_reward_stats(stats, args.out)
    for name, e in stats.items():
        print(f"{name:24s} mean {e['mean']:+.4f}  std {e['std']:.4f}  n {e['n']}")
    print(f"wrote {path}")


if __name__ == "__main__":
    import sys

    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def recorded_stats(name: str) -> tuple[float, float] | None:
    """(mean, std) shipped for reward ``name``, or None: the ``plugins.REWARD_STATS`` entry of the shapes world."""
    entry = load_reward_stats().get(name)
    return None if entry is None else (float(entry["mean"]), float(entry["std"]))


SHAPES_ENSEMBLE = "0.7*z(shapes-count)+0.3*z(jpeg-compressibility)"


def shapes_ensemble():
    """Shapes world: count reward and JPEG compressibility, each standardized, weighed 0.7 / 0.3."""
    from rewardiff import plugins
    from rewardiff.rewards import get_reward

    reward = get_reward(SHAPES_ENSEMBLE)
    reward.name = "shapes-ensemble"
    reward.description = plugins.REWARDS["shapes-ensemble"].description
    return reward
