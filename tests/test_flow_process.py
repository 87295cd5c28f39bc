"""The flow-matching process: schedules and the Euler ODE against diffusers'
FlowMatchEulerDiscreteScheduler, the Flow-GRPO SDE's density against scipy, noise scale 0 as
the ODE, CPS's noise level, and the three samplers' marginals on the 2-D toy with its exact
velocity. The SDE mean and the CPS step each meet a deliberately broken copy of themselves
(``monkeypatch``, undone after the test) that the same check must fail."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from scipy.stats import norm

from rewardiff.processes import flow
from rewardiff.processes.flow import SDES, FlowProcess
from rewardiff.rollout import rollout
from rewardiff.worlds.toy2d import toy2d_flow_model

SCHEDULES = [  # (diffusers config, mu)
    ({"shift": 3.0}, None),  # SD3
    ({"use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}, 0.9),  # FLUX-style time shift
]
IDS = ["shift3", "dynamic"]


def _pair(config: dict, mu: float | None, n: int = 10) -> tuple[FlowMatchEulerDiscreteScheduler, FlowProcess]:
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    ref.set_timesteps(n, mu=mu)
    return ref, FlowProcess.from_scheduler_config(dict(ref.config), mu=mu)


# ----------------------------------------------------------------------------- schedule and ODE


@pytest.mark.parametrize("n", [1, 10, 28])
@pytest.mark.parametrize(("config", "mu"), SCHEDULES, ids=IDS)
def test_timesteps_and_sigmas_match_diffusers(config, mu, n):
    """diffusers holds float32; ours are float64 (relative difference ~1e-7)."""
    ref, proc = _pair(config, mu, n)
    ts = proc.timesteps(n)
    assert all(isinstance(t, float) for t in ts) and ts[0] == 1000.0
    np.testing.assert_allclose(ts, ref.timesteps.double().numpy(), rtol=1e-6)
    sigmas = [t / 1000 for t in ts + proc.prev_timesteps(ts)[-1:]]
    np.testing.assert_allclose(sigmas, ref.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    assert proc.prev_timesteps(ts) == ts[1:] + [0.0]


@pytest.mark.parametrize("n", [1, 4, 28])
@pytest.mark.parametrize(("config", "mu"), SCHEDULES, ids=IDS)
def test_the_flux_grid_matches_the_sigmas_fluxpipeline_passes(config, mu, n):
    """``sigma_grid="flux"``: FluxPipeline's ``set_timesteps(sigmas=np.linspace(1, 1/n, n), mu=mu)``,
    the same shift over evenly spaced sigmas that end at 1/n, not at the smallest training sigma
    (so with n = 4 and no shift: 1000, 750, 500, 250)."""
    ref = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, **config)
    ref.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    proc = FlowProcess.from_scheduler_config(dict(ref.config), mu=mu, sigma_grid="flux")
    ts = proc.timesteps(n)
    assert ts[0] == 1000.0 and proc.prev_timesteps(ts)[-1] == 0.0
    np.testing.assert_allclose(ts, ref.timesteps.double().numpy(), rtol=1e-6)
    assert FlowProcess(sigma_grid="flux").timesteps(4) == [1000.0, 750.0, 500.0, 250.0]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="mu"):
        FlowProcess(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="unknown sde"):
        FlowProcess(sde="ddpm")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown sigma_grid"):
        FlowProcess(sigma_grid="karras")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        FlowProcess.from_scheduler_config({"use_karras_sigmas": True})
    with pytest.raises(ValueError, match="cps needs eta"):
        FlowProcess(sde="cps").step(torch.zeros(1, 2), 1000.0, 500.0, torch.zeros(1, 2), eta=1.5)
    with pytest.raises(ValueError, match="num_inference_steps"):
        FlowProcess().timesteps(0)


@pytest.mark.parametrize(("config", "mu"), SCHEDULES, ids=IDS)
def test_ode_step_matches_diffusers(config, mu):
    """Ten Euler steps x_{t'} = x_t + (sigma' - sigma) v against ``FlowMatchEulerDiscreteScheduler.step``
    with random velocities, each from diffusers' own previous state, to 1e-5."""
    ref, proc = _pair(config, mu)
    ts = proc.timesteps(10)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, (t, tp) in enumerate(zip(ts, proc.prev_timesteps(ts))):
        v = torch.randn(x.shape, generator=g)
        want = ref.step(v, ref.timesteps[i], x).prev_sample
        got = proc.step(v, t, tp, x, eta=0.0)
        torch.testing.assert_close(got.prev, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.x0_hat, x - ref.sigmas[i] * v, atol=1e-5, rtol=1e-5)
        assert float(got.std) == 0.0 and torch.equal(got.log_prob, torch.zeros(2))
        x = want


