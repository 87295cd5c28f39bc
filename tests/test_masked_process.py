"""The masked (absorbing-state) process: forward marginals, one reverse step by hand, candidate
draws and the ELBO weights of its training loss."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.processes.masked import MaskedProcess
from rewardiff.worlds.molecules.pretrain_masked import masked_diffusion_loss
from tests.helpers import L, MASK, V


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_forward_masking_matches_one_minus_alpha(schedule):
    proc = MaskedProcess(V, MASK, schedule, 100)
    x0 = torch.randint(2, V, (4000, L), generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for t in (0, 24, 49, 74, 99):
        s = (t + 1) / 100
        alpha = 1 - s if schedule == "linear" else 1 - math.cos(math.pi * (1 - s) / 2)  # closed form
        assert float(proc.alpha(t)) == pytest.approx(alpha, abs=1e-12)
        x_t = proc.add_noise(x0, gen, torch.full((4000,), t))
        share = float((x_t == MASK).float().mean())
        sd = math.sqrt(alpha * (1 - alpha) / x0.numel())
        assert abs(share - (1 - alpha)) <= 4 * sd + 1e-9, (t, share, 1 - alpha)
        assert torch.equal(x_t[x_t != MASK], x0[x_t != MASK])  # unmasked tokens are untouched
    assert float(proc.alpha(-1)) == 1.0 and proc.timesteps(4) == [99, 74, 49, 24]


def _hand_step():
    # N = 10, linear: alpha_5 = 1 - 6/10 = 0.4, alpha_2 = 1 - 3/10 = 0.7
    # a masked token stays masked with (1 - 0.7) / (1 - 0.4) = 0.5, else is drawn from x0_hat
    proc = MaskedProcess(4, MASK, "linear", 10)
    x_t = torch.tensor([[MASK, 2]])
    p0 = torch.tensor([0.5, 0.99, 0.3, 0.2])  # the mask's 0.99 must be ignored
    logits = torch.stack([p0.log(), torch.zeros(4)])[None]  # [1, 2, 4]
    return proc, x_t, logits


def test_one_reverse_step_by_hand():
    proc, x_t, logits = _hand_step()
    # x0_hat at position 0: softmax without the mask = [0.5, 0, 0.3, 0.2]; position 1 carried over
    # transition at position 0: 0.5 * x0_hat + 0.5 * e_mask = [0.25, 0.5, 0.15, 0.1]
    B = 20000
    out = proc.step(logits.expand(B, -1, -1), 5, 2, x_t.expand(B, -1), noise=proc.noise_like(x_t.expand(B, -1), torch.Generator().manual_seed(0)))
    assert torch.allclose(out.x0_hat[0], torch.tensor([[0.5, 0, 0.3, 0.2], [0, 0, 1, 0]]), atol=1e-6)
    assert torch.allclose(out.mean[0], torch.tensor([[0.25, 0.5, 0.15, 0.1], [0, 0, 1, 0]]), atol=1e-6)
    assert float(out.std) != 0.0
    freq = torch.bincount(out.prev[:, 0], minlength=4).float() / B  # Gumbel-max draws follow mean
    assert torch.allclose(freq, out.mean[0, 0], atol=4 * math.sqrt(0.25 / B))
    assert torch.equal(out.prev[:, 1], torch.full((B,), 2))  # carry-over
    expected = torch.tensor([0.25, 0.5, 0.15, 0.1]).log()[out.prev[:, 0]]  # + log 1 at position 1
    assert torch.allclose(out.log_prob, expected, atol=1e-6)
    assert torch.allclose(proc.log_prob(out.prev, out.mean, out.std), out.log_prob)


def test_the_last_step_fills_every_mask():
    proc, x_t, logits = _hand_step()
    out = proc.step(logits, 2, -1, x_t, noise=proc.noise_like(x_t, torch.Generator().manual_seed(3)))
    assert not bool((out.prev == MASK).any())
    assert float(out.mean[..., MASK].max()) == 0.0
    assert torch.allclose(out.mean[0, 0], torch.tensor([0.5, 0.0, 0.3, 0.2]), atol=1e-6)


def test_candidates_through_the_process_follow_the_transition():
    from rewardiff.guidance.base import candidates
    from rewardiff.types import StepContext

    proc, x_t, logits = _hand_step()
    out = proc.step(logits, 5, 2, x_t, noise=proc.noise_like(x_t, torch.Generator().manual_seed(0)))
    ctx = StepContext(0, 5, 2, x_t, out, None, [""])
    cands, rows = candidates(ctx, 4001, torch.Generator().manual_seed(1), proc)
    assert torch.equal(cands[0], out.prev[0]) and bool((rows == 0).all())
    freq = torch.bincount(cands[1:, 0], minlength=4).float() / 4000
    assert torch.allclose(freq, out.mean[0, 0], atol=4 * math.sqrt(0.25 / 4000))


def test_elbo_loss_weights_and_perfect_prediction():
    proc = MaskedProcess(V, MASK, "linear", 100)
    t = torch.tensor([0, 9, 99])
    assert torch.allclose(proc.elbo_weight(t), 1 / ((t + 1) / 100).float())  # 1 / s
    x0 = torch.randint(2, V, (3, L), generator=torch.Generator().manual_seed(0))
    x_t = proc.add_noise(x0, torch.Generator().manual_seed(1), t)
    perfect = torch.nn.functional.one_hot(x0, V).float() * 50.0
    loss, ce = masked_diffusion_loss(perfect, x0, x_t, t, proc)
    assert float(loss) < 1e-6 and float(ce) < 1e-6
    uniform = torch.zeros(3, L, V)  # CE = log(V - 1) per masked token (the mask is excluded)
    nelbo, ce = masked_diffusion_loss(uniform, x0, x_t, t, proc)
    assert float(ce) == pytest.approx(math.log(V - 1), rel=1e-5)
    k = (x_t == MASK).sum(1).float()  # NELBO = mean over rows of (1 / s) * k * log(V - 1) / L
    assert float(nelbo) == pytest.approx(float((k * 100 / (t + 1) * math.log(V - 1) / L).mean()), rel=1e-5)
