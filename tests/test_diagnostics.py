"""Fine-tuning diagnostics: the path KL of a model to its base and the per-step variances."""

from __future__ import annotations

import math

import torch
from torch import nn

from rewardiff.finetune.diagnostics import kl_to_base, step_variances
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess, make_betas


class _ConstEps(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t, cond):
        return torch.zeros_like(x) + self.c


def test_kl_to_base_closed_form():
    """Epsilon predictions differing by a constant c: each step's means differ by
    c (sqrt(1 - ap - sigma^2) - sqrt(ap) sqrt(1 - a) / sqrt(a)) in every coordinate, whatever x is,
    so the path KL is sum_t d c^2 coef_t^2 / (2 sigma_t^2)."""
    proc = GaussianProcess(make_betas("linear"), "epsilon", final_alpha_one=False)
    model = DiffusionModel(_ConstEps(0.3), proc, lambda p: torch.zeros(len(p), 1), (3,), output_range=None)
    model.reference = _ConstEps(0.0)
    T, d, c = 5, 3, 0.3
    ts = proc.timesteps(T)
    var = step_variances(model, ts, 1.0)
    want = 0.0
    for t, tp, v in zip(ts, ts[1:] + [-1], var):
        a, ap = float(proc.alpha_bar(t)), float(proc.alpha_bar(tp))
        coef = math.sqrt(max(1 - ap - v, 0.0)) - math.sqrt(ap) * math.sqrt(1 - a) / math.sqrt(a)
        want += d * (c * coef) ** 2 / (2 * v)
    got = kl_to_base(model, ["", ""], [0, 1], T, 1.0)
    torch.testing.assert_close(got, torch.full((2,), want), rtol=1e-3, atol=1e-6)  # float32 steps, small variances
    model.reference = _ConstEps(0.3)
    assert float(kl_to_base(model, [""], [0], T, 1.0).abs().max()) == 0.0
