"""Learning-rate schedules: linear warm-up, then cosine decay.

    sched = warmup_cosine_schedule(opt, steps=1500, floor=0.1)  # call sched.step() after opt.step()
    lr = warmup_cosine(step, steps, warmup=100, floor=0.1, lr=3e-4, after_warmup=True)  # or read the number itself
"""

from __future__ import annotations

import math

import torch


def warmup_cosine(step: int, steps: int, warmup: int = 0, *, floor: float = 0.0, lr: float = 1.0,
                  after_warmup: bool = False) -> float:
    """The learning rate at ``step`` (counted from 0) of a run of ``steps``.

    With c(f) = floor + (1 - floor) * (1 + cos(pi f)) / 2, which falls from 1 at f = 0 to
    ``floor`` at f = 1:

    - default: a linear ramp multiplies a cosine that runs from step 0,
      lr * min(1, (step + 1) / warmup) * c(step / steps);
    - ``after_warmup=True``: steps 0 .. warmup - 1 ramp up linearly, lr * (step + 1) / warmup,
      and the decay starts after them, lr * c((step - warmup) / (steps - warmup)).

    Either way the rate reaches lr * floor at step ``steps``; ``warmup=0`` is a plain cosine
    decay. Worked example, ``steps=10, warmup=2, floor=0.1, after_warmup=True``: step 0 ->
    0.5, step 1 -> 1.0, step 2 -> 1.0, step 6 -> c(1/2) = 0.55, step 10 -> 0.1; by default
    step 0 -> 0.5 * c(0) = 0.5, step 5 -> c(1/2) = 0.55.

    Args:
        step: the optimizer step, from 0.
        steps: the length of the run (the decay ends there).
        warmup: steps of linear warm-up (0: none).
        floor: the final learning rate as a fraction of ``lr``.
        lr: the peak learning rate (1: the result is a factor, as ``LambdaLR`` wants).
        after_warmup: start the decay after the warm-up instead of under it (see above).

    Returns:
        The learning rate (a factor of the optimizer's own when ``lr`` is 1).
    """
    if after_warmup:
        if step < warmup:
            return lr * (step + 1) / warmup
        return lr * _cosine(math.pi * ((step - warmup) / max(1, steps - warmup)), floor)
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    return lr * ramp * _cosine(math.pi * step / steps, floor)


def _cosine(angle: float, floor: float) -> float:
    """1 at angle 0, ``floor`` at angle pi, half a cosine in between."""
    return floor + (1 - floor) * 0.5 * (1 + math.cos(angle))


def warmup_cosine_schedule(opt: torch.optim.Optimizer, steps: int, warmup: int = 0, *, floor: float = 0.0,
                           after_warmup: bool = False) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``opt`` that scales each group's learning rate by ``warmup_cosine``.

    Args:
        opt: the optimizer; its learning rates are the peaks.
        steps, warmup, floor, after_warmup: as for ``warmup_cosine``.
    """
    def factor(k: int) -> float:
        return warmup_cosine(k, steps, warmup, floor=floor, after_warmup=after_warmup)

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


__all__ = ["warmup_cosine", "warmup_cosine_schedule"]
