"""RewardFn: a plain function plus the metadata of the ``Reward`` protocol."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rewardiff.errors import UserError

RewardCallable = Callable[[Tensor, list[str]], Tensor]


class RewardFn:
    """A reward ``fn(x, prompts) -> Tensor[B]`` with its name, flags and range.

    A non-differentiable reward runs under ``torch.no_grad`` and returns a detached
    tensor, so that no gradient ever seems to flow where none is meant to.

    Args:
        name: registry name (or the spec it was built from).
        differentiable: whether gradients flow from the reward back to ``x``.
        value_range: (low, high) when known, else None.
        description: one line for ``rewardiff rewards``.
        fn: the function itself, ``fn(x [B, ...], prompts) -> [B]``.
    """

    def __init__(
        self,
        name: str,
        differentiable: bool,
        value_range: tuple[float, float] | None,
        description: str,
        fn: RewardCallable,
    ):
        self.name, self.differentiable, self.value_range = name, bool(differentiable), value_range
        self.description, self.fn = description, fn

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        """Score a batch: ``x`` [B, ...] (images in [-1, 1]), ``prompts`` B strings -> float [B]."""
        if len(prompts) != x.shape[0]:
            raise UserError(f"reward {self.name!r}: {x.shape[0]} samples but {len(prompts)} prompts")
        if self.differentiable:
            out = self.fn(x, prompts)
        else:
            with torch.no_grad():
                out = self.fn(x, prompts)
        return self._check(out, x)

    def _check(self, out: object, x: Tensor) -> Tensor:
        """Turn the function's output into a float tensor [B] on ``x``'s device, or explain why not."""
        out = torch.as_tensor(out, device=x.device)
        if not out.is_floating_point():
            out = out.float()
        if out.shape != (x.shape[0],):
            raise UserError(f"reward {self.name!r} returned shape {tuple(out.shape)}; expected ({x.shape[0]},)")
        return out if self.differentiable else out.detach()

    def __repr__(self) -> str:
        kind = "differentiable" if self.differentiable else "black-box"
        return f"RewardFn({self.name!r}, {kind}, range={self.value_range})"


def first_line(doc: str | None) -> str:
    """The first non-empty line of a docstring ("" when there is none)."""
    lines = [ln.strip() for ln in (doc or "").strip().splitlines()]
    return lines[0] if lines else ""
