"""GRPO (Flow-GRPO, its SDE windows) and DiffusionNFT: hand-worked pieces, the chain with an SDE
window, and runs that resume bit for bit. Their mutation checks live in tests/test_mutations.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig, build_config
from rewardiff.finetune.grpo import GRPO, eta_schedule, group_advantages, kl_scale, sde_window, trained_steps
from rewardiff.finetune.nft import NFT, nft_loss, optimality
from rewardiff.finetune.trainer import finetune
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.flow import FlowProcess
from rewardiff.processes.gaussian import GaussianProcess, make_betas
from tests.helpers import AffineDenoiser


# ----------------------------------------------------------------------------- advantages


def test_group_advantages_by_hand():
    """Groups a, b, c with rewards (1, 3), (2, 2), (0, 4). Global std: deviations from each group's
    mean are -1, 1, 0, 0, -2, 2 and the batch's population std is sqrt(10 / 6) = 1.2910 (the
    batch mean is 2); per group: std 1 for a, 2 for c. Group b is flat: advantage 0, flagged."""
    prompts = ["a", "a", "b", "b", "c", "c"]
    r = torch.tensor([1.0, 3.0, 2.0, 2.0, 0.0, 4.0])
    adv, flat = group_advantages(prompts, r, global_std=True)
    s = math.sqrt(10 / 6) + 1e-4
    assert adv.tolist() == pytest.approx([-1 / s, 1 / s, 0, 0, -2 / s, 2 / s], abs=1e-6)
    assert flat.tolist() == [False, False, True, True, False, False]
    adv, _ = group_advantages(prompts, r, global_std=False)
    assert adv.tolist() == pytest.approx([-1 / 1.0001, 1 / 1.0001, 0, 0, -2 / 2.0001, 2 / 2.0001], abs=1e-6)


def test_nft_optimality_maps_clipped_advantages_to_the_unit_interval():
    adv = torch.tensor([-10.0, -5.0, 0.0, 2.5, 5.0, 7.0])
    assert optimality(adv, 5.0).tolist() == pytest.approx([0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


# ----------------------------------------------------------------------------- windows


def _cfg(**kw) -> FinetuneConfig:
    base = dict(num_inference_steps=10, eta=0.7, group_size=2, batch_size=4)
    base.update(kw)
    return FinetuneConfig(**base)


def test_sde_windows_fast_and_sliding():
    """Fast: a window of 2 whose start is drawn within the first 5 steps (start 0..3, each seen),
    the same draw for the same update. Sliding (MixGRPO): starts 0, 0, 1, 1, 2, ... every 2
    updates, stopping at the last window (start 8 of 10 steps)."""
    cfg = _cfg(sde_window=2, sde_window_range=5)
    starts = {sde_window(cfg, 10, u).start for u in range(200)}
    assert starts == {0, 1, 2, 3}
    assert all(sde_window(cfg, 10, u) == sde_window(cfg, 10, u) for u in range(20))
    assert len(sde_window(cfg, 10, 3)) == 2
    slide = _cfg(sde_window=2, sde_window_mode="sliding", sde_window_every=2)
    assert [sde_window(slide, 10, u).start for u in range(22)] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8, 8, 8, 8, 8, 8]
    assert sde_window(_cfg(), 10, 5) == range(10)
    assert eta_schedule(0.7, 5, range(1, 3)) == [0.0, 0.7, 0.7, 0.0, 0.0]


def test_trained_steps_follow_the_authors_fraction():
    """int(10 x 0.99) = 9: the first nine steps of a full chain, in order; a window trains its steps."""
    proc = FlowProcess()
    ts = proc.timesteps(10)
    assert trained_steps(proc, ts, range(10), _cfg(timestep_fraction=0.99)) == list(range(9))
    assert trained_steps(proc, ts, range(3, 5), _cfg(sde_window=2)) == [3, 4]
    with pytest.raises(UserError, match="no stochastic step"):
        trained_steps(proc, ts, range(10), _cfg(eta=0.0))


def test_an_sde_window_leaves_the_ode_outside_it():
    """A chain with eta on steps 2-3 of 6 only: the states before the window are the ODE's
    exactly, the window's steps carry log-probabilities, the others none; an all-zero schedule
    is the ODE chain bit for bit."""
    torch.manual_seed(0)
    proc = FlowProcess()
    net = AffineDenoiser()
    model = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    seeds = [1, 2, 3]
    ode = model.sample([""] * 3, seeds, 6, eta=0.0, keep_states=True)
    win = model.sample([""] * 3, seeds, 6, eta=eta_schedule(0.7, 6, range(2, 4)), keep_states=True)
    for j in range(3):
        assert torch.equal(ode.xs[j], win.xs[j])
    assert not torch.allclose(ode.xs[3], win.xs[3])
    assert (win.log_probs[:, [0, 1, 4, 5]] == 0).all() and (win.log_probs[:, 2:4] != 0).all()
    zero = model.sample([""] * 3, seeds, 6, eta=[0.0] * 6)
    assert torch.equal(zero.x0, ode.x0)
    with pytest.raises(ValueError, match="one value per step"):
        model.sample([""] * 3, seeds, 6, eta=[0.7] * 5)


# ----------------------------------------------------------------------------- the KL of the means


def test_kl_scale_is_the_authors_for_each_step():
    """flow-grpo: the diffusion coefficient a sqrt(s / (1 - s)) (the transition's std without
    sqrt(-dt)); CPS and DDIM: the transition's std."""
    proc = FlowProcess()
    t, t_prev = 600.0, 450.0
    assert kl_scale(proc, t, t_prev, 0.7) == pytest.approx(0.7 * math.sqrt(0.6 / 0.4))
    cps = FlowProcess(sde="cps")
    assert kl_scale(cps, t, t_prev, 0.7) == pytest.approx(0.45 * math.sin(0.7 * math.pi / 2))
    gauss = GaussianProcess(make_betas("linear"), "sample")
    assert kl_scale(gauss, 500, 400, 1.0) == pytest.approx(float(gauss.step_std(500, 400, 1.0)))


