"""Every fine-tuning and inference-time method on a rectified-flow model, with no special case:
a tiny random shapes-flow model (the shapes denoiser predicting the velocity)."""

from __future__ import annotations

import json

import pytest
import torch

from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.trainer import finetune
from rewardiff.processes.flow import FlowProcess


def _cfg(flow_dir, **kw) -> FinetuneConfig:
    base = dict(model=str(flow_dir), reward="brightness", method="draft-k", steps=2, batch_size=2, lr=1e-2, lora_rank=2,
                lora_alpha=2.0, k=2, num_inference_steps=4, guidance_scale=2.0, eval_samples=2, eval_every=0,
                checkpoint_every=0, seed=1, vard_warmup=4, vard_warmup_steps=2, vard_value_steps=1)
    base.update(kw)
    return FinetuneConfig(**base)


@pytest.mark.parametrize(("method", "extra"), [
    ("draft", {}), ("draft-k", {}), ("draft-k", {"kl_weight": 1.0}), ("draft-lv", {}), ("alignprop", {}), ("refl", {}),
    ("ddpo", {"eta": 0.7, "reward": "jpeg-compressibility"}), ("vard", {"eta": 0.7}),
])
def test_every_fine_tuning_method_trains_a_flow_model(flow_dir, tmp_path, method, extra):
    from safetensors.torch import load_file

    summary = finetune(_cfg(flow_dir, method=method, **extra), tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor([r["loss"], r["reward_mean"]])).all() for r in rows)
    lora_b = [v for k, v in load_file(str(tmp_path / "run" / "final" / "trainable.safetensors")).items() if "lora_B" in k]
    assert lora_b and any(float(v.abs().max()) > 0 for v in lora_b)  # the update reached the weights
    assert summary["before"]["eval_kl_to_base"] == 0.0 and summary["after"]["eval_kl_to_base"] > 0.0


@pytest.mark.parametrize(("method", "width", "eta", "options"), [
    ("best-of-n", 3, 0.0, {}), ("gradient", None, 0.0, {"scale": 0.1}), ("svdd-pm", 3, 0.7, {}), ("dsearch", 2, 0.7, {}),
    ("free2guide", 3, 0.7, {}), ("smc", 3, 0.7, {}), ("svdd-mc", 3, 0.7, {}),
])
def test_every_inference_time_method_samples_a_flow_model_at_its_cost(flow_dir, tmp_path, method, width, eta, options):
    """The denoiser calls counted at the network equal the method's NFE formula, and the reward is finite."""
    from rewardiff.guidance import guided_sample, make_method
    from rewardiff.models.registry import base_model
    from rewardiff.rewards import get_reward

    model = base_model(str(flow_dir))
    assert isinstance(model.process, FlowProcess)
    reward = get_reward("brightness")
    value = None
    if method == "svdd-mc":
        from rewardiff.rewards.value import load_value, train_value

        train_value(model, reward, tmp_path / "value", trajectories=8, steps=2, num_inference_steps=4, guidance_scale=2.0, eta=eta)
        value = load_value(tmp_path / "value")
    calls = []
    forward = model.net.forward

    def counting(x, t, cond):
        calls.append(x.shape[0])
        return forward(x, t, cond)

    model.net.forward = counting
    meth = make_method(method, reward, width=width, seed=0, value=value, **options)
    prompts, seeds = ["two red circles", "one blue square"], [0, 1]
    images, info = guided_sample(model, meth, prompts, seeds, 4, guidance_scale=2.0, eta=eta)
    assert images.shape == (2, 3, 32, 32) and torch.isfinite(reward(images, prompts)).all()
    assert sum(calls) == info["nfe"] == info["expected_nfe_per_sample"] * len(prompts)
