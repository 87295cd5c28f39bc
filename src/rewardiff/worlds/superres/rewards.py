"""The super-resolution world's rewards: minus the hallucinations its judge counts.

Both are black-box (the judge reads connected components) and take prompts that name their
input (``shapes-sr:held-out/3``, or ``file:low.png;gt=high.png``). ``sr-hallucination`` compares
with the ground truth, so a run trained on it has no independent check in the judge;
``sr-hallucination-lr`` reads only the low-resolution input (the output degraded the same way),
which a user's image without truth also has, and leaves the ground-truth judge independent.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rewardiff.rewards.base import RewardFn


def sr_hallucination() -> RewardFn:
    """Super-resolution world: minus the judge's hallucination count against the ground truth."""
    from rewardiff.worlds.superres.judge import judge

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        return -torch.as_tensor(judge(x, prompts)["count"], dtype=torch.float32)

    return RewardFn("sr-hallucination", False, None, "super-resolution world: minus the hallucination count against the ground truth", fn)


def sr_hallucination_lr() -> RewardFn:
    """Super-resolution world: minus the hallucinations the low-resolution input shows (output degraded, compared)."""
    from rewardiff.worlds.superres.judge import judge_low_res

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        return -torch.as_tensor(judge_low_res(x, prompts)["count"], dtype=torch.float32)

    return RewardFn("sr-hallucination-lr", False, None,
                    "super-resolution world: minus the hallucination count the low-resolution input shows", fn)