def test_forward_process_split_and_target():
    """x_t = (1 - sigma) x0 + sigma eps; the output equal to the target v = eps - x0 gives back (x0, eps)."""
    proc = FlowProcess(shift=3.0)
    x0, eps = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    t = torch.tensor([0.0, 412.5, 1000.0])
    x_t = proc.add_noise(x0, eps, t)
    s = (t / 1000).reshape(3, 1, 1, 1)
    torch.testing.assert_close(x_t, (1 - s) * x0 + s * eps)
    x0_hat, eps_hat = proc.split(proc.target(x0, eps, t), x_t, t)
    torch.testing.assert_close(x0_hat, x0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(eps_hat, eps, atol=1e-6, rtol=1e-6)
    assert float(proc.snr(1000.0)) == 0.0 and math.isinf(float(proc.snr(0.0)))


def test_both_continuous_processes_fit_the_contract_and_the_masked_one_only_the_rollouts():
    from rewardiff.processes.gaussian import GaussianProcess
    from rewardiff.processes.masked import MaskedProcess
    from rewardiff.types import ContinuousProcess, Process

    for proc in (FlowProcess(), FlowProcess(sde="cps"), GaussianProcess.from_config()):
        assert isinstance(proc, ContinuousProcess) and isinstance(proc, Process)
    assert isinstance(MaskedProcess(8, 1), Process) and not isinstance(MaskedProcess(8, 1), ContinuousProcess)


# ----------------------------------------------------------------------------- the Flow-GRPO SDE


def _flipped_sde_mean(x_t, v, s, s_next, std_t):
    """The SDE mean with the sign of its score correction on x_t flipped (a mutation)."""
    dt = s_next - s
    return x_t * (1 - std_t**2 * dt / (2 * s)) + v * ((1 + std_t**2 * (1 - s) / (2 * s)) * dt)


def _sde_against_scipy(proc: FlowProcess, eta: float = 0.7) -> float:
    """The largest error of the SDE step's mean, std and log-density (of its own draw and of an
    unrelated point) against the equation written out in numpy and scipy.stats.norm, over the
    first step (sigma = 1, read as the schedule's sigma_1 in the denominator, as flow_grpo's
    ``sigmas[1]``), a middle one and the last one (into sigma = 0)."""
    ts = proc.timesteps(10)
    prevs = proc.prev_timesteps(ts)
    g = torch.Generator().manual_seed(1)
    worst = 0.0
    for j in (0, 4, 9):
        x, v, z, y = (torch.randn(2, 3, 4, 4, generator=g) for _ in range(4))
        out = proc.step(v, ts[j], prevs[j], x, eta=eta, noise=z)
        s, sp, s1 = ts[j] / 1000, prevs[j] / 1000, ts[1] / 1000
        dt = sp - s
        std_t = eta * math.sqrt(s / (1 - (s1 if s == 1 else s)))
        xn, vn = x.double().numpy(), v.double().numpy()
        mean = xn * (1 + std_t**2 * dt / (2 * s)) + vn * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        scale = std_t * math.sqrt(-dt)
        want_lp = norm.logpdf(out.prev.double().numpy(), mean, scale).reshape(2, -1).sum(1)
        want_y = norm.logpdf(y.double().numpy(), mean, scale).reshape(2, -1).sum(1)
        got_y = proc.log_prob(y, out.mean, out.std).double().numpy()
        worst = max(worst, float(np.abs(out.mean.double().numpy() - mean).max()), abs(float(out.std) - scale) / scale,
                    float(np.abs(out.log_prob.double().numpy() - want_lp).max() / np.abs(want_lp).max()),
                    float(np.abs(got_y - want_y).max() / np.abs(want_y).max()))
    return worst


def test_sde_step_log_prob_matches_scipy_and_a_flipped_mean_does_not(monkeypatch):
    """The exact Gaussian log-density, summed over the 48 dimensions (flow_grpo averages them: a
    named deviation, as this project's DDPO, which divides by the dimension itself)."""
    proc = FlowProcess(shift=3.0)
    assert _sde_against_scipy(proc) < 1e-5
    monkeypatch.setattr(flow, "flow_grpo_mean", _flipped_sde_mean)
    assert _sde_against_scipy(proc) > 1e-2


@pytest.mark.parametrize("sde", SDES)
def test_noise_scale_zero_gives_back_the_ode_step(sde):
    """eta = 0 is the ODE step whichever sde; at a = 0 the SDE's mean is the ODE step bit for bit
    and CPS's to rounding; a tiny eta is continuous with it."""
    proc = FlowProcess(shift=3.0, sde=sde)
    g = torch.Generator().manual_seed(2)
    x, v = torch.randn(4, 2, generator=g), torch.randn(4, 2, generator=g)
    ts = proc.timesteps(10)
    for t, tp in zip(ts, proc.prev_timesteps(ts)):
        ode = x + (tp - t) / 1000 * v
        out = proc.step(v, t, tp, x, eta=0.0, noise=torch.randn(4, 2, generator=g))
        assert torch.equal(out.prev, out.mean) and float(out.std) == 0.0
        torch.testing.assert_close(out.prev, ode, atol=1e-6, rtol=0)
        s, sp = t / 1000, tp / 1000
        assert torch.equal(flow.flow_grpo_mean(x, v, s, sp, 0.0), x + (sp - s) * v)
        x0_hat, eps_hat = proc.split(v, x, t)
        torch.testing.assert_close(flow.cps_mean(x0_hat, eps_hat, sp, 0.0), out.prev, atol=1e-6, rtol=0)
        tiny = proc.step(v, t, tp, x, eta=1e-7, noise=torch.randn(4, 2, generator=g))
        torch.testing.assert_close(tiny.prev, out.prev, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- CPS


def _overdispersed_cps_mean(x0_hat, eps_hat, s_next, std):
    """CPS with the noise estimate's coefficient sigma' instead of sqrt(sigma'^2 - std^2) (a mutation)."""
    return x0_hat * (1 - s_next) + eps_hat * s_next


def _cps_noise_level(proc: FlowProcess, j: int, eta: float = 0.7, n: int = 200_000) -> tuple[float, float, float, float]:
    """Step j from x_t = (1 - sigma) x0 + sigma eps with the exact velocity eps - x0: the
    regression slope of x_{t'} on x0 and the variance of x_{t'} - (1 - sigma') x0 (empirical),
    each with sigma' and the standard errors' scale: (slope, 1 - sigma', variance, sigma'^2)."""
    g = torch.Generator().manual_seed(3 + j)
    ts = proc.timesteps(10)
    t, tp = ts[j], proc.prev_timesteps(ts)[j]
    x0 = 0.3 + 1.5 * torch.randn(n, 2, generator=g, dtype=torch.float64)
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t = proc.add_noise(x0, eps, torch.tensor(t))
    out = proc.step(proc.target(x0, eps, t), t, tp, x_t, eta=eta, noise=torch.randn(n, 2, generator=g, dtype=torch.float64))
    sp = tp / 1000
    a, b = x0.flatten(), out.prev.flatten()
    slope = float(((a - a.mean()) * (b - b.mean())).sum() / ((a - a.mean()) ** 2).sum())
    resid = b - (1 - sp) * a
    return slope, 1 - sp, float(resid.var()), sp**2


def _cps_check(proc: FlowProcess) -> bool:
    """Noise level sigma' within 4 standard errors at three steps: slope SE = sqrt(sigma'^2 / (n var x0)),
    variance SE = sigma'^2 sqrt(2 / n) with n = 400,000 numbers."""
    ok = True
    for j in (0, 4, 8):
        slope, want_slope, var, want_var = _cps_noise_level(proc, j)
        n = 400_000
        ok &= abs(slope - want_slope) < 4 * math.sqrt(want_var / (n * 1.5**2))
        ok &= abs(var - want_var) < 4 * want_var * math.sqrt(2 / n)
    return bool(ok)


def test_cps_keeps_the_noise_level_and_an_off_coefficient_does_not(monkeypatch):
    """Given x0 exactly, x_{t'} = (1 - sigma') x0 + noise of variance sigma'^2 (Wang & Yu 2025):
    the coefficients of x_{t'} are those of the forward process at sigma'; std = sigma' sin(a pi / 2)."""
    proc = FlowProcess(shift=3.0, sde="cps")
    ts = proc.timesteps(10)
    assert float(proc.step_std(ts[4], ts[5], 0.7)) == pytest.approx(ts[5] / 1000 * math.sin(0.7 * math.pi / 2), rel=1e-12)
    assert float(proc.step_std(ts[9], 0.0, 0.7)) == 0.0  # into the clean sample: deterministic
    assert _cps_check(proc)
    monkeypatch.setattr(flow, "cps_mean", _overdispersed_cps_mean)
    assert not _cps_check(proc)


# ----------------------------------------------------------------------------- the samplers' marginals

SAMPLERS = [("flow-grpo", 0.0), ("flow-grpo", 0.7), ("cps", 0.7)]  # the ODE, the SDE, CPS
SAMPLER_IDS = ["ode", "sde", "cps"]


def _moments(ts: list[float], sde: str, eta: float, mu: float, var0: float) -> tuple[float, float]:
    """Mean and variance per axis after the chain ``ts`` on data N(mu, var0 I), from x_T ~ N(0, I).

    The exact velocity of that data is linear: with c = 1 - s and V = c^2 var0 + s^2,
    v(x) = g (x - c mu) - mu, g = (s - c var0) / V. Each step is x' = a0 x + p v + b z with,
    written out from the equations (dt = s' - s):
        ODE   a0 = 1, p = dt, b = 0
        SDE   k = std_t^2: a0 = 1 + k dt / (2 s), p = (1 + k (1 - s) / (2 s)) dt, b = std_t sqrt(-dt)
        CPS   b = s' sin(a pi / 2), q = sqrt(s'^2 - b^2): a0 = 1 - s' + q, p = q (1 - s) - (1 - s') s
    so x' = A x + const with A = a0 + p g, and the moments follow m' = A m - p (g c + 1) mu,
    W' = A^2 W + b^2 exactly, for the discrete chain."""
    m, W = 0.0, 1.0
    for t, tp in zip(ts, ts[1:] + [0.0]):
        s, sp = t / 1000, tp / 1000
        c = 1 - s
        g = (s - c * var0) / (c * c * var0 + s * s)
        dt = sp - s
        if eta == 0:
            a0, p, b = 1.0, dt, 0.0
        elif sde == "flow-grpo":
            k = eta**2 * s / (1 - (sp if s == 1 else s))
            a0, p, b = 1 + k * dt / (2 * s), (1 + k * (1 - s) / (2 * s)) * dt, math.sqrt(k * -dt)
        else:
            b = sp * math.sin(eta * math.pi / 2)
            q = math.sqrt(max(sp * sp - b * b, 0.0))
            a0, p = 1 - sp + q, q * (1 - s) - (1 - sp) * s
        A = a0 + p * g
        m, W = A * m - p * (g * c + 1) * mu, A * A * W + b * b
    return m, W


def _chain_matches_its_moments(sde: str, eta: float, n: int = 20_000, T: int = 50) -> bool:
    """The rollout's samples on one Gaussian N((0.5, 0.5), 0.15^2 I) (shift 3) against
    :func:`_moments`, within 4 standard errors: sqrt(W / n) for the mean, W sqrt(2 / n) for the variance."""
    model = toy2d_flow_model(3.0, sde, means=[[0.5, 0.5]], std=0.15)
    ts = model.process.timesteps(T)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        x = rollout(model.net, model.process, torch.randn(n, 2, generator=g), torch.zeros(n, 1), ts, eta=eta, generator=g).x0
    m, W = _moments(ts, sde, eta, 0.5, 0.15**2)
    x = x.double()
    return bool(((x.mean(0) - m).abs() < 4 * math.sqrt(W / n)).all() and ((x.var(0) - W).abs() < 4 * W * math.sqrt(2 / n)).all())


@pytest.mark.parametrize(("sde", "eta"), SAMPLERS, ids=SAMPLER_IDS)
def test_each_chain_has_the_moments_of_its_equations_on_one_gaussian(sde, eta):
    """With one Gaussian component the exact velocity is linear, so the discrete chain's mean and
    variance are known exactly (no discretization allowance): 20,000 particles, 50 steps."""
    assert _chain_matches_its_moments(sde, eta)


def test_in_the_limit_the_ode_and_sde_reach_the_data_and_cps_stays_narrower():
    """The moment recursion at 1,000 steps, data std 0.15 and 1.0: the ODE's and the SDE's final std
    is within 0.5 % of the data's; CPS's (a = 0.7) stays about 15 % below it at any step count.

    Why: with x0_hat = E[x0 | x_t] rather than x0, a CPS step replaces the fraction sin^2(a pi / 2)
    of the noise by fresh noise, and the part of x0's spread that eps_hat carried is lost; in one
    dimension the step's variance falls short by c^2 V0 s^2 (1 - cos(a pi / 2))^2 / V (c^2 V0, s^2:
    signal and noise variance, V their sum), which does not shrink with the step. DDIM's sigma_t,
    in contrast, vanishes with the step size. CPS keeps the coefficients of x_{t'} given x0
    (test above), not the marginal distribution."""
    ts = FlowProcess().timesteps(1000)
    for std in (0.15, 1.0):
        ratio = {name: math.sqrt(_moments(ts, sde, eta, 0.0, std**2)[1]) / std for name, (sde, eta) in zip(SAMPLER_IDS, SAMPLERS)}
        assert abs(ratio["ode"] - 1) < 5e-3 and abs(ratio["sde"] - 1) < 5e-3, ratio
        assert 0.83 < ratio["cps"] < 0.87, ratio


def _mixture_stats(sde: str, eta: float, n: int = 10_000, T: int = 200) -> dict[str, float]:
    """Samples of the ring mixture (8 modes of std 0.15 on radius 2) from N(0, I) through the
    exact velocity, as z-scores against the data's exact moments: the largest |mean error| /
    SE (SE = sqrt(2.0225 / n)), |covariance error| / SE (SE = sqrt(Var((x_i - m_i)(x_j - m_j)) / n)
    from a fresh data sample), |mode share - 1/8| / SE (binomial), and the within-mode std
    (distance to the nearest mean) over the data's 0.15."""
    model = toy2d_flow_model(1.0, sde)
    mix = model.net.mixture
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        x = rollout(model.net, model.process, torch.randn(n, 2, generator=g), torch.zeros(n, 1), model.process.timesteps(T),
                    eta=eta, generator=g).x0.double()
    var = 2.0 + 0.15**2  # per axis: E[(2 cos theta)^2] = 2 over the 8 angles, plus the component variance
    ref = mix.sample(200_000, torch.Generator().manual_seed(6)).double()
    prod_sd = torch.stack([ref[:, i] * ref[:, j] for i in range(2) for j in range(2)], 1).std(0)  # [4]
    cov = torch.cov(x.T).flatten()
    want_cov = torch.tensor([var, 0.0, 0.0, var], dtype=torch.float64)
    k = mix.nearest(x)
    share = torch.bincount(k, minlength=8).double() / n
    within = float(((x - mix.means[k]) ** 2).sum(1).mean().div(2).sqrt())
    return {
        "mean": float(x.mean(0).abs().max() / math.sqrt(var / n)),
        "cov": float(((cov - want_cov).abs() / (prod_sd / math.sqrt(n))).max()),
        "share": float((share - 1 / 8).abs().max() / math.sqrt(1 / 8 * 7 / 8 / n)),
        "within": within / 0.15,
    }


def _matches_the_mixture(stats: dict[str, float]) -> bool:
    """Moments and mode shares within 4 SE; the within-mode std within 3 % (4 SE = 1.4 % at
    n = 10,000, plus the 200-step chain's discretization bias, up to 1 % by the recursion)."""
    return stats["mean"] < 4 and stats["cov"] < 4 and stats["share"] < 4 and abs(stats["within"] - 1) < 0.03


@pytest.mark.parametrize(("sde", "eta"), SAMPLERS, ids=SAMPLER_IDS)
def test_marginals_on_the_toy_mixture(sde, eta):
    """The ODE and the SDE (a = 0.7) reproduce the data at sigma = 0; CPS reproduces its mean,
    covariance and mode shares but its modes come out narrower, by the recursion's 15 %."""
    stats = _mixture_stats(sde, eta)
    if sde == "cps":
        assert stats["mean"] < 4 and stats["cov"] < 4 and stats["share"] < 4, stats
        assert 0.78 < stats["within"] < 0.9, stats
    else:
        assert _matches_the_mixture(stats), stats


def test_a_flipped_sde_mean_breaks_the_moments_and_the_marginals(monkeypatch):
    monkeypatch.setattr(flow, "flow_grpo_mean", _flipped_sde_mean)
    assert not _chain_matches_its_moments("flow-grpo", 0.7)
    assert not _matches_the_mixture(_mixture_stats("flow-grpo", 0.7))


def test_an_off_cps_coefficient_breaks_the_moments(monkeypatch):
    monkeypatch.setattr(flow, "cps_mean", _overdispersed_cps_mean)
    assert not _chain_matches_its_moments("cps", 0.7)
