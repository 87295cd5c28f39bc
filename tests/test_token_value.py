"""Learned values of token states (SVDD-MC on masked discrete diffusion): the closed-form
value of a uniform masked model is learned, the file round trip, and svdd-mc on the shipped
molecules model with a value trained through ``rewardiff train-value``."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from rewardiff.errors import UserError
from rewardiff.rewards.value import TokenValueNet
from rewardiff.rewards.value import LearnedValue, load_value, save_value, train_value
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.masked import MaskedProcess
from rewardiff.rewards.base import RewardFn
from rewardiff.types import ValueFn

V, L, MASK, K = 5, 8, 1, 2  # token K is the one the toy reward counts; the mask is id 1


class Uniform(nn.Module):
    """Logits 0 everywhere: every masked token unmasks to one of the V - 1 real ids uniformly."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x_t, t, cond):
        return torch.zeros(*x_t.shape, V) + 0 * self.anchor  # [B, L, V]


def _uniform_model() -> DiffusionModel:
    return DiffusionModel(Uniform(), MaskedProcess(V, MASK, "linear", 100), lambda p: torch.zeros(len(p), 1), (L,),
                          name="uniform-masked", output_range=None, conditional=False)


def _share_of_k() -> RewardFn:
    return RewardFn("share-of-k", False, (0.0, 1.0), "share of token K", lambda x, p: x.eq(K).float().mean(1))


def exact_value(x_t: torch.Tensor) -> torch.Tensor:
    """E[r(x_0) | x_t] under the uniform model, ids [B, L] -> [B].

    Unmasked tokens are carried over to x_0 unchanged; each masked one becomes K with
    probability 1 / (V - 1) = 1/4 (the mask is never drawn). So
    E[r | x_t] = (#{x_t = K} + #{x_t = mask} / 4) / L; e.g. x_T (all mask) gives 1/4.
    """
    return (x_t.eq(K).float().sum(1) + x_t.eq(MASK).float().sum(1) / (V - 1)) / L


def test_trained_token_value_learns_the_closed_form(tmp_path):
    """On fresh trajectories of the uniform model, the trained value's squared error against
    E[r | x_t] is a small fraction of the untrained net's (which predicts the training mean,
    its head starting at zero). Measured with training seeds 0-2: ratio 0.016 .. 0.033, and
    0.24 .. 0.26 at x_T."""
    model = _uniform_model()
    assert float(exact_value(torch.full((1, L), MASK))) == 0.25
    card = train_value(model, _share_of_k(), tmp_path / "v", trajectories=512, steps=300, batch_size=64, lr=3e-3,
                       num_inference_steps=4, widths=(16,), prompts=["ignored"], progress=False)
    assert card["kind"] == "tokens" and card["vocab_size"] == V and card["shape"] == [L]
    assert card["guidance_scale"] == 1.0  # unconditional: no classifier-free guidance
    value = load_value(tmp_path / "v")
    untrained = TokenValueNet(V, L, 1, widths=(16,)).eval()
    untrained.target_mean.fill_(card["target_mean"])
    untrained.target_std.fill_(card["target_std"])

    with torch.no_grad():
        traj = model.sample([""] * 256, list(range(10_000, 10_256)), 4, keep_states=True)
        err, err0 = [], []
        for x, t in zip(traj.xs[1:-1], traj.timesteps[1:]):  # x_{t_1} .. x_{t_3}: partly masked states
            target = exact_value(x)
            err.append((value(x, t, model.encode([""] * 256)) - target).pow(2).mean())
            err0.append((untrained(x, t, torch.zeros(256, 1)) - target).pow(2).mean())
        at_prior = value(traj.xs[0], traj.timesteps[0], torch.zeros(256, 1))
    mse, mse0 = float(torch.stack(err).mean()), float(torch.stack(err0).mean())
    assert mse < 0.1 * mse0, (mse, mse0)
    assert torch.allclose(at_prior, torch.full_like(at_prior, 0.25), atol=0.03), at_prior[:4]


