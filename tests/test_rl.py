"""DDPO, VARD, the KL diagnostics and model soups."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.ddpo import DDPO, PerPromptStats, ppo_loss, step_log_prob
from rewardiff.finetune.diagnostics import kl_to_base, step_variances
from rewardiff.finetune.trainer import Run, finetune
from rewardiff.rewards.value import fit_value
from rewardiff.rewards.value import ValueNet
from rewardiff.models.base import DiffusionModel
from rewardiff.worlds.shapes.denoiser import shapes_model
from rewardiff.processes.gaussian import GaussianProcess, make_betas


def _cfg(tiny_model_dir, **kw) -> FinetuneConfig:
    base = dict(model=str(tiny_model_dir), reward="jpeg-compressibility", method="ddpo", steps=4, batch_size=2, lr=1e-2,
                lora_rank=2, lora_alpha=2.0, num_inference_steps=3, guidance_scale=2.0, eta=1.0, eval_samples=4, eval_every=0,
                checkpoint_every=2, seed=3, ppo_minibatches=1, vard_warmup=4, vard_warmup_steps=4, vard_value_steps=2)
    base.update(kw)
    return FinetuneConfig(**base)


# ----------------------------------------------------------------------------- DDPO


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


class _Affine(nn.Module):
    """'sample' prediction x0_hat = x_t + b: the bias moves every sample by the same amount."""

    def __init__(self):
        super().__init__()
        self.b = nn.Parameter(torch.zeros(2))

    def forward(self, x, t, cond):
        return x * 0.5 + self.b


def test_ddpo_raises_a_black_box_reward_on_a_toy():
    """Reward x[0], read as values only: DDPO must push the bias's first coordinate up and
    leave the reward's blind coordinate roughly alone."""
    proc = GaussianProcess(make_betas("linear"), "sample")
    net = _Affine()
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
        Run(_cfg(tiny_model_dir, eta=0.0), "unused", progress=False)


