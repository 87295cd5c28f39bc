"""The fine-tuning methods by name.

A method is called once per training step as ``method(model, reward, prompts, seeds, cfg,
gen)`` and returns a :class:`~rewardiff.finetune.draft.LossOut`, or an iterable of them (one
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
from rewardiff.finetune.draft import LOSSES, LossOut
from rewardiff.models.base import DiffusionModel
from rewardiff.types import Reward

Method = Callable[[DiffusionModel, Reward, list[str], list[int], FinetuneConfig, torch.Generator], "LossOut | Iterable[LossOut]"]

GRADIENT_METHODS = tuple(LOSSES)  # backpropagate through the reward
BLACK_BOX_METHODS = ("ddpo", "vard")  # read only the reward's values
METHODS = GRADIENT_METHODS + BLACK_BOX_METHODS


def check_method(name: str) -> None:
    """A UserError listing the valid methods when ``name`` is not one."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")


def needs_reward_gradient(name: str) -> bool:
    return name in GRADIENT_METHODS


def make_method(cfg: FinetuneConfig, model: DiffusionModel, acc: Any = None) -> Method:
    """The method ``cfg.method`` names, ready to be called once per step."""
    check_method(cfg.method)
    if cfg.method == "ddpo":
        from rewardiff.finetune.ddpo import DDPO

        return DDPO(cfg, acc)
    if cfg.method == "vard":
        from rewardiff.finetune.vard import VARD

        return VARD(cfg, model, acc)
    return LOSSES[cfg.method]


def get_method(name: str) -> Method:
    """A stateless loss by name (the reward-backpropagation family)."""
    check_method(name)
    if name not in LOSSES:
        raise UserError(f"method {name!r} keeps state across steps; build it with make_method(cfg, model)")
    return LOSSES[name]
