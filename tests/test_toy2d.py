"""The 2-D toy world: its exact denoiser against closed forms and Monte Carlo, sampling, reward."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.processes.gaussian import GaussianProcess
from rewardiff.worlds.toy2d import GaussianMixture, MixtureDenoiser, ring_means, target_reward, target_reward_blackbox, toy2d_model

PREDICTIONS = ["epsilon", "v_prediction", "sample"]


def _atol(model, x_t, t):
    """Tolerance on x0 read back through ``split``: with epsilon prediction, x0 = (x_t - sqrt(1 - abar) eps)
    / sqrt(abar) magnifies the float32 rounding of eps and x_t by 1 / sqrt(abar) (4096 at abar = 2^-24)."""
    if model.process.prediction != "epsilon":
        return 1e-4
    return 1e-4 + 2e-7 * float(x_t.abs().max()) / math.sqrt(float(model.process.abar[t]))


def _x0_hat(model, x_t, t):
    """The denoiser's x0 estimate, read back through the process as a sampler would."""
    tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
    out = model.net(x_t, tt, model.encode([""] * x_t.shape[0]))
    assert out.dtype == torch.float32 and out.shape == x_t.shape
    return model.process.split(out, x_t, t)[0]


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("t", [0, 200, 600, 999])
def test_single_gaussian_matches_closed_form(prediction, t):
    """One component: E[x0|x_t] = (sqrt(abar) s^2 x_t + (1 - abar) mu) / (abar s^2 + 1 - abar)."""
    mu, s = torch.tensor([0.7, -1.3], dtype=torch.float64), 0.4
    model = toy2d_model(prediction, means=mu[None], std=s)
    abar = model.process.abar[t]
    g = torch.Generator().manual_seed(t)
    x0 = mu + s * torch.randn(64, 2, dtype=torch.float64, generator=g)
    x_t = (abar.sqrt() * x0 + (1 - abar).sqrt() * torch.randn(64, 2, dtype=torch.float64, generator=g)).float()
    want = (abar.sqrt() * s**2 * x_t.double() + (1 - abar) * mu) / (abar * s**2 + 1 - abar)
    got = _x0_hat(model, x_t, t)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, atol=_atol(model, x_t, t), rtol=1e-4)


UNEVEN = dict(means=[[1.0, 0.5], [-1.0, 0.0], [0.0, -1.5]], std=[0.1, 0.6, 0.3], weights=[0.5, 0.2, 0.3])


@pytest.mark.parametrize("mixture", [{}, UNEVEN], ids=["ring", "uneven"])
@pytest.mark.parametrize("prediction", PREDICTIONS)
def test_mixture_posterior_matches_monte_carlo(prediction, mixture):
    """E[x0|x_t] of a mixture against self-normalised importance sampling from the prior.

    With x0_i ~ p and weights p(x_t | x0_i) = N(x_t; sqrt(abar) x0_i, (1 - abar) I), the
    weighted average of x0_i estimates the posterior mean, with no use of the closed form.
    """
    t = 400  # abar = 0.65: noise comparable to the spread of the data
    model = toy2d_model(prediction, **mixture)
    mix = model.net.mixture
    abar = float(model.process.abar[t])
    x0 = mix.sample(200_000, torch.Generator().manual_seed(0)).double()
    x_t = torch.tensor([[1.0, 0.2], [-0.5, 0.8], [0.0, 0.0], [0.3, -1.1]])
    logw = -((x_t.double()[:, None] - math.sqrt(abar) * x0[None]) ** 2).sum(-1) / (2 * (1 - abar))  # [4, M]
    w = logw.softmax(1)
    mc = w @ x0  # [4, 2]
    ess = 1 / (w**2).sum(1)
    assert (ess > 1000).all()  # Monte-Carlo error well below the tolerance
    got = _x0_hat(model, x_t, t)
    torch.testing.assert_close(got.double(), mc, atol=0.02, rtol=0)
    # and the points differ enough that a wrong posterior (e.g. the prior mean) would fail
    assert (mc - mix.mean).norm(dim=1).max() > 0.3


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("zero_snr", [True, False])
def test_prediction_inverts_split_and_is_finite(prediction, zero_snr):
    """The output is the process target of the posterior mean; finite at every t, including abar = 0."""
    model = toy2d_model(prediction, zero_snr)
    proc = model.process
    x_t = 3 * torch.randn(32, 2, generator=torch.Generator().manual_seed(1))
    for t in [0, 1, 500, 998, 999]:
        tt = torch.full((32,), t, dtype=torch.long)
        out = model.net(x_t, tt, None)
        assert torch.isfinite(out).all()
        x0 = model.net.x0(x_t, tt)
        x0_hat, eps_hat = proc.split(out, x_t, t)
        torch.testing.assert_close(x0_hat.double(), x0, atol=_atol(model, x_t, t), rtol=1e-4)
        torch.testing.assert_close(proc.target(x0_hat, eps_hat, tt), out, atol=1e-4, rtol=1e-4)
    if zero_snr and prediction != "epsilon":  # abar_999 = 0 exactly: the posterior mean is the data mean
        assert float(proc.abar[999]) == 0.0
        x0 = model.net.x0(x_t, torch.full((32,), 999))
        torch.testing.assert_close(x0, model.net.mixture.mean.expand(32, 2), atol=1e-12, rtol=0)


