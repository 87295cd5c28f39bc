"""DDPO: the clipped PPO loss, transition log-probabilities, per-prompt advantages and training."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.ddpo import DDPO, PerPromptStats, ppo_loss, step_log_prob
from rewardiff.finetune.trainer import Run
from rewardiff.models.base import DiffusionModel
from rewardiff.worlds.shapes.denoiser import shapes_model
from rewardiff.processes.gaussian import GaussianProcess, make_betas
from tests.helpers import AffineDenoiser, assert_trains_and_resumes_bit_identically, blackbox_cfg


def test_ppo_loss_hand_example():
    """A = (1, -2), r = (1.5, 0.5), clip 0.2:
    row 1: max(-1.5, -1.2) = -1.2 (the clipped ratio 1.2 is the pessimistic one);
    row 2: max(1.0, 1.6) = 1.6 (for a negative advantage the clipped 0.8 is);
    mean 0.2. Inside the clip range the surrogate is -A r: A = 1, r = 1.1 -> -1.1."""
    assert float(ppo_loss(torch.tensor([1.0, -2.0]), torch.tensor([1.5, 0.5]), 0.2)) == pytest.approx(0.2)
    assert float(ppo_loss(torch.tensor([1.0]), torch.tensor([1.1]), 0.2)) == pytest.approx(-1.1)
    # the gradient vanishes where the clipped branch is taken, and is -A where it is not
    r = torch.tensor([1.5, 1.1], requires_grad=True)
    ppo_loss(torch.tensor([1.0, 1.0]), r, 0.2).backward()
    assert r.grad.tolist() == pytest.approx([0.0, -0.5])


def test_ddim_transition_log_prob_is_the_gaussian_density():
    """eta = 1, epsilon prediction: mean and sigma by DDIM's eq. 12 and 16 written out here,
    density from scipy, summed over the dimensions."""
    proc = GaussianProcess(make_betas("scaled_linear", beta_start=0.00085, beta_end=0.012), "epsilon")
    t, tp = 700, 500
    gen = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(3, 2, 4, 4, generator=gen) for _ in range(3))
    out = proc.step(eps, t, tp, x_t, 1.0, z)

    ab = np.cumprod(1 - np.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=np.float64) ** 2)
    a, ap = ab[t], ab[tp]
    sigma = math.sqrt((1 - ap) / (1 - a)) * math.sqrt(1 - a / ap)
    x0 = (x_t.double().numpy() - math.sqrt(1 - a) * eps.double().numpy()) / math.sqrt(a)
    mean = math.sqrt(ap) * x0 + math.sqrt(1 - ap - sigma**2) * eps.double().numpy()
    prev = mean + sigma * z.double().numpy()
    want = norm.logpdf(prev, mean, sigma).reshape(3, -1).sum(1)
    np.testing.assert_allclose(out.prev.numpy(), prev, atol=1e-5)
    np.testing.assert_allclose(out.log_prob.numpy(), want, rtol=1e-5)
    # the same density for a given x_prev, as DDPO re-evaluates it
    np.testing.assert_allclose(proc.log_prob(out.prev, out.mean, out.std).numpy(), want, rtol=1e-5)


def test_step_log_prob_reproduces_the_rollouts_log_probs(tiny_model_dir):
    """Re-evaluating each recorded transition with the same weights gives the rollout's own
    log-probabilities (with classifier-free guidance)."""
    model = shapes_model(tiny_model_dir)
    cfg = FinetuneConfig(num_inference_steps=4, eta=1.0, guidance_scale=2.0)
    prompts = ["two red circles", "one blue square"]
    with torch.no_grad():
        traj = model.sample(prompts, [1, 2], 4, eta=1.0, guidance_scale=2.0, keep_states=True)
        ts = traj.timesteps
        cond, uncond = model.encode(prompts), model.encode(["", ""])
        for j in range(3):  # the last step is deterministic (abar after it is 1)
            lp = step_log_prob(model, traj.xs[j], traj.xs[j + 1], ts[j], ts[j + 1], cond, uncond, cfg)
            torch.testing.assert_close(lp, traj.log_probs[:, j], rtol=1e-5, atol=1e-2)


def test_per_prompt_statistics_by_hand():
    """min_count 2: a prompt seen fewer than twice is normalized with the batch's statistics;
    from then on with its own buffer (last 3 rewards)."""
    stats = PerPromptStats(buffer_size=3, min_count=2)
    a1 = stats.advantages(["a", "b"], torch.tensor([1.0, 3.0]))  # batch mean 2, std 1
    assert a1.tolist() == pytest.approx([-1.0, 1.0], abs=1e-5)
    a2 = stats.advantages(["a", "a"], torch.tensor([2.0, 3.0]))  # buffer a = [1, 2, 3]: mean 2, std sqrt(2/3)
    assert a2.tolist() == pytest.approx([0.0, 1 / math.sqrt(2 / 3)], abs=1e-5)
    a3 = stats.advantages(["a"], torch.tensor([5.0]))  # buffer keeps the last 3: [2, 3, 5]
    m, s = np.mean([2, 3, 5]), np.std([2, 3, 5])
    assert a3.tolist() == pytest.approx([(5 - m) / s], abs=1e-5)
    restored = PerPromptStats(3, 2)
    restored.load_state_dict(json.loads(json.dumps(stats.state_dict())))
    assert restored.advantages(["a"], torch.tensor([4.0])).tolist() == stats.advantages(["a"], torch.tensor([4.0])).tolist()


def test_ddpo_raises_a_black_box_reward_on_a_toy():
    """Reward x[0], read as values only: DDPO must push the bias's first coordinate up and
    leave the reward's blind coordinate roughly alone."""
    proc = GaussianProcess(make_betas("linear"), "sample")
    net = AffineDenoiser()
    model = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    reward = lambda x, prompts: x[:, 0].detach()  # noqa: E731
    cfg = FinetuneConfig(num_inference_steps=4, eta=1.0, guidance_scale=1.0, batch_size=32, ppo_minibatches=1, ppo_clip=0.2,
                         stat_min_count=10_000)
    ddpo = DDPO(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    first = last = None
    for step in range(25):
        gen = torch.Generator().manual_seed(step)
        for out in ddpo(model, reward, [""] * 32, list(range(step * 32, step * 32 + 32)), cfg, gen):
            out.loss.backward()
            if out.step:
                opt.step()
                opt.zero_grad()
        first = float(out.reward.mean()) if first is None else first
        last = float(out.reward.mean())
    assert net.b[0] > 0.4, net.b
    assert last > first + 0.4
    assert abs(float(net.b[1].detach())) < 0.5 * float(net.b[0].detach())


def test_ddpo_refuses_a_deterministic_sampler(tiny_model_dir):
    with pytest.raises(UserError, match="eta"):
        Run(blackbox_cfg(tiny_model_dir, eta=0.0), "unused", progress=False)


@pytest.mark.slow
def test_ddpo_trains_and_resumes_bit_identically(tiny_model_dir, tmp_path):
    """(DDPO's reward statistics come back from the checkpoint; see the helper.)"""
    assert_trains_and_resumes_bit_identically(tiny_model_dir, tmp_path, "ddpo")
