"""Masked (absorbing-state) diffusion: forward marginals, one reverse step by hand, the
rollout on token ids, guidance identities and exact NFE, and the shipped molecules model."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.guidance import guided_sample, make_method
from rewardiff.models.base import DiffusionModel
from rewardiff.worlds.molecules.masked import MaskedDenoiser, MaskedModelConfig
from rewardiff.processes.masked import MaskedProcess
from rewardiff.rewards.base import RewardFn
from rewardiff.worlds.molecules.pretrain_masked import masked_diffusion_loss

V, L, MASK = 8, 6, 1


def _tiny(seed: int = 0) -> DiffusionModel:
    torch.manual_seed(seed)
    cfg = MaskedModelConfig(vocab_size=V, max_len=L, mask_id=MASK, dim=16, layers=1, heads=2, ff_mult=2, dropout=0.0)
    net = MaskedDenoiser(cfg).eval()
    return DiffusionModel(net, net.process(), net.encode, (L,), name="tiny-masked", output_range=None, conditional=False)


def _ids(x: torch.Tensor) -> torch.Tensor:
    return x.argmax(-1) if x.dim() == 3 else x


def _twos() -> RewardFn:
    """Black-box: the number of tokens equal to 2 (ids, or the argmax of probabilities)."""
    return RewardFn("twos", False, None, "count of token 2", lambda x, p: _ids(x).eq(2).float().sum(1))


# ----------------------------------------------------------------------------- the process


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


def test_molecules_pretraining_resumes_bit_identically(tmp_path):
    from rewardiff.worlds.molecules.pretrain_masked import MoleculesPretrainConfig, pretrain_molecules

    def cfg(steps):
        return MoleculesPretrainConfig(steps=steps, batch_size=8, warmup=2, checkpoint_every=2, dim=16, layers=1, heads=2)

    a = pretrain_molecules(cfg(4), tmp_path / "a", progress=False)
    pretrain_molecules(cfg(2), tmp_path / "b", progress=False)
    b = pretrain_molecules(cfg(4), tmp_path / "b", progress=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name


# ----------------------------------------------------------------------------- the rollout


def test_pinned_full_loop_with_a_tiny_denoiser():
    m = _tiny(0)
    with torch.no_grad():
        traj = m.sample([""] * 3, [0, 1, 2], 4, keep_states=True)
    assert bool((traj.xs[0] == MASK).all()) and not bool((traj.x0 == MASK).any())
    assert traj.log_probs.shape == (3, 4) and traj.nfe == 3 * 4
    assert traj.x0.tolist() == PINNED, traj.x0.tolist()


PINNED = [[0, 4, 4, 4, 2, 0], [6, 4, 5, 5, 7, 7], [2, 0, 4, 0, 4, 3]]


def test_a_seed_names_the_same_sample_in_any_batch_and_eta_is_ignored():
    m = _tiny(1)
    both = m.generate([""] * 3, [5, 6, 7], num_inference_steps=5)
    alone = m.generate([""], [6], num_inference_steps=5, eta=1.0)
    assert torch.equal(both[1:2], alone)


IDENTITY = [("best-of-n", {"width": 1}), ("svdd-pm", {"width": 1}), ("smc", {"width": 1}),
            ("dsearch", {"width": 1, "m": 1, "w": 1})]


@pytest.mark.parametrize(("name", "kw"), IDENTITY)
def test_width_one_gives_the_base_sampler_back(name, kw):
    m = _tiny(0)
    seeds = [3, 4, 5]
    base = m.generate([""] * 3, seeds, num_inference_steps=4, eta=1.0)
    x, info = guided_sample(m, make_method(name, _twos(), **kw), [""] * 3, seeds, 4, guidance_scale=1.0, eta=1.0)
    assert torch.equal(x, base)
    assert info["nfe_per_sample"] == 4


def test_nfe_is_exact_on_token_ids(monkeypatch):
    from rewardiff.guidance.dsearch import DSearch

    m = _tiny(0)

    def nfe(name, **kw):
        _, info = guided_sample(m, make_method(name, _twos(), **kw), [""] * 2, [0, 1], 4, guidance_scale=1.0, eta=1.0)
        assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]
        return info["nfe_per_sample"]

    assert nfe("best-of-n", width=3) == 4 * 3
    assert nfe("svdd-pm", width=3) == 1 + 3 * 3  # one call at x_T, then M look-aheads at steps 0..T-2
    assert nfe("smc", width=2) == 4 * 2
    monkeypatch.setattr(DSearch, "coins", lambda self, T: [False, True, True, False])
    # beams 4, 2, 1, 1; expansions m = 2, then int(1 * 2 * 4 / 2) = 4, int(1 * 2 * 4 / 1) = 8
    assert nfe("dsearch", width=4, m=2, w=1) == 4 + 4 * 2 + 2 * 4 + 1 * 8


@pytest.mark.parametrize("name", ["svdd-pm", "dsearch", "smc"])
def test_guidance_raises_a_black_box_reward_on_tokens(name):
    m = _tiny(2)
    seeds = list(range(24))
    reward = _twos()
    base = m.generate([""] * 24, seeds, num_inference_steps=6, eta=1.0)
    kw = {"svdd-pm": {"width": 6}, "dsearch": {"width": 4, "m": 2, "w": 2}, "smc": {"width": 6, "alpha": 0.2}}[name]
    x, _ = guided_sample(m, make_method(name, reward, **kw), [""] * 24, seeds, 6, guidance_scale=1.0, eta=1.0)
    prompts = [""] * 24
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 0.5, (reward(x, prompts).mean(), reward(base, prompts).mean())


def test_svdd_mc_with_the_exact_value_equals_svdd_pm():
    """v(x_t) = r(argmax x0_hat(x_t)) computed by the net itself: MC makes PM's choices."""
    m = _tiny(3)
    reward = _twos()

    def exact_value(x, t, cond):
        x0_hat, _ = m.process.split(m.net(x, torch.full((x.shape[0],), t), cond), x, t)
        return reward(x0_hat, [""] * x.shape[0])

    seeds = list(range(6))
    a, ia = guided_sample(m, make_method("svdd-pm", reward, width=3), [""] * 6, seeds, 5, guidance_scale=1.0)
    b, ib = guided_sample(m, make_method("svdd-mc", reward, width=3, value=exact_value), [""] * 6, seeds, 5, guidance_scale=1.0)
    assert torch.equal(a, b)
    assert ia["nfe_per_sample"] == 1 + 3 * 4 and ib["nfe_per_sample"] == 5


