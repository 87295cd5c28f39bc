"""Rewards the reward-server tests serve by ``module:function`` (``tests.remote_rewards:NAME``)."""

from __future__ import annotations

import time

import torch

FRAME_WEIGHTS = (1.0, 3.0, 5.0, 7.0, 9.0, 11.0)  # a different weight at every position: frame order and choice matter


def frame_weighted(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness of each frame, weighted by its position (image [B, 3, H, W]: one frame).

    x [B, 3, F, H, W] -> sum_f w_f mean(x[:, :, f]) / sum_f w_f, in [-1, 1]."""
    if x.dim() == 4:
        x = x[:, :, None]
    w = torch.tensor(FRAME_WEIGHTS[: x.shape[2]])
    per_frame = x.mean(dim=(1, 3, 4))  # [B, F]
    return (per_frame * w).sum(1) / w.sum()


frame_weighted.value_range = (-1.0, 1.0)


def sleepy(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness mapped to [0, 1]; sleeps 3 s when a prompt says "slow" (to be killed in flight)."""
    if any("slow" in p for p in prompts):
        time.sleep(3.0)
    return (x.mean(dim=tuple(range(1, x.dim()))) + 1) / 2


def broken(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Always fails, as a reward with a bug does."""
    raise RuntimeError("the reward model ran out of memory")


def unranged(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """A reward with no value range."""
    return x.mean(dim=tuple(range(1, x.dim())))


_scored = 0


def mortal(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Mean brightness in [0, 1], until ``REWARDIFF_TEST_DIE_AFTER`` samples have been scored:
    then the serving process dies on the spot, as a crashed reward server does."""
    import os

    global _scored
    limit = int(os.environ.get("REWARDIFF_TEST_DIE_AFTER", "0"))
    if limit and _scored + x.shape[0] > limit:
        os._exit(1)
    _scored += x.shape[0]
    return (x.mean(dim=tuple(range(1, x.dim()))) + 1) / 2


def truth_match(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """1 - mean |x - ground truth| / 2 in [0, 1], the truth read from each prompt (rewardiff.conditions)."""
    from rewardiff import conditions

    gt = conditions.stack([conditions.ground_truth(p) for p in prompts], "truth_match")
    return 1 - (x - gt).abs().mean(dim=(1, 2, 3)) / 2


truth_match.value_range = (0.0, 1.0)
