"""The fine-tuning methods by name: one registry of what each is and what it needs of a model.

A method is called once per training step as ``method(model, reward, prompts, seeds, cfg,
gen)`` and returns a :class:`~rewardiff.types.LossOut`, or an iterable of them (one optimizer
step after each whose ``step`` is True). Methods with state across steps (DDPO's reward
statistics, VARD's value model) are classes built as ``cls(cfg, model, acc)``, with
``save(dir)`` and ``load(dir)``, which the trainer calls with each checkpoint.

Each method declares the generator capabilities it needs (:mod:`rewardiff.types`); a model
that lacks one is refused in one line that says what to use instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from rewardiff import plugins
from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.types import CHAIN, GAUSSIAN, TOKENS, LossOut, Reward, missing

TrainingMethod = Callable[[Any, Reward, list[str], list[int], FinetuneConfig, torch.Generator], "LossOut | Iterable[LossOut]"]


class FinetuneEntry(NamedTuple):
    """A registered fine-tuning method."""

    target: str  # "package.module:attribute": a loss function, or a class built as cls(cfg, model, acc)
    requires: tuple[str, ...]  # generator capabilities it needs
    reward_gradient: bool  # backpropagates through the reward (else reads only its values)
    stateful: bool = False  # a class with state across steps


_DRAFT = "rewardiff.finetune.draft"
_GRAD_CHAIN = (CHAIN, GAUSSIAN)  # a continuous chain with Gaussian steps (backpropagation, DDPO, VARD, GRPO, NFT)

METHODS: dict[str, FinetuneEntry] = {
    "draft": FinetuneEntry(f"{_DRAFT}:draft", _GRAD_CHAIN, True),
    "draft-k": FinetuneEntry(f"{_DRAFT}:draft_k", _GRAD_CHAIN, True),
    "draft-lv": FinetuneEntry(f"{_DRAFT}:draft_lv", _GRAD_CHAIN, True),
    "alignprop": FinetuneEntry(f"{_DRAFT}:alignprop", _GRAD_CHAIN, True),
    "refl": FinetuneEntry(f"{_DRAFT}:refl", _GRAD_CHAIN, True),
    "gumbel": FinetuneEntry("rewardiff.finetune.gumbel:gumbel", (TOKENS,), True),
    "ddpo": FinetuneEntry("rewardiff.finetune.ddpo:DDPO", _GRAD_CHAIN, False, stateful=True),
    "vard": FinetuneEntry("rewardiff.finetune.vard:VARD", _GRAD_CHAIN, False, stateful=True),
    "grpo": FinetuneEntry("rewardiff.finetune.grpo:GRPO", _GRAD_CHAIN, False, stateful=True),
    "nft": FinetuneEntry("rewardiff.finetune.nft:NFT", _GRAD_CHAIN, False, stateful=True),
}

# what a model lacking a capability is told, by capability
_INSTEAD = {
    TOKENS: "method {name!r} samples tokens: use a token model (molecules-ar, hf:MODEL_DIR or molecules)",
    CHAIN: "method {name!r} fine-tunes diffusion models; for {model} use method 'gumbel'",
    GAUSSIAN: "method {name!r} needs a continuous chain with Gaussian steps (DDIM or flow); for token diffusion use method 'gumbel'",
}


def check_method(name: str) -> FinetuneEntry:
    """The method ``name``; a UserError listing the valid methods when it is not one."""
    return plugins.lookup(METHODS, name, "method")


def needs_reward_gradient(name: str) -> bool:
    return check_method(name).reward_gradient


def check_model(name: str, model: Any) -> None:
    """A UserError when method ``name`` needs a capability ``model`` lacks (see ``_INSTEAD``)."""
    lacking = missing(model, check_method(name).requires)
    if lacking:
        raise UserError(_INSTEAD[lacking[0]].format(name=name, model=model.name))


def make_method(cfg: FinetuneConfig, model: Any, acc: Any = None) -> TrainingMethod:
    """The method ``cfg.method`` names, ready to be called once per step."""
    spec = check_method(cfg.method)
    obj = plugins.load(spec.target)
    return obj(cfg, model, acc) if spec.stateful else obj


def get_method(name: str) -> TrainingMethod:
    """A stateless loss by name (the reward-backpropagation family and ``gumbel``)."""
    spec = check_method(name)
    if spec.stateful:
        raise UserError(f"method {name!r} keeps state across steps; build it with make_method(cfg, model)")
    return plugins.load(spec.target)
