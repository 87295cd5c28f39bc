"""Stable Diffusion 3 through diffusers: tiny random StableDiffusion3Pipelines built offline (with
and without T5), sampled by the one rollout loop and pinned against the pipeline, every
fine-tuning and inference-time method run on them with the transformer's calls counted, and
LoRA reloaded in plain diffusers."""

from __future__ import annotations


import pytest
import torch

from rewardiff.models.sd import is_xl_pipeline, sd_model
from rewardiff.models.sd3 import is_sd3_pipeline, tiny_sd3_pipeline
from rewardiff.processes.flow import FlowProcess

from tests.pipeline_methods import (GUIDANCE, PROMPTS, assert_finetune_runs_with_its_nfe, assert_guidance_runs_with_its_cost,
                                     count_rows, finetune_table, pipeline_config)


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3"))


@pytest.fixture(scope="module")
def no_t5_dir(tmp_path_factory):
    return tiny_sd3_pipeline(tmp_path_factory.mktemp("tiny-sd3-no-t5"), t5=False)


def _pipeline(directory, t5: bool = True):
    from diffusers import StableDiffusion3Pipeline

    absent = {} if t5 else {"text_encoder_3": None, "tokenizer_3": None}  # how diffusers drops T5
    pipe = StableDiffusion3Pipeline.from_pretrained(str(directory), local_files_only=True, **absent)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def calls(monkeypatch):
    from diffusers import SD3Transformer2DModel

    return count_rows(monkeypatch, SD3Transformer2DModel)


# ----------------------------------------------------------------------------- the model


def test_the_folder_is_recognised_and_read_as_a_flow_model(sd3_dir):
    """model_index.json names StableDiffusion3Pipeline (it has text_encoder_2, as SDXL's does);
    the process is the scheduler's shift-3 flow; 16 latent channels at half the resolution."""
    assert is_sd3_pipeline(sd3_dir) and not is_xl_pipeline(sd3_dir)
    m = sd_model(sd3_dir)
    assert type(m.net).__name__ == "SD3Denoiser" and type(m.process) is FlowProcess
    assert m.process.shift == 3.0 and not m.process.use_dynamic_shifting
    assert m.shape == (16, 16, 16) and m.image_size == 32 and m.capabilities == {"chain", "gaussian"}


def test_train_mode_leaves_the_text_encoders_in_eval_mode(sd3_dir):
    """T5's dropout (0.1) in train mode drew from the global random state: a prompt encoded
    differently at every training step, and a resumed run diverged from the uninterrupted one."""
    from rewardiff.models.registry import base_model

    net = base_model(f"diffusers:{sd3_dir}").net
    net.train()
    assert net.transformer.training and not net.t5.training and not any(m.training for m in net.text.modules())
    cond = [net.encode(["a red dog"])["hidden"] for _ in range(2)]
    assert torch.equal(cond[0], cond[1])


def test_the_condition_is_clip_padded_to_t5_then_t5_and_both_pooled(sd3_dir, no_t5_dir):
    """hidden = [pad(clip_1 (+) clip_2, 48); t5]: 32 CLIP tokens of 16 + 24 = 40 features, zero-padded
    to the T5 width 48, then the 256 T5 tokens (the pipeline's max_sequence_length); pooled 8 + 8.
    The empty prompt is encoded, not zeroed (unlike SDXL); without T5 its tokens are zeros."""
    c = sd_model(sd3_dir).encode(["a cat", ""])
    assert {k: tuple(v.shape) for k, v in c.items()} == {"hidden": (2, 32 + 256, 48), "pooled": (2, 16)}
    assert not c["hidden"][:, :32, 40:].any() and c["hidden"][:, :32, :40].abs().sum(-1).gt(0).all()
    assert c["hidden"][:, 32:].abs().sum() > 0 and c["pooled"][1].abs().sum() > 0
    n = sd_model(no_t5_dir).encode(["a cat"])
    assert not n["hidden"][:, 32:].any() and n["hidden"][:, :32].abs().sum() > 0


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no-t5"])
@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rollout_matches_the_diffusers_pipeline(sd3_dir, no_t5_dir, t5, scale):
    """Same latents, prompts and 4 steps, the Euler ODE (eta 0): our latents and images equal
    StableDiffusion3Pipeline's, without CFG and with it (the empty prompt as the pipeline's
    negative prompt when none is given); measured max differences 2.2e-6 to 3.3e-6 (latents of
    std 1.2) and 1.2e-6 to 1.4e-6 (images in [0, 1])."""
    d = sd3_dir if t5 else no_t5_dir
    m, pipe = sd_model(d), _pipeline(d, t5)
    kw = dict(num_inference_steps=4, guidance_scale=scale)
    with torch.no_grad():
        z = m.sample(PROMPTS, [0, 1], **kw).x0
        ours = m.output(z)
        ref_z = pipe(PROMPTS, latents=m.noise([0, 1]), output_type="latent", **kw).images
        ref = pipe(PROMPTS, latents=m.noise([0, 1]), output_type="pt", **kw).images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert float((z - ref_z).abs().max()) < 1e-5
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5
    assert float(ref.std()) > 0.01 and float(ref_z.std()) > 0.5  # real samples, not constants


