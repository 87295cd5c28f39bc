"""Models by name: the registry's loaders (``rewardiff.plugins.MODELS``, ``MODEL_PREFIXES``, ``MODEL_DIRS``)."""

from __future__ import annotations

from pathlib import Path

from rewardiff import plugins
from rewardiff.errors import UserError


def base_model(name: str):
    """The model a config names: a registered name (``shapes``, ``molecules``, ``molecules-ar``),
    ``scheme:PATH`` (``diffusers:DIR``, a saved diffusers pipeline; ``hf:DIR``, a saved Hugging
    Face causal language model), or a directory holding a saved model of a registered kind."""
    if name in plugins.MODELS:
        return plugins.load(plugins.MODELS[name])(None)
    for prefix, target in plugins.MODEL_PREFIXES.items():
        if name.startswith(prefix):
            return plugins.load(target)(name.removeprefix(prefix))
    if Path(name).is_dir():
        for is_dir, loader in plugins.MODEL_DIRS.values():
            if plugins.load(is_dir)(name):
                return plugins.load(loader)(name)
    valid = ", ".join([repr(n) for n in plugins.MODELS] + [f"{p}DIR" for p in plugins.MODEL_PREFIXES])
    raise UserError(f"unknown model {name!r}; use {valid}, or a directory holding a saved model")