def test_token_value_save_load_round_trip(tmp_path, scrambled_value):
    """Identical predictions after the round trip; ids and their one-hot rows agree; gradients
    reach relaxed inputs; broken token configs are one-line UserErrors naming value.json, and
    unequal token widths one naming ``widths``."""
    net = scrambled_value(TokenValueNet(V, L, 3, widths=(16, 16), heads=2))
    card = save_value(net, {"reward": "share-of-k", "model": "uniform-masked", "metrics": {}}, tmp_path / "v")
    assert json.loads((tmp_path / "v" / "value.json").read_text()) == card
    assert card["kind"] == "tokens" and card["widths"] == [16, 16] and card["heads"] == 2
    ids = torch.randint(0, V, (6, L), generator=torch.Generator().manual_seed(1))
    cond = torch.randn(6, 3)
    for path in (tmp_path / "v", tmp_path / "v" / "value.safetensors"):
        value = load_value(path)
        assert isinstance(value, LearnedValue) and isinstance(value, ValueFn)
        assert isinstance(value.net, TokenValueNet) and not value.net.training and value.reward == "share-of-k"
        with torch.no_grad():
            assert torch.equal(value(ids, 40, cond), net(ids, 40, cond))
    one_hot = torch.nn.functional.one_hot(ids, V).float().requires_grad_(True)
    v = value(one_hot, 40, cond)
    torch.testing.assert_close(v, net(ids, 40, cond).detach())
    v.sum().backward()
    assert one_hot.grad is not None and one_hot.grad.abs().sum() > 0

    cfg = json.loads((tmp_path / "v" / "value.json").read_text())
    (tmp_path / "v" / "value.json").write_text(json.dumps({k: x for k, x in cfg.items() if k != "vocab_size"}))
    with pytest.raises(UserError, match="malformed value model config .*value.json: 'vocab_size'"):
        load_value(tmp_path / "v")
    (tmp_path / "v" / "value.json").write_text(json.dumps({**cfg, "kind": "graphs"}))
    with pytest.raises(UserError, match="value.json: unknown kind 'graphs'"):
        load_value(tmp_path / "v")
    with pytest.raises(UserError, match=r"widths: .* one width repeated per layer"):  # before any sampling
        train_value(_uniform_model(), _share_of_k(), tmp_path / "w", widths=(16, 32), progress=False)


def test_svdd_mc_with_a_trained_value_on_the_molecules_model(tmp_path):
    """``rewardiff train-value --model molecules`` writes a token value; ``svdd-mc`` with it
    spends exactly T NFE per sample (the value costs no denoiser call) and gives valid SMILES."""
    from typer.testing import CliRunner

    from rewardiff.cli import app
    from rewardiff.worlds.molecules.masked import WEIGHTS
    from rewardiff.sampling import sample_to_dir
    from rewardiff.worlds.molecules import data as molecules

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")
    d = tmp_path / "value"
    res = CliRunner().invoke(app, ["train-value", "--reward", "qed", "--out", str(d), "--model", "molecules",
                                   "--trajectories", "16", "--steps", "5", "--num-inference-steps", "4"])
    assert res.exit_code == 0, res.output
    card = json.loads((d / "value.json").read_text())
    assert card["kind"] == "tokens" and card["model"] == "molecules" and card["timesteps"] == [999, 749, 499, 249]
    assert card["guidance_scale"] == 1.0  # the CLI's default 2.0 means nothing to an unconditional model

    summary = sample_to_dir(tmp_path / "s", "molecules", None, [""], 6, 0, "qed", 4, 1.0, None, "svdd-mc", 3, None, d)
    assert summary["method"] == "svdd-mc" and summary["options"]["m"] == 3
    assert summary["nfe_per_sample"] == summary["expected_nfe_per_sample"] == 4
    assert len(summary["texts"]) == 6 and molecules.validity(summary["texts"]) == 1.0, summary["texts"]
    assert 0.0 < summary["reward_mean"] <= 1.0