# ----------------------------------------------------------------------------- the shipped model


def test_shipped_molecules_model_samples_valid_smiles():
    from rewardiff.worlds.molecules.masked import WEIGHTS, molecules_model
    from rewardiff.worlds.molecules import data as molecules

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")
    m = molecules_model()
    ids = m.generate([""] * 32, list(range(32)), num_inference_steps=16)
    smiles = m.texts(ids)
    assert molecules.validity(smiles) == 1.0, smiles
    assert molecules.uniqueness(smiles) > 0.9


def test_sample_command_writes_smiles_with_svdd_on_qed(tmp_path):
    from rewardiff.worlds.molecules.masked import WEIGHTS
    from rewardiff.sampling import sample_to_dir

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")
    summary = sample_to_dir(tmp_path, "molecules", None, ["ignored"], 4, 0, "qed", 8, None, None, "svdd-pm", 3)
    assert summary["guidance_scale"] == 1.0 and summary["nfe_per_sample"] == 1 + 3 * 7
    assert len(summary["texts"]) == 4 and all(summary["texts"])
    assert (tmp_path / "samples.txt").read_text().split() == summary["texts"]
    assert (tmp_path / "grid.png").is_file()  # the molecules drawn
    assert 0.0 < summary["reward_mean"] <= 1.0


def test_free2guide_refuses_the_masked_process():
    """Free2Guide picks among Gaussian initial noises: on tokens it says so in one line."""
    from rewardiff.errors import UserError
    from rewardiff.guidance import guided_sample, make_method

    from rewardiff.worlds.molecules.masked import WEIGHTS, molecules_model
    from rewardiff.rewards import get_reward

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")

    with pytest.raises(UserError, match="free2guide"):
        guided_sample(molecules_model(), make_method("free2guide", get_reward("qed"), width=2), [""], [0], 4,
                      guidance_scale=1.0, eta=1.0)
