"""Small builders shared by several test files: a black-box fine-tuning config, a tiny masked
denoiser on an 8-token vocabulary with its black-box reward, and skips for shipped weights."""

from __future__ import annotations

import pytest
import torch

from rewardiff.finetune.config import FinetuneConfig

V, L, MASK = 8, 6, 1  # vocabulary, sequence length and mask id of the tiny masked model


def blackbox_cfg(tiny_model_dir, **kw) -> FinetuneConfig:
    """A few-step LoRA run of the tiny shapes model on a black-box reward (DDPO unless told)."""
    base = dict(model=str(tiny_model_dir), reward="jpeg-compressibility", method="ddpo", steps=4, batch_size=2, lr=1e-2,
                lora_rank=2, lora_alpha=2.0, num_inference_steps=3, guidance_scale=2.0, eta=1.0, eval_samples=4, eval_every=0,
                checkpoint_every=2, seed=3, ppo_minibatches=1, vard_warmup=4, vard_warmup_steps=4, vard_value_steps=2)
    base.update(kw)
    return FinetuneConfig(**base)


def tiny_masked(seed: int = 0):
    """An unconditional masked-diffusion DiffusionModel over V tokens of length L, random weights."""
    from rewardiff.models.base import DiffusionModel
    from rewardiff.models.molecules import MaskedDenoiser, MaskedModelConfig

    torch.manual_seed(seed)
    cfg = MaskedModelConfig(vocab_size=V, max_len=L, mask_id=MASK, dim=16, layers=1, heads=2, ff_mult=2, dropout=0.0)
    net = MaskedDenoiser(cfg).eval()
    return DiffusionModel(net, net.process(), net.encode, (L,), name="tiny-masked", output_range=None, conditional=False)


def count_twos():
    """Black-box reward: the number of tokens equal to 2 (ids, or the argmax of probabilities)."""
    from rewardiff.rewards.base import RewardFn

    return RewardFn("twos", False, None, "count of token 2", lambda x, p: (x.argmax(-1) if x.dim() == 3 else x).eq(2).float().sum(1))


def needs_shipped_molecules() -> None:
    """Skip the calling test when the shipped masked molecules weights are absent."""
    from rewardiff.models.molecules import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules weights")


def needs_shipped_molecules_ar() -> None:
    """Skip the calling test when the shipped autoregressive molecules weights are absent."""
    from rewardiff.models.molecules_ar import WEIGHTS

    if not (WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped molecules-ar weights")


def assert_trains_and_resumes_bit_identically(tiny_model_dir, tmp_path, method: str) -> None:
    """A black-box reward (JPEG size) trains the LoRA with ``method``; a run stopped at step 2
    and resumed (with DDPO's reward statistics / VARD's value model from the checkpoint) ends
    with the same weights as the uninterrupted one."""
    import json

    from safetensors.torch import load_file

    from rewardiff.finetune.trainer import finetune

    finetune(blackbox_cfg(tiny_model_dir, method=method, kl_weight=0.1), tmp_path / "a", progress=False)
    finetune(blackbox_cfg(tiny_model_dir, method=method, kl_weight=0.1, steps=2), tmp_path / "b", progress=False)
    finetune(blackbox_cfg(tiny_model_dir, method=method, kl_weight=0.1), tmp_path / "b", resume=True, progress=False)
    a = load_file(str(tmp_path / "a" / "final" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "b" / "final" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)  # it trained
    rows = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["reward_queries"] >= 2 for r in rows) and rows[0]["updates"] == 1
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["before"]["eval_kl_to_base"] == 0.0  # LoRA starts at the base model
    assert summary["after"]["eval_kl_to_base"] > 0.0
