"""VARD: value regression on reward-labelled trajectories and value-guided fine-tuning."""

from __future__ import annotations

import pytest
import torch

from rewardiff.finetune.trainer import finetune
from rewardiff.rewards.value import fit_value
from rewardiff.rewards.value import ValueNet
from tests.helpers import assert_trains_and_resumes_bit_identically, blackbox_cfg


def test_value_regression_learns_a_known_value():
    """x_0 ~ N(0, 1)^2 and x_t = x_0 + s_t n: the value of r = x_0[0] is E[x_0[0] | x_t] = x_t[0] / (1 + s_t^2)."""
    gen = torch.Generator().manual_seed(0)
    ts, s = [900, 600, 300, -1], [2.0, 1.0, 0.5, 0.0]

    def trajectories(n):
        x0 = torch.randn(n, 2, generator=gen)
        return [x0 + si * torch.randn(n, 2, generator=gen) for si in s], x0[:, 0]

    def error(net):
        states, _ = trajectories(2000)
        with torch.no_grad():
            errs = [((net(x, t, torch.zeros(2000, 1)) - x[:, 0] / (1 + si**2)) ** 2).mean() for x, t, si in zip(states, ts, s)]
        return float(torch.stack(errs).mean())

    torch.manual_seed(0)
    net = ValueNet((2,), 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    before = error(net)
    for _ in range(15):
        states, r = trajectories(256)
        fit_value(net, opt, states, ts, torch.zeros(256, 1), r, 20, gen)
    after = error(net)
    assert before > 0.3  # the untrained head predicts the constant 0
    assert after < 0.15 * before, (before, after)


@pytest.mark.slow
def test_vard_with_an_overwhelming_kl_weight_stays_at_the_base(tiny_model_dir, tmp_path):
    """kl_weight -> infinity: the penalty, zero at the base and growing as the square of any
    move, dominates, so the model ends where it started (up to the optimizer's step size),
    while without it the value's gradient moves the model."""
    free = finetune(blackbox_cfg(tiny_model_dir, method="vard", kl_weight=0.0, steps=6, lr=3e-3), tmp_path / "free", progress=False)
    held = finetune(blackbox_cfg(tiny_model_dir, method="vard", kl_weight=1e6, steps=6, lr=3e-3), tmp_path / "held", progress=False)
    kl_free, kl_held = free["after"]["eval_kl_to_base"], held["after"]["eval_kl_to_base"]
    assert kl_free > 0 and kl_held < 0.1 * kl_free  # measured 5.0 against 128, (kl_free, kl_held)


@pytest.mark.slow
def test_vard_trains_and_resumes_bit_identically(tiny_model_dir, tmp_path):
    """(VARD's value model comes back from the checkpoint; see the helper.)"""
    assert_trains_and_resumes_bit_identically(tiny_model_dir, tmp_path, "vard")
