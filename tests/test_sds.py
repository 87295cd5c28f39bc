"""Score distillation's gradient against its closed form for a point-mass prior, on every process.

For data that is a point mass at x*, the ideal denoiser is known in closed form for each
parameterisation, and DreamFusion's w(t) (eps_hat - eps) is w(t) sqrt(snr(t)) (x - x*) exactly,
for a DDIM process (epsilon, v, x0 prediction) and for a flow process alike: the gradient
points from x* to x, so descending it pulls x onto x*. Classifier-free guidance of two point
masses is the point mass at x_u + s (x_c - x_u).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rewardiff.distill.sds import sds_gradient, sds_loss, t_range_at, weight
from rewardiff.processes.flow import FlowProcess
from rewardiff.processes.gaussian import GaussianProcess


class PointMassNet(nn.Module):
    """The ideal denoiser of data concentrated at x* = cond, in the process's parameterisation."""

    def __init__(self, process):
        super().__init__()
        self.process = process
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, cond):
        p = self.process
        shape = (-1,) + (1,) * (x_t.dim() - 1)
        if isinstance(p, FlowProcess):
            s = p.sigma_at(t).float().view(shape)
            return (x_t - cond) / s  # v = eps - x*, with eps = (x_t - (1 - s) x*) / s
        a = p.alpha_bar(t).view(shape)
        eps = (x_t - a.sqrt() * cond) / (1 - a).sqrt()
        if p.prediction == "epsilon":
            return eps
        if p.prediction == "sample":
            return cond.expand_as(x_t)
        return a.sqrt() * eps - (1 - a).sqrt() * cond


class Model:
    def __init__(self, process):
        self.process, self.net = process, PointMassNet(process)


PROCESSES = {
    "ddim-epsilon": lambda: GaussianProcess.from_config("cosine", 1000, False, "epsilon"),
    "ddim-v": lambda: GaussianProcess.from_config("cosine", 1000, True, "v_prediction"),
    "ddim-x0": lambda: GaussianProcess.from_config("linear", 1000, False, "sample"),
    "flow": lambda: FlowProcess(1000),
    "flow-shift3": lambda: FlowProcess(1000, shift=3.0),
}


@pytest.mark.parametrize("name", list(PROCESSES))
def test_sds_gradient_is_the_closed_form_of_a_point_mass(name):
    process = PROCESSES[name]()
    model = Model(process)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, 4, 4, generator=g)
    target = torch.randn(6, 3, 4, 4, generator=g)
    tau = torch.tensor([0.05, 0.2, 0.4, 0.6, 0.8, 0.95], dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g)
    grad, stats = sds_gradient(model, x, target, None, tau, noise, guidance_scale=1.0)
    t = process.at_fraction(tau)
    w = weight(process, t).double()
    expected = (w * process.snr(t).double().sqrt()).view(-1, 1, 1, 1) * (x - target).double()
    torch.testing.assert_close(grad.double(), expected, rtol=2e-4, atol=2e-4)
    assert stats["grad_norm"] > 0


@pytest.mark.parametrize("name", ["ddim-epsilon", "ddim-v", "flow"])
def test_guidance_distils_the_extrapolated_point(name):
    process = PROCESSES[name]()
    model = Model(process)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, 3, generator=g)
    x_c, x_u = torch.randn(4, 2, 3, 3, generator=g), torch.randn(4, 2, 3, 3, generator=g)
    tau = torch.full((4,), 0.5, dtype=torch.float64)
    noise = torch.randn(x.shape, generator=g)
    s = 7.5
    grad, _ = sds_gradient(model, x, x_c, x_u, tau, noise, guidance_scale=s)
    ref, _ = sds_gradient(model, x, x_u + s * (x_c - x_u), None, tau, noise, guidance_scale=1.0)
    torch.testing.assert_close(grad, ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ["ddim-v", "flow"])
def test_descending_sds_reaches_the_point_mass_and_ascending_leaves_it(name):
    """Gradient descent on x with the SDS surrogate converges to x*; the sign-flipped gradient
    (a broken SDS) moves away."""
    process = PROCESSES[name]()
    model = Model(process)
    target = torch.tensor([[0.5, -0.3, 0.8]])
    results = {}
    for sign in (1.0, -1.0):
        x = torch.zeros(1, 3, requires_grad=True)
        opt = torch.optim.SGD([x], lr=0.1)
        g = torch.Generator().manual_seed(2)
        for _ in range(150):
            tau = 0.02 + 0.96 * torch.rand(1, generator=g, dtype=torch.float64)
            noise = torch.randn(1, 3, generator=g)
            grad, _ = sds_gradient(model, x, target, None, tau, noise, guidance_scale=1.0)
            opt.zero_grad()
            sds_loss(x, sign * grad).backward()
            opt.step()
            with torch.no_grad():
                x.clamp_(-5, 5)
        results[sign] = float((x.detach() - target).norm())
    assert results[1.0] < 0.05
    assert results[-1.0] > 1.0


def test_sds_loss_has_the_given_gradient():
    x = torch.randn(3, 5, requires_grad=True)
    grad = torch.randn(3, 5)
    sds_loss(x, grad).backward()
    torch.testing.assert_close(x.grad, grad / 3)


def test_weight_is_dreamfusions_sigma_squared():
    ddim = GaussianProcess.from_config("cosine", 1000, False, "epsilon")
    t = torch.tensor([10, 500, 990])
    torch.testing.assert_close(weight(ddim, t), (1 - ddim.alpha_bar(t)).float(), rtol=1e-5, atol=1e-6)
    flow = FlowProcess(1000)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    torch.testing.assert_close(weight(flow, s * 1000).double(), s**2 / ((1 - s) ** 2 + s**2), rtol=1e-5, atol=1e-6)
    assert torch.equal(weight(flow, s * 1000, "uniform"), torch.ones(3))


def test_at_fraction_spans_clean_to_noise():
    ddim = GaussianProcess.from_config("cosine", 1000, True, "v_prediction")
    assert ddim.at_fraction(torch.tensor([0.0, 0.5, 1.0])).tolist() == [0, 500, 999]
    flow = FlowProcess(1000, shift=3.0)
    torch.testing.assert_close(flow.sigma_at(flow.at_fraction(torch.tensor([0.25, 1.0]))).float(), torch.tensor([0.25, 1.0]))


def test_t_range_anneals_linearly():
    assert t_range_at(0, 101, 0.02, 0.98, 0.5) == (0.02, 0.98)
    lo, hi = t_range_at(50, 101, 0.02, 0.98, 0.5)
    assert lo == 0.02 and hi == pytest.approx(0.74)
    assert t_range_at(100, 101, 0.02, 0.98, 0.5) == (0.02, pytest.approx(0.5))
    assert t_range_at(70, 101, 0.02, 0.98, None) == (0.02, 0.98)