def test_model_device_grad_and_custom_mixture():
    model = toy2d_model()
    assert model.device == torch.device("cpu") and model.shape == (2,) and model.name == "toy2d"
    assert model.encode(["a", "b", ""]).shape == (3, 1)
    assert not any(p.requires_grad for p in model.net.parameters())
    x = torch.tensor([[1.5, 0.3], [-0.2, 1.9]], requires_grad=True)
    out = model.net(x, torch.tensor([300, 300]), None)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # custom weights: all mass on one component -> the posterior mean is that component's
    custom = MixtureDenoiser(GaussianProcess.from_config("cosine", 1000, True, "sample"), means=[[1.0, 1.0], [-3.0, 0.0]], std=[0.1, 0.2], weights=[1.0, 0.0])
    x0 = custom(torch.tensor([[-3.0, 0.0]]), torch.tensor([999]), None)
    torch.testing.assert_close(x0, torch.tensor([[1.0, 1.0]]))
    with pytest.raises(ValueError):
        GaussianMixture(std=0.0)
    with pytest.raises(ValueError):
        GaussianMixture(means=[1.0, 2.0])


@pytest.mark.parametrize("prediction", ["v_prediction", "epsilon"])
def test_sampling_reproduces_the_mixture(prediction):
    model = toy2d_model(prediction)
    mix = model.net.mixture
    N = 2000
    x = model.sample([""] * N, list(range(N)), num_inference_steps=50, eta=1.0).x0
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    k = mix.nearest(x)
    frac = torch.bincount(k, minlength=8).double() / N
    # binomial std of each fraction is sqrt(1/8 * 7/8 / 2000) = 0.0074: 4 std
    assert (frac - 1 / 8).abs().max() < 0.03, frac
    d = (x.double() - mix.means[k]).norm(dim=1)  # distance to the nearest mean
    per_axis_std = float((d**2).mean().div(2).sqrt())
    assert 0.10 < per_axis_std < 0.18, per_axis_std  # data: 0.15
    assert (d < 3 * 0.15).double().mean() > 0.98
    assert d.max() < 6 * 0.15
    # the samples are spread over the ring, not collapsed onto its centre
    assert (x.norm(dim=1) - 2).abs().mean() < 0.2


def test_target_reward_values_and_gradient():
    r = target_reward()
    assert r.differentiable and r.name == "toy2d-target"
    torch.testing.assert_close(ring_means()[0], torch.tensor([2.0, 0.0], dtype=torch.float64))  # the target is a mode
    x = torch.tensor([[2.0, 0.0], [0.0, 1.0]], requires_grad=True)
    v = r(x, ["", ""])
    torch.testing.assert_close(v, torch.tensor([0.0, -5.0]))  # (0-2)^2 + (1-0)^2 = 5
    v.sum().backward()
    torch.testing.assert_close(x.grad[0], torch.zeros(2))
    g = x.grad[1]  # -2 (x - target) = (4, -2): along target - x
    torch.testing.assert_close(g, torch.tensor([4.0, -2.0]))
    to_target = torch.tensor([2.0, 0.0]) - x[1].detach()
    assert torch.dot(g, to_target) / (g.norm() * to_target.norm()) > 0.999
    # another target; the black-box version: same values, no gradient
    x2 = torch.tensor([[1.0, 1.0], [-1.0, 3.0]])
    torch.testing.assert_close(target_reward((1.0, -1.0))(x2, ["", ""]), torch.tensor([-4.0, -20.0]))
    bb = target_reward_blackbox()
    assert not bb.differentiable
    xg = x.detach().clone().requires_grad_(True)
    vb = bb(xg, ["", ""])
    torch.testing.assert_close(vb, torch.tensor([0.0, -5.0]))
    assert not vb.requires_grad


def test_mixture_sample_and_log_prob():
    mix = GaussianMixture(**UNEVEN)
    x = mix.sample(40_000, torch.Generator().manual_seed(3))
    assert x.shape == (40_000, 2) and x.dtype == torch.float32
    torch.testing.assert_close(x.double().mean(0), mix.mean, atol=0.02, rtol=0)  # mean (0.3, -0.2)
    frac = torch.bincount(mix.nearest(x), minlength=3).double() / len(x)
    assert abs(frac[0] - 0.5) < 0.02  # the tight heavy component keeps its points
    # log-density by hand at two points
    pts = torch.tensor([[1.0, 0.5], [0.0, 0.0]], dtype=torch.float64)
    mu, s, w = torch.tensor(UNEVEN["means"]), torch.tensor(UNEVEN["std"]), torch.tensor(UNEVEN["weights"])
    dens = (w * torch.exp(-((pts[:, None] - mu) ** 2).sum(-1) / (2 * s**2)) / (2 * math.pi * s**2)).sum(1)
    torch.testing.assert_close(mix.log_prob(pts), dens.log())
