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


# ----------------------------------------------------------------------------- the hand-written copies
# Delete from here once worlds/pretrain.py, rewards/shapes_rm.py and rewards/chem_rm.py call rewardiff.optim.


def _chem_rm_lambda(steps: int, monkeypatch):
    """The schedule rewards/chem_rm.py writes inline in ``_train_loop``, caught at its LambdaLR."""
    from rewardiff.rewards import chem_rm

    class Caught(Exception):
        pass

    def catch(opt, lr_lambda):
        raise Caught(lr_lambda)

    monkeypatch.setattr(torch.optim.lr_scheduler, "LambdaLR", catch)
    with pytest.raises(Caught) as e:
        chem_rm._train_loop(torch.nn.Linear(1, 1), None, None, None, steps, None, 8, 1e-3)
    return e.value.args[0]


def test_reproduces_the_existing_copies_exactly(monkeypatch):
    from rewardiff.rewards.shapes_rm import _lr_factor
    from rewardiff.worlds.pretrain import warmup_cosine as pretrain_warmup_cosine

    for steps in (1, 7, 100, 1500):
        grid = range(steps + 1)
        for warmup in (1, 5, 20):
            assert [warmup_cosine(s, steps, warmup, floor=0.1, lr=3e-4, after_warmup=True) for s in grid] == \
                [pretrain_warmup_cosine(3e-4, warmup, steps, s) for s in grid]
        assert [warmup_cosine(s, steps, 20) for s in grid] == [_lr_factor(s, steps) for s in grid]
        assert [warmup_cosine(s, steps, 7) for s in grid] == [_lr_factor(s, steps, 7) for s in grid]
        chem = _chem_rm_lambda(steps, monkeypatch)
        assert [warmup_cosine(s, steps, 50) for s in grid] == [float(chem(s)) for s in grid]