def test_grpo_kl_term_matches_the_closed_form():
    """Policy out = x/2 + b, base out = x/2: the flow SDE's mean is linear in the velocity with
    coefficient c = (1 + std_t^2 (1 - s) / (2 s)) dt, so mu_theta - mu_ref = c b exactly and the
    KL term is mean(c^2 b^2) / (2 std_t^2), whatever the state."""
    from rewardiff.finetune.draft import PromptConditions

    proc = FlowProcess()
    net = AffineDenoiser()
    with torch.no_grad():
        net.b.copy_(torch.tensor([0.3, -0.1]))
    model = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    model.reference = lambda x, t, c: x * 0.5
    cfg = _cfg(num_inference_steps=4, guidance_scale=1.0, kl_weight=1.0, batch_size=4, group_size=2)
    traj = model.sample(["a", "a", "b", "b"], [1, 2, 3, 4], 4, eta=0.7, keep_states=True)
    ts = traj.timesteps
    prevs = proc.prev_timesteps(ts)
    j = 1
    s, s2 = ts[j] / 1000, prevs[j] / 1000
    std_t = 0.7 * math.sqrt(s / (1 - s))
    c = (1 + std_t**2 * (1 - s) / (2 * s)) * (s2 - s)
    want = float((c**2 * net.b.detach() ** 2).mean()) / (2 * std_t**2)
    grpo = GRPO(cfg)
    conds = PromptConditions(model, ["a", "a", "b", "b"], 1.0)
    adv = torch.zeros(4)
    loss, extra, _ = grpo._loss(model, traj, conds, torch.arange(4), adv, j, ts, prevs, 2, cfg)
    assert extra["kl_means"] == pytest.approx(want, rel=1e-5)
    assert float(loss) == pytest.approx(cfg.kl_weight * want, rel=1e-5)  # zero advantages: the penalty alone, added


# ----------------------------------------------------------------------------- the NFT loss


def test_nft_loss_by_hand():
    """beta = 1, v_old = v: v+ = v- = v, so the loss is ||x0(v) - x0||^2 / w with w the mean
    absolute error, whatever r. x_t = (1, 3), sigma = 0.5, v = (0, 2), x0 = (1, 1):
    x0(v) = (1, 2), error (0, 1): mean square 0.5, mean abs 0.5, loss 1."""
    x0 = torch.tensor([[1.0, 1.0]])
    x_t = torch.tensor([[1.0, 3.0]])
    v = torch.tensor([[0.0, 2.0]])
    split = lambda u: x_t - 0.5 * u  # noqa: E731
    for r in (0.0, 0.3, 1.0):
        loss, pos, neg = nft_loss(x0, v, v.clone(), torch.tensor([r]), 1.0, split)
        assert float(loss) == pytest.approx(1.0) and float(pos) == float(neg) == pytest.approx(0.5)