@pytest.mark.parametrize("method", ["ddpo", "vard"])
def test_black_box_methods_train_and_resume_bit_identically(tiny_model_dir, tmp_path, method):
    """A black-box reward (JPEG size) trains the LoRA; a run stopped at step 2 and resumed
    (with DDPO's reward statistics / VARD's value model from the checkpoint) ends with the
    same weights as the uninterrupted one."""
    from safetensors.torch import load_file

    finetune(_cfg(tiny_model_dir, method=method, kl_weight=0.1), tmp_path / "a", progress=False)
    finetune(_cfg(tiny_model_dir, method=method, kl_weight=0.1, steps=2), tmp_path / "b", progress=False)
    finetune(_cfg(tiny_model_dir, method=method, kl_weight=0.1), tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_queries"] >= 2 for r in rows) and rows[0]["updates"] == 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["before"]["eval_kl_to_base"] == 0.0  # LoRA starts at the base model
    assert summary["after"]["eval_kl_to_base"] > 0.0


# ----------------------------------------------------------------------------- VARD


def test_value_regression_learns_a_known_value():
    """x_0 ~ N(0, 1)^2 and x_t = x_0 + s_t n: the value of r = x_0[0] is E[x_0[0] | x_t] = x_t[0] / (1 + s_t^2)."""
    gen = torch.Generator().manual_seed(0)
    ts, s = [900, 600, 300, -1], [2.0, 1.0, 0.5, 0.0]

    def trajectories(n):
        x0 = torch.randn(n, 2, generator=gen)
        return [x0 + si * torch.randn(n, 2, generator=gen) for si in s], x0[:, 0]

    def error(net):
        states, _ = trajectories(2000)
        with torch.no_grad():
            errs = [((net(x, t, torch.zeros(2000, 1)) - x[:, 0] / (1 + si**2)) ** 2).mean() for x, t, si in zip(states, ts, s)]
        return float(torch.stack(errs).mean())

    torch.manual_seed(0)
    net = ValueNet((2,), 1)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    before = error(net)
    for _ in range(15):
        states, r = trajectories(256)
        fit_value(net, opt, states, ts, torch.zeros(256, 1), r, 20, gen)
    after = error(net)
    assert before > 0.3  # the untrained head predicts the constant 0
    assert after < 0.15 * before, (before, after)


def test_vard_with_an_overwhelming_kl_weight_stays_at_the_base(tiny_model_dir, tmp_path):
    """kl_weight -> infinity: the penalty, zero at the base and growing as the square of any
    move, dominates, so the model ends where it started (up to the optimizer's step size),
    while without it the value's gradient moves the model."""
    free = finetune(_cfg(tiny_model_dir, method="vard", kl_weight=0.0, steps=6, lr=3e-3), tmp_path / "free", progress=False)
    held = finetune(_cfg(tiny_model_dir, method="vard", kl_weight=1e6, steps=6, lr=3e-3), tmp_path / "held", progress=False)
    kl_free, kl_held = free["after"]["eval_kl_to_base"], held["after"]["eval_kl_to_base"]
    assert kl_free > 0 and kl_held < 0.1 * kl_free  # measured 5.0 against 128, (kl_free, kl_held)


# ----------------------------------------------------------------------------- diagnostics


class _ConstEps(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, x, t, cond):
        return torch.zeros_like(x) + self.c


def test_kl_to_base_closed_form():
    """Epsilon predictions differing by a constant c: each step's means differ by
    c (sqrt(1 - ap - sigma^2) - sqrt(ap) sqrt(1 - a) / sqrt(a)) in every coordinate, whatever x is,
    so the path KL is sum_t d c^2 coef_t^2 / (2 sigma_t^2)."""
    proc = GaussianProcess(make_betas("linear"), "epsilon", final_alpha_one=False)
    model = DiffusionModel(_ConstEps(0.3), proc, lambda p: torch.zeros(len(p), 1), (3,), output_range=None)
    model.reference = _ConstEps(0.0)
    T, d, c = 5, 3, 0.3
    ts = proc.timesteps(T)
    var = step_variances(model, ts, 1.0)
    want = 0.0
    for t, tp, v in zip(ts, ts[1:] + [-1], var):
        a, ap = float(proc.alpha_bar(t)), float(proc.alpha_bar(tp))
        coef = math.sqrt(max(1 - ap - v, 0.0)) - math.sqrt(ap) * math.sqrt(1 - a) / math.sqrt(a)
        want += d * (c * coef) ** 2 / (2 * v)
    got = kl_to_base(model, ["", ""], [0, 1], T, 1.0)
    torch.testing.assert_close(got, torch.full((2,), want), rtol=1e-3, atol=1e-6)  # float32 steps, small variances
    model.reference = _ConstEps(0.3)
    assert float(kl_to_base(model, [""], [0], T, 1.0).abs().max()) == 0.0


# ----------------------------------------------------------------------------- soups


@pytest.fixture(scope="module")
def two_runs(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("soup")
    for name, reward, seed in (("a", "brightness", 1), ("b", "saturation", 2)):
        finetune(_cfg(tiny_model_dir, method="draft-k", k=1, reward=reward, seed=seed, steps=2, eval_samples=2, checkpoint_every=0,
                      eta=0.0, lr=5e-2), d / name, progress=False)
    return d


def test_soup_endpoints_are_the_ingredients_and_the_middle_is_the_mean(two_runs, tmp_path):
    from safetensors.torch import load_file

    from rewardiff.finetune.soup import soup_model, write_soup
    from rewardiff.finetune.weights import load_finetuned

    a, b = two_runs / "a", two_runs / "b"
    wa, wb = (load_file(str(x / "final" / "trainable.safetensors")) for x in (a, b))
    for alpha, want in ((0.0, wa), (1.0, wb), (0.5, {k: (wa[k] + wb[k]) / 2 for k in wa})):
        got = load_file(str(write_soup(a, b, alpha, tmp_path / f"s{alpha}") / "trainable.safetensors"))
        exact = alpha in (0.0, 1.0)
        for k in want:
            assert torch.equal(got[k], want[k]) if exact else torch.allclose(got[k], want[k], atol=1e-7), (alpha, k)
    # alpha 0 samples exactly what model A samples
    prompts, seeds = ["two red circles"], [4]
    ref = load_finetuned(a).generate(prompts, seeds, num_inference_steps=3, guidance_scale=2.0)
    soup, _ = soup_model(a, b, 0.0)
    assert torch.equal(soup.generate(prompts, seeds, num_inference_steps=3, guidance_scale=2.0), ref)


def test_soup_refuses_models_that_cannot_be_mixed(two_runs, tiny_model_dir, tmp_path):
    from rewardiff.finetune.soup import write_soup

    finetune(_cfg(tiny_model_dir, method="draft-k", k=1, reward="brightness", steps=1, lora_rank=4, eval_samples=2,
                  checkpoint_every=0, eta=0.0), tmp_path / "r4", progress=False)
    with pytest.raises(UserError, match="lora_rank"):
        write_soup(two_runs / "a", tmp_path / "r4", 0.5, tmp_path / "out")
    with pytest.raises(UserError, match="alpha"):
        write_soup(two_runs / "a", two_runs / "b", 1.5, tmp_path / "out")


def test_soup_cli_writes_the_curve(two_runs, tmp_path):
    from typer.testing import CliRunner

    from rewardiff.cli import app

    res = CliRunner().invoke(app, ["soup", str(two_runs / "a"), str(two_runs / "b"), "--out", str(tmp_path / "s"),
                                   "--alpha", "0.3", "--curve", "3", "--samples", "4"])
    assert res.exit_code == 0, res.output
    table = json.loads((tmp_path / "s" / "soup_curve.json").read_text())
    assert [r["alpha"] for r in table["rows"]] == [0.0, 0.5, 1.0]
    assert set(table["rewards"]) == {"brightness", "saturation"}
    assert (tmp_path / "s" / "soup_curve.png").is_file() and (tmp_path / "s" / "trainable.safetensors").is_file()
