"""The fine-tuning methods by name.

A method is called once per training step as ``method(model, reward, prompts, seeds, cfg,
gen)`` and returns a :class:`~rewardiff.types.LossOut`, or an iterable of them (one
optimizer step after each whose ``step`` is True). Methods with state across steps (DDPO's
reward statistics, VARD's value model) also have ``save(dir)`` and ``load(dir)``, which the
trainer calls with each checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.draft import LOSSES
from rewardiff.models.base import DiffusionModel
from rewardiff.types import LossOut, Reward

Method = Callable[[DiffusionModel, Reward, list[str], list[int], FinetuneConfig, torch.Generator], "LossOut | Iterable[LossOut]"]

TOKEN_METHODS = ("gumbel",)  # token generators: straight-through Gumbel-softmax samples
GRADIENT_METHODS = tuple(LOSSES) + TOKEN_METHODS  # backpropagate through the reward
BLACK_BOX_METHODS = ("ddpo", "vard")  # read only the reward's values
METHODS = GRADIENT_METHODS + BLACK_BOX_METHODS


def check_method(name: str) -> None:
    """A UserError listing the valid methods when ``name`` is not one."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")


def needs_reward_gradient(name: str) -> bool:
    return name in GRADIENT_METHODS


def check_model(name: str, model: Any) -> None:
    """A UserError when method ``name`` cannot train ``model``: ``gumbel`` samples tokens; the
    reward-backpropagation losses need a continuous chain; an autoregressive model has no chain."""
    from rewardiff.models.tokens import TokenModel

    if name in TOKEN_METHODS and not is_token_model(model):
        raise UserError(f"method {name!r} samples tokens: use a token model (molecules-ar, hf:MODEL_DIR or molecules)")
    if name not in TOKEN_METHODS and isinstance(model, TokenModel):
        raise UserError(f"method {name!r} fine-tunes diffusion models; for {model.name} use method 'gumbel'")
    if name in LOSSES and is_token_diffusion(model):
        raise UserError(f"method {name!r} backpropagates through a continuous chain; for token diffusion use method 'gumbel'")


def is_token_diffusion(model: Any) -> bool:
    """Whether ``model`` is a diffusion model over tokens (a masked process)."""
    from rewardiff.processes.masked import MaskedProcess

    return isinstance(getattr(model, "process", None), MaskedProcess)


def is_token_model(model: Any) -> bool:
    """Whether ``model`` generates token sequences (an autoregressive TokenModel or masked diffusion)."""
    from rewardiff.models.tokens import TokenModel

    return isinstance(model, TokenModel) or is_token_diffusion(model)


def make_method(cfg: FinetuneConfig, model: DiffusionModel, acc: Any = None) -> Method:
    """The method ``cfg.method`` names, ready to be called once per step."""
    check_method(cfg.method)
    if cfg.method == "ddpo":
        from rewardiff.finetune.ddpo import DDPO

        return DDPO(cfg, acc)
    if cfg.method == "vard":
        from rewardiff.finetune.vard import VARD

        return VARD(cfg, model, acc)
    return get_method(cfg.method)


def get_method(name: str) -> Method:
    """A stateless loss by name (the reward-backpropagation family)."""
    check_method(name)
    if name == "gumbel":
        from rewardiff.finetune.gumbel import gumbel

        return gumbel
    if name not in LOSSES:
        raise UserError(f"method {name!r} keeps state across steps; build it with make_method(cfg, model)")
    return LOSSES[name]
