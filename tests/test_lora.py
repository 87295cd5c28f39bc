"""LoRA adapters on token models: the masked denoiser's adapted layers against merged weights,
an exactly zero KL before training, reloading a run, and Hugging Face LoRA in peft's layout."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.weights import attach_lora
from rewardiff.models.registry import base_model
from rewardiff.worlds.molecules import data as molecules

SEEDS = [1, 2, 3, 4]


def _gumbel_cfg(model: str, **kw) -> FinetuneConfig:
    base = dict(model=model, reward="chem-rm-qed", method="gumbel", steps=2, batch_size=4, lr=1e-2, lora_rank=4,
                lora_alpha=8.0, kl_weight=0.1, eval_samples=4, eval_every=0, checkpoint_every=0, num_inference_steps=4, k=4,
                seed=3)
    base.update(kw)
    return FinetuneConfig(**base)


def _inputs(batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    tok = molecules.tokenizer()
    g = torch.Generator().manual_seed(7)
    x = torch.randint(0, tok.size, (batch, tok.max_len), generator=g)
    x[0, 10:] = tok.mask_id  # a partly masked sequence, as the sampler sees them
    return x, torch.tensor([900, 400, 10][:batch])


def _lora_factors(net: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Layer name -> (A [r, in], B [out, r]) of every peft LoRA layer of ``net``."""
    out = {}
    for name, p in net.named_parameters():
        if name.endswith("lora_A.default.weight"):
            layer = name.removesuffix(".lora_A.default.weight")
            out[layer] = (p.detach(), dict(net.named_parameters())[f"{layer}.lora_B.default.weight"].detach())
    return out


def test_masked_lora_acts_in_eval_mode_as_the_merged_weights(masked_dir):
    """LoRA on the masked model: W_eff = W + (alpha / r) B A on the attention's in_proj and the
    feed-forward layers. In eval mode without gradient (where PyTorch's fused fast path used to
    skip the adapters) the adapted net equals a plain copy with merged weights; with lora_B = 0
    it is the base exactly; the reference (adapters off) stays the base."""
    model = base_model(str(masked_dir))
    base = copy.deepcopy(model.net).eval()
    rank, alpha = 4, 8.0
    attach_lora(model, rank, alpha)
    net = model.net.eval()
    x, t = _inputs()
    with torch.no_grad():
        want = base(x, t)
        assert torch.equal(net(x, t), want)  # lora_B starts at 0
        g = torch.Generator().manual_seed(1)
        for name, p in net.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        got = net(x, t)
        ref = model.reference(x, t)

    factors = _lora_factors(net)
    # the layers adapted: in_proj (through peft's parameter targeting), linear1 and linear2 of every layer
    assert sorted(factors) == sorted(f"encoder.layers.{i}.{n}" for i in range(2) for n in ("self_attn", "linear1", "linear2"))
    merged = copy.deepcopy(base)
    with torch.no_grad():
        for layer, (A, B) in factors.items():
            i, kind = layer.split(".")[2], layer.split(".")[3]
            block = merged.encoder.layers[int(i)]
            w = block.self_attn.in_proj_weight if kind == "self_attn" else getattr(block, kind).weight
            w += (alpha / rank) * B @ A  # [out, in]
        by_hand = merged(x, t)
    assert (got - want).abs().max() > 1e-2  # the adapters act
    torch.testing.assert_close(got, by_hand, rtol=0, atol=1e-5)
    assert torch.equal(ref, want)  # adapters off: the base, to the bit
    with torch.enable_grad():
        net.train()  # dropout is 0: the training path computes the same function
        torch.testing.assert_close(net(x, t).detach(), by_hand, rtol=0, atol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()  # the global switch is restored after each call


@pytest.mark.parametrize("rank", [0, 4])
def test_masked_kl_to_the_base_is_exactly_zero_before_training(masked_dir, rank):
    """Model and reference compute the same way (per-operation path, sequence-first layout), so
    the KL of the unchanged model to its base is 0 to the bit, with full weights (a frozen copy)
    and with LoRA (the same net, adapters off); and LoRA gets a gradient."""
    from rewardiff.finetune.gumbel import gumbel
    from rewardiff.rewards import get_reward

    model = base_model(str(masked_dir))
    attach_lora(model, rank, 8.0)
    cfg = _gumbel_cfg(str(masked_dir), lora_rank=rank)
    out = gumbel(model, get_reward("chem-rm-qed"), [""] * 4, SEEDS, cfg, torch.Generator())
    assert torch.equal(out.kl, torch.zeros(4))
    out.loss.backward()
    grads = {n: p.grad for n, p in model.net.named_parameters() if p.requires_grad}
    if rank:
        assert grads and all("lora" in n for n in grads)
        assert all(float(g.abs().sum()) > 0 for n, g in grads.items() if "lora_B" in n)


def test_masked_lora_run_reloads_to_the_same_model(masked_dir, tmp_path):
    """Two LoRA steps of ``gumbel`` on the masked model: the adapters move, and the run's weights
    load back (base + adapters from trainable.safetensors) to the trained net's logits."""
    from rewardiff.finetune.trainer import Run
    from rewardiff.finetune.weights import load_finetuned

    run = Run(_gumbel_cfg(str(masked_dir), eval_samples=2), tmp_path, progress=False)
    run.train()
    net = run.acc.unwrap_model(run.model.net).eval()
    assert any(float(p.detach().abs().max()) > 0 for n, p in net.named_parameters() if "lora_B" in n)
    x, t = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(load_finetuned(tmp_path).net(x, t), net(x, t), rtol=0, atol=1e-6)


def test_hf_lora_checkpoint_reloads_with_plain_peft_and_transformers(gpt2_dir, tmp_path):
    """Two ``gumbel`` LoRA steps on a tiny GPT-2; ``final/`` holds adapter_config.json and
    adapter_model.safetensors, which PeftModel.from_pretrained puts on a freshly loaded base:
    its logits are our trained model's (1e-5) and not the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from rewardiff.finetune.trainer import Run

    run = Run(_gumbel_cfg(f"hf:{gpt2_dir}", lr=5e-2), tmp_path, progress=False)
    run.train()
    final = tmp_path / "final"
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8.0

    ids = torch.randint(0, molecules.tokenizer().size, (2, 20), generator=torch.Generator().manual_seed(0))
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(gpt2_dir)), str(final)).eval()
    base = AutoModelForCausalLM.from_pretrained(str(gpt2_dir)).eval()
    ours = run.acc.unwrap_model(run.model.net).eval()
    with torch.no_grad():
        want = ours.lm(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
        plain = base(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert (got - plain).abs().max() > 1e-4  # the adapter is there and trained
