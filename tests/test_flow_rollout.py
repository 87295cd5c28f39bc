"""A flow process behind the same callers: ``DiffusionModel.sample`` and the rollout on the 2-D toy
flow, gradient windows and DRaFT-K against a closed form, DRaFT-LV's re-noising level, DDPO's
stochastic steps, the KL to the base model, and guidance methods, all unchanged for the caller."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.ddpo import DDPO
from rewardiff.finetune.diagnostics import kl_to_base
from rewardiff.finetune.draft import draft_k, draft_lv, refl
from rewardiff.guidance import guided_sample, make_method
from rewardiff.guidance.free2guide import informative_start
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.flow import FlowProcess
from rewardiff.rollout import last_k
from rewardiff.worlds import toy2d
from tests.helpers import ScaleDenoiser, linear_flow_factors, linear_flow_gradient

C = torch.tensor([0.5, -0.2, 0.1, 0.3])  # the target of the reward -||x - C||^2
SEEDS = [1, 2, 3]


def _reward(x, prompts):
    return -((x - C) ** 2).sum(1)


def _linear(w: float = 0.9, sde: str = "flow-grpo", shift: float = 3.0, n_train: int = 1000) -> tuple[DiffusionModel, ScaleDenoiser]:
    net = ScaleDenoiser(w)  # out = w x_t, read as the velocity
    process = FlowProcess(n_train, shift, sde=sde)  # type: ignore[arg-type]
    return DiffusionModel(net, process, lambda p: torch.zeros(len(p), 1), (4,), output_range=None), net


def _noises(model: DiffusionModel, seeds: list[int], T: int) -> list[torch.Tensor]:
    """The draws the rollout makes for ``model.sample``: each sample's own generator, step by step."""
    gens = model.step_generators(seeds)
    like = torch.zeros(1, *model.shape)
    return [torch.cat([model.process.noise_like(like, g) for g in gens]) for _ in range(T)]


# ----------------------------------------------------------------------------- sampling the toy