def test_a_dynamically_shifted_schedule_matches_the_pipeline(sd3_dir, tmp_path):
    """A scheduler with ``use_dynamic_shifting`` (FLUX's exponential time shift): mu is the
    pipeline's ``calculate_shift`` of the 8 x 8 = 64 image tokens (between base 16 and max 256
    here), and 3 steps from the same latents match the pipeline's (measured 7e-7)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

    from rewardiff.models.sd3 import time_shift_mu

    pipe = _pipeline(sd3_dir)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5,
                                                     max_shift=1.15, base_image_seq_len=16, max_image_seq_len=256)
    pipe.save_pretrained(str(tmp_path / "dyn"))
    m = sd_model(tmp_path / "dyn")
    assert m.process.use_dynamic_shifting and m.process.mu == pytest.approx(calculate_shift(64, 16, 256, 0.5, 1.15))
    assert time_shift_mu(64, dict(pipe.scheduler.config)) == pytest.approx(0.5 + 0.65 * 48 / 240)
    with torch.no_grad():
        z = m.sample(PROMPTS, [0, 1], 3, guidance_scale=2.0).x0
        ref = pipe(PROMPTS, latents=m.noise([0, 1]), num_inference_steps=3, guidance_scale=2.0, output_type="latent").images
    assert float((z - ref).abs().max()) < 1e-5


# ----------------------------------------------------------------------------- LoRA


def test_lora_fine_tuning_reloads_in_plain_diffusers(sd3_dir, tmp_path):
    """DRaFT-K with LoRA on the transformer's joint-attention projections: the run's
    pytorch_lora_weights.safetensors loads into plain StableDiffusion3Pipeline.load_lora_weights
    and draws our fine-tuned images from the same latents (measured 1.3e-6; the base model
    differs from them by about 0.04)."""
    from safetensors.torch import load_file

    from rewardiff.finetune.trainer import finetune
    from rewardiff.finetune.weights import load_finetuned

    cfg = pipeline_config(sd3_dir, tmp_path, method="draft-k", k=1, steps=2, lr=1e-2, num_inference_steps=3, guidance_scale=2.0)
    finetune(cfg, tmp_path / "run", progress=False)
    keys = load_file(str(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors"))
    layers = {k.split(".attn.")[1].removesuffix(".lora_A.weight") for k in keys if k.endswith("lora_A.weight")}
    assert layers == {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"}
    assert all(k.startswith("transformer.transformer_blocks.") and ".attn2." not in k for k in keys)
    tuned, base = load_finetuned(tmp_path / "run"), sd_model(sd3_dir)
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    a, b = tuned.generate(PROMPTS, [3, 4], **kw), base.generate(PROMPTS, [3, 4], **kw)
    assert not torch.allclose(a, b, atol=1e-4)  # the LoRA changed the model
    pipe = _pipeline(sd3_dir)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=tuned.noise([3, 4]), output_type="pt", **kw).images
    assert float(((a + 1) / 2 - ref).abs().max()) < 1e-5
    assert float(((b + 1) / 2 - ref).abs().max()) > 0.01


# ----------------------------------------------------------------------------- every method

C = 2  # evaluations a denoiser call


@pytest.mark.parametrize("method", list(finetune_table(C)))
def test_every_fine_tuning_method_runs_with_its_nfe(sd3_dir, tmp_path, calls, method):
    assert_finetune_runs_with_its_nfe(sd3_dir, tmp_path, calls, method, C, guidance_scale=2.0)


@pytest.mark.parametrize("method", list(GUIDANCE))
def test_every_inference_time_method_runs_with_its_cost(sd3_dir, tmp_path, calls, method):
    assert_guidance_runs_with_its_cost(sd3_dir, tmp_path, calls, method, C)