def test_nft_gradient_pulls_toward_good_samples_and_away_from_bad():
    """At v = v_old, d loss / d v = (2 r - 1) times the gradient of the weighted regression
    ||x0(v) - x0||^2 / w (beta = 1: v+ moves with v, v- against it with the same size), so a
    good sample (r = 1) pulls x0(v) toward itself and a bad one (r = 0) pushes it away."""
    x0 = torch.tensor([[0.0, 0.0]])
    x_t = torch.tensor([[2.0, -1.0]])
    split = lambda u: x_t - 0.5 * u  # noqa: E731
    grads = {}
    for r in (1.0, 0.0, 0.5):
        v = torch.tensor([[1.0, 1.0]], requires_grad=True)
        loss, _, _ = nft_loss(x0, v, v.detach().clone(), torch.tensor([r]), 1.0, split)
        loss.sum().backward()
        grads[r] = v.grad.clone()
    err = x_t - 0.5 * torch.tensor([[1.0, 1.0]]) - x0  # (1.5, -1.5): mean abs w = 1.5
    want = -2 * 0.5 * err / 1.5 / 2  # d/dv of mean((x_t - v/2 - x0)^2) / w
    assert torch.allclose(grads[1.0], want) and torch.allclose(grads[0.0], -want)
    assert torch.allclose(grads[0.5], torch.zeros(2), atol=1e-7)