@pytest.mark.parametrize(("sde", "eta"), [("flow-grpo", 0.0), ("flow-grpo", 0.7), ("cps", 0.5)], ids=["ode", "sde", "cps"])
def test_the_toy_flow_samples_its_mixture_through_model_sample(sde, eta):
    """2,000 samples, 50 steps, through the same ``model.sample`` as the Gaussian toy: every mode
    holds 1/8 of them (4 binomial SE = 0.03), spread near the data's 0.15 (the ODE and the SDE
    within 7 %, what 50 steps of the exact velocity give by tests/test_flow_process.py's
    recursion; CPS narrower), log-probabilities only for stochastic steps, float timesteps."""
    model = toy2d.toy2d_flow_model(sde=sde)
    assert model.capabilities == {"chain", "gaussian"} and not informative_start(model.process)
    N = 2000
    traj = model.sample([""] * N, list(range(N)), 50, eta=eta)
    x, mix = traj.x0.double(), model.net.mixture
    assert x.shape == (N, 2) and torch.isfinite(x).all()
    share = torch.bincount(mix.nearest(x), minlength=8).double() / N
    assert (share - 1 / 8).abs().max() < 4 * math.sqrt(1 / 8 * 7 / 8 / N), share
    within = float(((x - mix.means[mix.nearest(x)]) ** 2).sum(1).mean().div(2).sqrt()) / 0.15
    assert (0.75 < within < 0.95) if sde == "cps" else abs(within - 1) < 0.07, within
    assert traj.timesteps == model.process.timesteps(50) and traj.timesteps[0] == 1000.0
    assert traj.log_probs.shape == (N, 50) and torch.isfinite(traj.log_probs).all()
    assert bool((traj.log_probs == 0).all()) == (eta == 0)
    again = model.sample([""] * 4, [7, 3, 1, 0], 50, eta=eta).x0  # a seed names its sample in any batch
    torch.testing.assert_close(again[[3, 2]], traj.x0[[0, 1]], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize(("sde", "eta"), [("flow-grpo", 0.0), ("flow-grpo", 0.7), ("cps", 0.7)], ids=["ode", "sde", "cps"])
def test_gradient_windows_match_the_closed_form_of_a_linear_velocity(sde, eta):
    """out = w x_t as the velocity, four steps (shift 3): x_0 and dL/dw of L = mean ||x_0 - c||^2
    through the last K steps (K = 4 with and without checkpointing, K = 2, K = 1) against the
    chain rule written out (tests.helpers.linear_flow_gradient), the stochastic chains with the
    rollout's own draws. The last step of diffusers' schedules spans sigma_min = 0.003 (shift 3)
    to 0, so on the ODE K = 1 carries almost no gradient."""
    model, net = _linear(sde=sde)
    T = 4
    ts = model.process.timesteps(T)
    noises = _noises(model, SEEDS, T) if eta > 0 else None
    grads = {}
    for k, ckpt in ((T, True), (T, False), (2, True), (1, True)):
        net.zero_grad()
        x0 = model.sample([""] * 3, SEEDS, T, eta=eta, grad_steps=last_k(T, k), checkpoint=ckpt).x0
        ((x0 - C) ** 2).sum(1).mean().backward()
        want_x0, want = linear_flow_gradient(ts, 0.9, model.noise(SEEDS), C, k, eta, sde, noises)
        torch.testing.assert_close(x0.detach().double(), want_x0, rtol=1e-5, atol=1e-5)
        assert float(net.w.grad) == pytest.approx(want, rel=1e-4), (k, ckpt)
        grads[k] = want
    assert max(abs(grads[T] - grads[j]) for j in (1, 2)) > 0.1 * abs(grads[T])  # the windows are told apart


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_draft_k_on_a_flow_matches_the_closed_form(eta):
    """DRaFT-K's loss (``_window_loss``: ``model.sample`` with ``last_k``) on the flow: the same
    closed form, K = 2 and K = T."""
    T = 4
    for k in (2, T):
        model, net = _linear()
        cfg = FinetuneConfig(num_inference_steps=T, guidance_scale=1.0, eta=eta, k=k)
        out = draft_k(model, _reward, [""] * 3, SEEDS, cfg, torch.Generator())
        out.loss.backward()
        noises = _noises(model, SEEDS, T) if eta > 0 else None
        _, want = linear_flow_gradient(model.process.timesteps(T), 0.9, model.noise(SEEDS), C, k, eta, "flow-grpo", noises)
        assert float(net.w.grad) == pytest.approx(want, rel=1e-4), k
        assert out.grad_from == T - k


def test_draft_lv_renoises_a_flow_at_the_last_level():
    """x_1 = (1 - s1) x0 + s1 eps (``add_noise`` at the last float timestep), one Euler step to 0:
    x = (1 - s1 w) x_1, so E[r] = -||(1 - s1 w)(1 - s1) x0 - c||^2 - (1 - s1 w)^2 s1^2 d and
    dE/dw = 2 s1 (1 - s1) ((1 - s1 w)(1 - s1) x0 - c) . x0 + 2 s1^3 (1 - s1 w) d (Monte Carlo over
    20,000 copies). N = 4 training timesteps put the last level at s1 = 1 / N = 0.25 (at N = 1000
    it is 0.001 and the gradient all but vanishes); the level before it, 0.4375, fails the check."""
    model, net = _linear(0.8, shift=1.0, n_train=4)
    cfg = FinetuneConfig(num_inference_steps=5, lv_n=20000, guidance_scale=1.0)
    out = draft_lv(model, _reward, ["p"], [7], cfg, torch.Generator().manual_seed(0))
    out.loss.backward()
    with torch.no_grad():
        x0 = model.sample(["p"], [7], 5).x0[0].double()
    s1, w, d = float(model.process.sigma_at(model.process.timesteps(5)[-1])), 0.8, 4
    dE = 2 * s1 * (1 - s1) * (((1 - s1 * w) * (1 - s1) * x0 - C.double()) * x0).sum() + 2 * s1**3 * (1 - s1 * w) * d
    torch.testing.assert_close(net.w.grad.double(), -dE, rtol=0.03, atol=1e-3)  # loss = -E[r]


def test_refl_and_ddpo_run_on_a_flow():
    """ReFL reads x0_hat at a float timestep with gradient; DDPO trains exactly the stochastic
    steps: every flow-grpo step (the last one too: it adds noise into sigma = 0), CPS all but the
    last (std = sigma' sin(a pi / 2) = 0 there)."""
    model, net = _linear()
    out = refl(model, _reward, [""] * 3, SEEDS, FinetuneConfig(num_inference_steps=4, guidance_scale=1.0), torch.Generator())
    out.loss.backward()
    assert net.w.grad is not None and math.isfinite(float(net.w.grad))
    for sde, want in (("flow-grpo", [0, 1, 2, 3]), ("cps", [0, 1, 2])):
        model, _ = _linear(sde=sde)
        cfg = FinetuneConfig(num_inference_steps=4, guidance_scale=1.0, eta=0.7, timestep_fraction=1.0, ppo_minibatches=1)
        losses = list(DDPO(cfg, model)(model, _reward, [""] * 3, SEEDS, cfg, torch.Generator().manual_seed(0)))
        assert sorted({lo.grad_from for lo in losses}) == want, sde
        assert all(torch.isfinite(lo.loss) for lo in losses)


def test_kl_to_the_base_model_on_a_flow_sde_is_the_closed_form():
    """Both models' SDE steps share std_j, so KL_j = ||(w - w_ref) q_j x_j||^2 / (2 std_j^2) along
    the fine-tuned model's own chain (the states from the same seeds), summed over the steps."""
    model, net = _linear(0.9)
    model.reference = copy.deepcopy(net).requires_grad_(False)
    model.reference.w.fill_(0.6)
    T, eta = 4, 0.7
    got = kl_to_base(model, [""] * 3, SEEDS, T, 1.0, eta=eta)
    with torch.no_grad():
        xs = model.sample([""] * 3, SEEDS, T, eta=eta, keep_states=True).xs
    want = sum(((0.3 * q * x) ** 2).sum(1) / (2 * b**2) for (_, q, b), x in zip(linear_flow_factors(model.process.timesteps(T), eta), xs))
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------- guidance on the toy flow


@pytest.mark.parametrize(("name", "kw"), [("best-of-n", {"width": 8}), ("svdd-pm", {"width": 8}),
                                          ("free2guide", {"width": 8, "window": 4}), ("smc", {"width": 8, "alpha": 0.5})])
def test_guidance_moves_toy_flow_samples_toward_the_reward(name, kw):
    """The guidance methods on the flow SDE (a = 0.7), unchanged: the steered samples' mean reward
    beats the base sampler's at the same seeds by at least 1 (the base mean is about -8)."""
    model = toy2d.toy2d_flow_model()
    reward = toy2d.target_reward_blackbox()
    prompts, seeds = [""] * 128, list(range(128))
    base = model.generate(prompts, seeds, num_inference_steps=10, eta=0.7)
    x, _ = guided_sample(model, make_method(name, reward, **kw), prompts, seeds, 10, guidance_scale=1.0, eta=0.7)
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 1.0
