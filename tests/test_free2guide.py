"""Free2Guide: the reference's steps (initial noises at step 0, candidates on steps 1 .. window-1),
the zero-terminal-SNR start, identities, exact NFE for both starts, the kept history of the
chosen noise, and the toy reward rising with either start."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.guidance import guided_sample, make_method
from rewardiff.guidance.free2guide import informative_start
from rewardiff.guidance.sample import particle_seeds
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess, make_betas
from rewardiff.worlds import toy2d


def _sd_like_toy() -> DiffusionModel:
    """The toy mixture on Stable Diffusion's schedule (scaled linear, epsilon): abar_999 ~ 0.005."""
    process = GaussianProcess(make_betas("scaled_linear", 1000, 0.00085, 0.012), "epsilon")
    net = toy2d.MixtureDenoiser(process).eval()
    return DiffusionModel(net, process, lambda prompts: torch.zeros(len(prompts), 1), (2,), name="toy2d-sd", output_range=None)


def test_the_start_is_informative_only_without_zero_terminal_snr():
    assert not informative_start(GaussianProcess.from_config("cosine", 1000, True, "v_prediction"))
    assert not informative_start(GaussianProcess.from_config("cosine", 1000, True, "epsilon"))  # abar clamped to 2^-24
    assert not informative_start(GaussianProcess.from_config("cosine", 1000, False, "v_prediction"))  # abar_999 ~ 2e-9
    assert informative_start(_sd_like_toy().process)


def test_on_zero_snr_the_first_x0_estimate_is_the_same_for_every_noise():
    """The exact denoiser at t = 999 of a zero-SNR schedule: x0_hat(x_T) = E[x0] = 0 for any x_T."""
    toy = toy2d.toy2d_model()
    x_T = torch.randn(16, 2, generator=torch.Generator().manual_seed(0))
    t = toy.process.timesteps(10)[0]
    x0_hat, _ = toy.process.split(toy.net(x_T, torch.full((16,), t)), x_T, t)
    assert float(x0_hat.abs().max()) < 1e-5


@pytest.mark.parametrize("start", ["auto", "noise", "step"])
def test_options_say_which_start_was_used(start):
    reward = toy2d.target_reward_blackbox()
    meth = make_method("free2guide", reward, width=3, start=start)
    guided_sample(toy2d.toy2d_model(), meth, [""] * 2, [0, 1], 4, guidance_scale=1.0)
    used = meth.options()["start"]
    assert used.startswith("step" if start in ("auto", "step") else "noise")
    assert meth.window == 6  # the reference guides steps 0 .. 5


@pytest.mark.parametrize("kw", [{"width": 1}, {"width": 4, "lam": math.inf}])
def test_width_one_or_uniform_selection_is_the_base_sampler_with_an_informative_start(kw):
    toy = _sd_like_toy()
    seeds = [3, 4, 5]
    base = toy.generate([""] * 3, seeds, num_inference_steps=5, eta=1.0)
    x, info = guided_sample(toy, make_method("free2guide", toy2d.target_reward_blackbox(), **kw), [""] * 3, seeds, 5, guidance_scale=1.0)
    assert torch.equal(x, base) and info["nfe_per_sample"] == 5


@pytest.mark.parametrize(("start", "T"), [("noise", 4), ("step", 4), ("noise", 8), ("step", 8), ("noise", 1), ("step", 1)])
def test_nfe_is_exact_for_both_starts(start, T):
    toy = _sd_like_toy()
    meth = make_method("free2guide", toy2d.target_reward_blackbox(), width=3, window=3, start=start)
    _, info = guided_sample(toy, meth, [""] * 4, [0, 1, 2, 3], T, guidance_scale=1.0)
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"] == meth.cost(T, 1)
    # D = min(window, T - 1) decisions of n - 1 extra calls; at T = 1 only the noise choice
    D = {4: 3, 8: 3, 1: 1 if start == "noise" else 0}[T]
    assert meth.cost(T, 1) == T + 2 * D


def test_the_chosen_noise_keeps_its_own_x_T_and_first_step():
    """Step 0 selects whole particles: the kept xs[0], x_{t_1} and first log-probability are
    the chosen initial noise's own, as the base sampler run from that noise's seed has them."""
    toy = _sd_like_toy()
    meth = make_method("free2guide", toy2d.target_reward_blackbox(), width=4, window=1, start="noise")
    seeds, T, n = [10, 11, 12], 5, 4
    meth.check(1.0, toy.process)
    meth.begin(len(seeds), toy, 1.0)
    ps = [x for s in seeds for x in particle_seeds(s, n)]
    with torch.no_grad():
        traj = toy.sample([""] * len(ps), ps, T, eta=1.0, hook=meth, keep_states=True)
    assert traj.x0.shape[0] == 3
    for r, s in enumerate(seeds):
        own = [j for j, sd in enumerate(particle_seeds(s, n)) if torch.equal(toy.noise([sd])[0], traj.xs[0][r])]
        assert len(own) == 1
        with torch.no_grad():
            ref = toy.sample([""], [particle_seeds(s, n)[own[0]]], T, eta=1.0, keep_states=True)
        assert torch.allclose(traj.xs[1][r], ref.xs[1][0], atol=1e-6)  # window 1: only the start chosen
        assert torch.allclose(traj.log_probs[r], ref.log_probs[0], atol=1e-4)
        assert torch.allclose(traj.x0[r], ref.x0[0], atol=1e-5)


@pytest.mark.parametrize(("model", "start"), [("sd", "noise"), ("zero-snr", "step")])
def test_free2guide_raises_the_toy_reward_over_the_base_sampler(model, start):
    toy = _sd_like_toy() if model == "sd" else toy2d.toy2d_model()
    reward = toy2d.target_reward_blackbox()
    n = 128
    prompts, seeds = [""] * n, list(range(n))
    base = toy.generate(prompts, seeds, num_inference_steps=12, eta=1.0)
    meth = make_method("free2guide", reward, width=8)
    x, _ = guided_sample(toy, meth, prompts, seeds, 12, guidance_scale=1.0)
    assert meth.options()["start"].startswith(start)
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 1.0


@pytest.mark.parametrize(("offset", "window", "T", "D"), [(2, 3, 8, 3), (5, 3, 8, 2), (7, 3, 8, 0), (1, 10, 8, 6)])
def test_offset_guides_later_steps_only(offset, window, T, D):
    """The ablation's "guide later": with ``offset`` the states up to step ``offset`` are the base
    sampler's own (same seeds, no initial-noise choice), and D counts the decisions left before
    the last step."""
    toy = _sd_like_toy()
    seeds = [3, 4]
    meth = make_method("free2guide", toy2d.target_reward_blackbox(), width=3, window=window, offset=offset, start="noise")
    _, info = guided_sample(toy, meth, [""] * 2, seeds, T, guidance_scale=1.0)
    assert meth.particles == 1 and meth.decisions(T) == D
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"] == T + 2 * D
    meth.check(1.0, toy.process)
    meth.begin(2, toy, 1.0)
    with torch.no_grad():
        traj = toy.sample([""] * 2, seeds, T, eta=1.0, hook=meth, keep_states=True)
        ref = toy.sample([""] * 2, seeds, T, eta=1.0, keep_states=True)
    for i in range(offset + 1):
        assert torch.allclose(traj.xs[i], ref.xs[i], atol=1e-6)
    if D:
        assert not torch.allclose(traj.xs[offset + 1], ref.xs[offset + 1], atol=1e-6)  # the first guided step chose
