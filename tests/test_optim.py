"""The warm-up + cosine learning-rate schedule: hand-computed values, the LambdaLR wrapper, and
the hand-written copies elsewhere in the tree that it reproduces exactly."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.optim import warmup_cosine, warmup_cosine_schedule


def test_warmup_then_cosine_by_hand():
    """after_warmup, steps 10, warm-up 2, floor 0.1, c(f) = 0.1 + 0.9 (1 + cos(pi f)) / 2:
    step 0: 1/2; step 1: 2/2 = 1; then f = (step - 2) / 8, so step 2: c(0) = 1,
    step 4: c(1/4) = 0.1 + 0.45 (1 + 0.7071) = 0.868198, step 6: c(1/2) = 0.55, step 10: c(1) = 0.1."""
    f = lambda s: warmup_cosine(s, 10, 2, floor=0.1, after_warmup=True)  # noqa: E731
    assert f(0) == 0.5 and f(1) == 1.0 and f(2) == 1.0
    assert f(4) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))
    assert f(6) == pytest.approx(0.55) and f(10) == pytest.approx(0.1)
    assert warmup_cosine(0, 10, 2, floor=0.1, lr=3e-4, after_warmup=True) == pytest.approx(1.5e-4)  # lr scales every step


def test_warmup_under_cosine_and_plain_cosine_by_hand():
    """By default the ramp min(1, (s + 1) / 4) multiplies (1 + cos(pi s / 8)) / 2 from step 0:
    step 0: 1/4 * 1 = 0.25; step 1: 1/2 * (1 + cos(pi/8)) / 2 = 0.480970; step 4: 1 * 1/2 = 0.5;
    step 8: 0. Without warm-up both forms are the plain cosine: step 3 of 6 is halfway, 0.5."""
    g = lambda s: warmup_cosine(s, 8, 4)  # noqa: E731
    assert g(0) == 0.25
    assert g(1) == pytest.approx(0.5 * (1 + math.cos(math.pi / 8)) / 2)
    assert g(4) == pytest.approx(0.5) and g(8) == pytest.approx(0.0, abs=1e-15)
    assert warmup_cosine(3, 6) == pytest.approx(0.5) == warmup_cosine(3, 6, after_warmup=True)


def test_plain_cosine_to_a_floor_is_the_value_fits_schedule():
    """No warm-up, floor 0.1: 0.1 + 0.9 (1 + cos(pi k / steps)) / 2, to the last bit (train_value's schedule)."""
    for steps in (3, 100, 1500):
        assert all(warmup_cosine(k, steps, floor=0.1) == 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / steps))
                   for k in range(steps + 1))


def test_schedule_scales_the_optimizer_learning_rate():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = warmup_cosine_schedule(opt, 10, 2, floor=0.1, after_warmup=True)
    seen = []
    for _ in range(11):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [2.0 * warmup_cosine(s, 10, 2, floor=0.1, after_warmup=True) for s in range(11)]
