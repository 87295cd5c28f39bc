"""Fine-tuning losses and the trainer on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig, build_config
from rewardiff.finetune.draft import draft, draft_k, draft_lv, refl, truncation_k
from rewardiff.finetune.trainer import Run, finetune
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess, make_betas
from tests.helpers import ScaleDenoiser, linear_ddim_gradient, tiny_cfg


_cfg = tiny_cfg


def test_draft_lv_gradient_matches_closed_form():
    """E over re-noising of d/dw r(w (a x0 + s eps)) for r(x) = -||x - c||^2.

    With x1 = a x0 + s eps, E[r] = -||w a x0 - c||^2 - w^2 s^2 d, so
    dE/dw = -2 (w a x0 - c) . (a x0) - 2 w s^2 d.
    """
    proc = GaussianProcess(make_betas("linear"), "sample")
    net = ScaleDenoiser(0.8)
    model = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (4,))
    c = torch.tensor([0.5, -0.2, 0.1, 0.3])

    def reward(x, prompts):
        return -((x - c) ** 2).sum(1)

    cfg = FinetuneConfig(num_inference_steps=5, lv_n=20000, guidance_scale=1.0)
    out = draft_lv(model, reward, ["p"], [7], cfg, torch.Generator().manual_seed(0))
    out.loss.backward()
    with torch.no_grad():
        x0 = model.sample(["p"], [7], 5).x0[0]
    a2 = proc.alpha_bar(proc.timesteps(5)[-1])
    a, s, w, d = a2.sqrt(), (1 - a2).sqrt(), 0.8, 4
    want = -(-2 * ((w * a * x0 - c) * (a * x0)).sum() - 2 * w * s**2 * d)  # loss = -E[r]
    torch.testing.assert_close(net.w.grad, want, rtol=0.03, atol=1e-3)


def test_draft_and_draft_k_gradients_match_the_closed_form():
    """out = w x_t, T = 4 deterministic DDIM steps, r(x) = -||x - c||^2: the gradient of DRaFT
    (K = T), of DRaFT-K with K = T and with K = 1 against dL/dw written out by the chain rule
    (tests.helpers.linear_ddim_gradient)."""
    proc = GaussianProcess(make_betas("linear"), "sample", final_alpha_one=False)
    T, seeds, c = 4, [1, 2, 3], torch.tensor([0.5, -0.2, 0.1, 0.3])

    def reward(x, prompts):
        return -((x - c) ** 2).sum(1)

    for fn, k in ((draft, T), (draft_k, T), (draft_k, 1)):
        net = ScaleDenoiser(0.9)
        model = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (4,), output_range=None)
        cfg = FinetuneConfig(num_inference_steps=T, guidance_scale=1.0, eta=0.0, k=k)
        out = fn(model, reward, [""] * 3, seeds, cfg, torch.Generator())
        out.loss.backward()
        _, want = linear_ddim_gradient(proc, proc.timesteps(T), 0.9, model.noise(seeds), c, k)
        assert float(net.w.grad) == pytest.approx(want, rel=1e-4), (fn.__name__, k)
        assert out.grad_from == T - k


def test_alignprop_truncation_draws():
    cfg = FinetuneConfig(num_inference_steps=50, truncation="gaussian", truncation_mean=0.84, truncation_std=0.1)
    g = torch.Generator().manual_seed(0)
    ks = [truncation_k(cfg, g) for _ in range(400)]
    assert all(1 <= k <= 49 for k in ks)
    assert abs(sum(ks) / len(ks) - 8) < 1.0  # mean start 42 of 50 -> K about 8
    cfg.truncation = "uniform"
    ks = [truncation_k(cfg, g) for _ in range(2000)]
    assert min(ks) == 1 and max(ks) == 50


def test_lora_parameters_change_and_reward_rises(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, steps=12, lr=5e-2, k=2, checkpoint_every=0)
    run = Run(cfg, tmp_path, progress=False)
    before = {n: p.detach().clone() for n, p in run.model.net.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in run.model.net.named_parameters() if not p.requires_grad}
    summary = run.train()
    after = dict(run.model.net.named_parameters())
    assert all(n.find("lora") >= 0 for n in before) and before
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)
    assert summary["after"]["eval_reward_mean"] > summary["before"]["eval_reward_mean"] + 0.01
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    for name in ("report.html", "samples_before.png", "samples_after.png", "summary.json", "final/trainable.safetensors"):
        assert (tmp_path / name).is_file(), name


def test_resume_is_bit_identical(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    finetune(_cfg(tiny_model_dir, steps=4, method="alignprop"), tmp_path / "a", progress=False)
    finetune(_cfg(tiny_model_dir, steps=2, method="alignprop"), tmp_path / "b", progress=False)
    finetune(_cfg(tiny_model_dir, steps=4, method="alignprop"), tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_dropout_is_off_so_a_resumed_run_repeats_the_uninterrupted_one(tiny_model_dir, tmp_path, monkeypatch):
    """A denoiser with dropout on its output: fine-tuning runs it in eval mode, so no step draws
    dropout masks from the global generator and the resumed run ends on the same weights (in
    train mode the resumed steps would reuse the first steps' masks and the weights differ)."""
    from safetensors.torch import load_file

    from rewardiff.worlds.shapes.denoiser import ShapesDenoiser

    plain = ShapesDenoiser.forward
    modes = []

    def with_dropout(self, x_t, t, cond):
        modes.append(self.training)
        return torch.nn.functional.dropout(plain(self, x_t, t, cond), 0.3, self.training)

    monkeypatch.setattr(ShapesDenoiser, "forward", with_dropout)
    finetune(_cfg(tiny_model_dir, steps=4, method="draft-k", k=2), tmp_path / "a", progress=False)
    finetune(_cfg(tiny_model_dir, steps=2, method="draft-k", k=2), tmp_path / "b", progress=False)
    finetune(_cfg(tiny_model_dir, steps=4, method="draft-k", k=2), tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert modes and not any(modes)
    assert all(torch.equal(a[k], b[k]) for k in a)


def _nan_reward_module(tmp_path, monkeypatch):
    (tmp_path / "nanreward.py").write_text(
        "import torch\n"
        "def reward(x, prompts):\n"
        "    return x.mean(dim=(1, 2, 3)) * float('nan')\n"
        "reward.differentiable = True\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))


def test_non_finite_reward_stops_with_the_reward_named(tiny_model_dir, tmp_path, monkeypatch):
    from rewardiff.rewards.guard import RewardFailure

    _nan_reward_module(tmp_path, monkeypatch)
    with pytest.raises(RewardFailure, match="reward 'nanreward:reward' returned NaN for 4 of 4 samples at the evaluation 'before'"):
        finetune(_cfg(tiny_model_dir, reward="nanreward:reward"), tmp_path / "run", progress=False)


@pytest.mark.parametrize("method", ["draft", "draft-lv", "refl", "alignprop"])
def test_each_method_trains_a_step_with_kl(tiny_model_dir, tmp_path, method):
    cfg = _cfg(tiny_model_dir, steps=1, method=method, kl_weight=1.0, lora_rank=0, guidance_scale=2.0, checkpoint_every=0)
    run = Run(cfg, tmp_path, progress=False)
    row = run.train_step(0)
    assert row["nfe"] > 0 and row["kl"] == 0.0  # first step: model equals its reference
    row = run.train_step(1)
    assert row["kl"] > 0.0  # after one update the model has moved away from the base


def test_config_overrides_are_type_checked():
    cfg = build_config({"steps": 5}, ["lr=0.01", "checkpointing=false", "method=draft"])
    assert cfg.steps == 5 and cfg.lr == 0.01 and cfg.checkpointing is False
    with pytest.raises(UserError, match="'steps' expects int"):
        build_config({}, ["steps=many"])
    with pytest.raises(UserError, match="unknown config field 'stepz'"):
        build_config({}, ["stepz=3"])


def test_non_differentiable_reward_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="not differentiable"):
        Run(_cfg(tiny_model_dir, reward="jpeg-compressibility"), tmp_path)


def test_every_shipped_preset_loads():
    from pathlib import Path

    from rewardiff.finetune.config import load_config
    from rewardiff.finetune.methods import METHODS

    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert presets
    for p in presets:
        assert load_config(p).method in METHODS, p


def test_refl_trains_the_text_encoder_and_counts_every_evaluation(tiny_model_dir, tmp_path):
    cfg = _cfg(tiny_model_dir, method="refl", lora_rank=0, kl_weight=1.0, guidance_scale=2.0, num_inference_steps=4)
    run = Run(cfg, tmp_path, progress=False)
    prompts, seeds, gen = run.batch(0)
    out = refl(run.model, run.reward, prompts, seeds, cfg, gen)
    out.loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in run.model.net.text.parameters())
    # s steps before the jump, then the jump and the reference there: CFG counts 2 per element
    assert out.nfe == 2 * len(prompts) * (out.grad_from + 2)


def test_tensorboard_tracker_gets_scalars_and_sample_grids(tiny_model_dir, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tiny_model_dir, steps=2, eval_every=1, tracker="tensorboard")
    finetune(cfg, tmp_path / "run", progress=False)
    events = list((tmp_path / "run" / "trackers").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert "reward_mean" in tags["scalars"] and "before/eval_reward_mean" in tags["scalars"]
    assert [e.step for e in acc.Scalars("reward_mean")] == [1, 2]
    assert {"samples_before", "samples_step000001", "samples_after"} <= set(tags["images"])


def test_unknown_tracker_is_a_user_error(tiny_model_dir, tmp_path):
    with pytest.raises(UserError, match="unknown tracker 'nope'"):
        finetune(_cfg(tiny_model_dir, tracker="nope"), tmp_path / "run", progress=False)