def test_nft_old_weights_swap_back_and_follow_with_their_decay():
    torch.manual_seed(0)
    net = AffineDenoiser()
    model = DiffusionModel(net, FlowProcess(), lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    cfg = _cfg(nft_decay_rate=0.25, nft_decay_max=0.5)
    nft = NFT(cfg, model)
    with torch.no_grad():
        net.b.copy_(torch.tensor([1.0, 2.0]))
    with nft.old_weights(net):
        assert net.b.tolist() == [0.0, 0.0]
    assert net.b.tolist() == [1.0, 2.0]
    nft._update_old(net, cfg)  # update 0: decay 0, old = theta
    assert nft.old[0].tolist() == [1.0, 2.0]
    nft.updates = 1
    with torch.no_grad():
        net.b.copy_(torch.tensor([3.0, 2.0]))
    nft._update_old(net, cfg)  # decay 0.25: 0.25 * 1 + 0.75 * 3
    assert nft.old[0].tolist() == pytest.approx([2.5, 2.0])


# ----------------------------------------------------------------------------- runs


def test_grpo_needs_groups_and_noise_and_config_checks_them():
    with pytest.raises(UserError, match="group_size"):
        GRPO(_cfg(group_size=1))
    with pytest.raises(UserError, match="eta"):
        GRPO(_cfg(eta=0.0))
    with pytest.raises(UserError, match="group_size"):
        build_config({"batch_size": 6, "group_size": 4})
    with pytest.raises(UserError, match="sde_window_mode"):
        build_config({"sde_window_mode": "zigzag"})
    with pytest.raises(UserError, match="sde_window"):
        build_config({"num_inference_steps": 4, "sde_window": 5})


def _flow_cfg(flow_dir, **kw) -> FinetuneConfig:
    base = dict(model=str(flow_dir), reward="jpeg-compressibility", method="grpo", steps=4, batch_size=4, group_size=2, lr=1e-2,
                lora_rank=2, lora_alpha=2.0, num_inference_steps=4, guidance_scale=2.0, eta=0.7, kl_weight=0.04,
                eval_samples=2, eval_every=0, checkpoint_every=2, seed=2)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize("extra", [
    {"sde_window": 2, "sde_window_mode": "sliding", "sde_window_every": 1},  # MixGRPO: the window's place is state
    {"method": "nft", "guidance_scale": 1.0, "nft_decay_rate": 0.2},  # NFT: the old weights are state
], ids=["mixgrpo", "nft"])
def test_grpo_and_nft_resume_bit_identically(flow_dir, tmp_path, extra):
    """A run stopped at step 2 and resumed ends with the weights of the uninterrupted one, and
    every step's batch is made of groups (prompts in pairs)."""
    from safetensors.torch import load_file

    finetune(_flow_cfg(flow_dir, **extra), tmp_path / "a", progress=False)
    finetune(_flow_cfg(flow_dir, steps=2, **extra), tmp_path / "b", progress=False)
    finetune(_flow_cfg(flow_dir, **extra), tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("zero_std_ratio" in r and r["reward_queries"] == 4 for r in rows)
    if extra.get("sde_window_mode") == "sliding":
        assert [r["window_start"] for r in rows] == [0.0, 1.0, 2.0, 2.0]


def test_the_trainer_draws_groups(flow_dir, tmp_path):
    from rewardiff.finetune.trainer import Run

    run = Run(_flow_cfg(flow_dir, batch_size=6, group_size=3), tmp_path / "r", progress=False)
    prompts, seeds, _ = run.batch(0)
    assert prompts[0] == prompts[1] == prompts[2] and prompts[3] == prompts[4] == prompts[5]
    assert len(set(seeds)) == 6


@pytest.mark.parametrize("method", ["grpo", "nft"])
def test_grpo_and_nft_train_every_weight_without_lora(flow_dir, tmp_path, method):
    """lora_rank 0: every weight trains (NFT's old copy and GRPO's reference are of the whole net)."""
    from safetensors.torch import load_file

    extra = {"guidance_scale": 1.0} if method == "nft" else {}
    finetune(_flow_cfg(flow_dir, method=method, lora_rank=0, steps=2, checkpoint_every=0, **extra), tmp_path / "r", progress=False)
    trained = load_file(str(tmp_path / "r" / "final" / "trainable.safetensors"))
    base = load_file(str(flow_dir / "model.safetensors"))
    moved = [k for k, v in trained.items() if k in base and not torch.equal(v, base[k])]
    assert len(trained) > 20 and moved, (len(trained), len(moved))


@pytest.mark.parametrize("name", ["grpo", "nft"])
def test_a_batch_with_no_signal_takes_no_optimizer_step(name):
    """Every group's rewards equal: one weight-0 pass, no step flagged, zero_std_ratio 1."""
    torch.manual_seed(0)
    net = AffineDenoiser()
    model = DiffusionModel(net, FlowProcess(), lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    cfg = _cfg(num_inference_steps=4, guidance_scale=1.0, batch_size=4, group_size=2, eta=0.7 if name == "grpo" else 0.0)
    method = GRPO(cfg) if name == "grpo" else NFT(cfg, model)
    outs = list(method(model, lambda x, p: torch.ones(len(p)), ["a", "a", "b", "b"], [1, 2, 3, 4], cfg, torch.Generator()))
    assert len(outs) == 1 and not outs[0].step and float(outs[0].loss) == 0.0
    assert outs[0].extra["zero_std_ratio"] == 1.0


def test_nft_kl_term_is_added_to_the_loss():
    """Old weights = current ones, velocity x/2 + b, base x/2: v - v_ref = b at every state, so
    the loss with kl_weight 1 exceeds the loss without it by mean(b^2), the same noise drawn."""
    from rewardiff.finetune.draft import PromptConditions

    net = AffineDenoiser()
    with torch.no_grad():
        net.b.copy_(torch.tensor([0.3, -0.1]))
    model = DiffusionModel(net, FlowProcess(), lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    model.reference = lambda x, t, c: x * 0.5
    x0, t, r = torch.randn(4, 2), torch.full((4,), 500.0), torch.tensor([0.0, 0.4, 0.6, 1.0])
    losses = []
    for w in (0.0, 1.0):
        cfg = _cfg(kl_weight=w, guidance_scale=1.0)
        nft = NFT(cfg, model)
        conds = PromptConditions(model, ["a"] * 4, 1.0)
        loss, _ = nft._loss(model, conds, x0, t, r, torch.arange(4), cfg, torch.Generator().manual_seed(0))
        losses.append(float(loss))
    assert losses[1] - losses[0] == pytest.approx(float((net.b.detach() ** 2).mean()), rel=1e-5)
