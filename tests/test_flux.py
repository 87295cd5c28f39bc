"""FLUX.1 through diffusers: tiny random FluxPipelines built offline (guidance-distilled like
FLUX.1-dev, and without the guidance input like FLUX.1-schnell), sampled by the one rollout
loop and pinned against the pipeline, every fine-tuning and inference-time method run on them
with the transformer's calls counted, and LoRA reloaded in plain diffusers."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from rewardiff.models.flux import image_ids, is_flux_pipeline, pack, tiny_flux_pipeline, unpack
from rewardiff.models.sd import is_xl_pipeline, sd_model
from rewardiff.models.sd3 import is_sd3_pipeline
from rewardiff.processes.flow import FlowProcess

from tests.pipeline_methods import (GUIDANCE, PROMPTS, assert_finetune_runs_with_its_nfe, assert_guidance_runs_with_its_cost,
                                     count_rows, finetune_table, pipeline_config)
SIDE = 16  # latent side of the tiny pipelines' 32-pixel images


@pytest.fixture(scope="module")
def dev_dir(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux-dev"))


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return tiny_flux_pipeline(tmp_path_factory.mktemp("tiny-flux-schnell"), guidance_embeds=False)


def _pipeline(directory):
    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(str(directory), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reference(pipe, m, seeds, output_type: str, **kw):
    """The pipeline's output from our initial noise, packed as its ``latents=``; latents unpacked."""
    out = pipe(PROMPTS, latents=pack(m.noise(seeds)), output_type=output_type, height=m.image_size, width=m.image_size,
               max_sequence_length=m.net.t5_length, **kw).images
    return unpack(out, SIDE, SIDE) if output_type == "latent" else out


@pytest.fixture
def calls(monkeypatch):
    from diffusers import FluxTransformer2DModel

    return count_rows(monkeypatch, FluxTransformer2DModel)


# ----------------------------------------------------------------------------- the model



def test_train_mode_leaves_the_text_encoders_in_eval_mode(dev_dir):
    """As for SD3: T5's dropout in train mode would encode a prompt differently at every step."""
    from rewardiff.models.registry import base_model

    net = base_model(f"diffusers:{dev_dir}").net
    net.train()
    assert net.transformer.training and not net.t5.training and not net.text.training
    cond = [net.encode(["a red dog"])["hidden"] for _ in range(2)]
    assert torch.equal(cond[0], cond[1])

def test_the_folder_is_recognised_and_read_as_a_flow_model(dev_dir, schnell_dir):
    """model_index.json names FluxPipeline (it has text_encoder_2, as SDXL's does); the state is
    the 16-channel latent at half the resolution; FLUX.1-dev's scheduler shifts dynamically with
    mu of the 8 x 8 = 64 image tokens (0.5 + 0.65 (64 - 256) / 3840 = 0.4675) and its net embeds
    the guidance 3.5; schnell's neither shifts nor embeds guidance."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    assert is_flux_pipeline(dev_dir) and not is_xl_pipeline(dev_dir) and not is_sd3_pipeline(dev_dir)
    dev, schnell = sd_model(dev_dir), sd_model(schnell_dir)
    for m in (dev, schnell):
        assert type(m.net).__name__ == "FluxDenoiser" and type(m.process) is FlowProcess and m.process.sigma_grid == "flux"
        assert m.shape == (16, SIDE, SIDE) and m.image_size == 32 and m.capabilities == {"chain", "gaussian"}
    assert dev.process.use_dynamic_shifting and dev.process.mu == pytest.approx(calculate_shift(64, 256, 4096, 0.5, 1.15))
    assert dev.process.mu == pytest.approx(0.4675) and dev.net.guidance == 3.5
    assert not schnell.process.use_dynamic_shifting and schnell.process.shift == 1.0 and schnell.net.guidance is None
    assert schnell.process.timesteps(4) == [1000.0, 750.0, 500.0, 250.0]  # linspace(1, 1/4, 4), unshifted


def test_packing_and_position_ids_are_the_pipelines():
    """pack / unpack are FluxPipeline's _pack_latents / _unpack_latents (exactly, and inverse to
    each other); the image ids are its (0, row, col) of each 2 x 2 patch."""
    from diffusers import FluxPipeline

    z = torch.randn(3, 16, 6, 10)
    tokens = pack(z)
    assert tokens.shape == (3, 15, 64)
    assert torch.equal(tokens, FluxPipeline._pack_latents(z, 3, 16, 6, 10))
    assert torch.equal(unpack(tokens, 6, 10), z)
    assert torch.equal(FluxPipeline._unpack_latents(tokens, 6 * 8, 10 * 8, 8), z)
    assert torch.equal(image_ids(6, 10, z), FluxPipeline._prepare_latent_image_ids(3, 3, 5, "cpu", torch.float32))
    assert image_ids(6, 10, z)[6].tolist() == [0.0, 1.0, 1.0]  # token 6 = row 1, column 1 of 3 x 5


def test_the_condition_is_t5_states_and_the_clip_pooled_state(dev_dir):
    """hidden = the T5 encoder's last states over its 32 tokens (48 wide), pooled = CLIP's
    pooler_output (16, the transformer's pooled input, not projected): exactly the pipeline's
    encode_prompt; the empty prompt is encoded, not zeroed."""
    m, pipe = sd_model(dev_dir), _pipeline(dev_dir)
    with torch.no_grad():
        c = m.encode(["a cat", ""])
        hidden, pooled, text_ids = pipe.encode_prompt(["a cat", ""], max_sequence_length=32)
    assert {k: tuple(v.shape) for k, v in c.items()} == {"hidden": (2, 32, 48), "pooled": (2, 16)}
    assert torch.equal(c["hidden"], hidden) and torch.equal(c["pooled"], pooled) and not text_ids.any()
    assert c["hidden"][1].abs().sum() > 0 and c["pooled"][1].abs().sum() > 0


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_rollout_matches_the_diffusers_pipeline(dev_dir, schnell_dir, calls, variant, scale):
    """Same latents (ours, packed), prompts and 4 steps, the Euler ODE: our latents and images
    equal FluxPipeline's, with the embedded guidance 3.5 (dev) or none (schnell), at our
    classifier-free scale 1 (one transformer call a step: 4 x 2 rows) and 2 (the pipeline's
    true_cfg_scale 2 with the empty negative prompt: 2 calls a step); measured max differences
    0 to 1.2e-6 (latents of std 1.2) and 0 to 8.3e-7 (images in [0, 1])."""
    d = dev_dir if variant == "dev" else schnell_dir
    m, pipe = sd_model(d), _pipeline(d)
    kw = dict(num_inference_steps=4)
    cfg = {} if scale == 1.0 else dict(true_cfg_scale=scale, negative_prompt="")
    with torch.no_grad():
        z = m.sample(PROMPTS, [0, 1], guidance_scale=scale, **kw).x0
        assert calls["rows"] == 4 * 2 * (1 if scale == 1.0 else 2)
        ours = m.output(z)
        ref_z = _reference(pipe, m, [0, 1], "latent", **kw, **cfg)
        ref = _reference(pipe, m, [0, 1], "pt", **kw, **cfg)
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert float((z - ref_z).abs().max()) < 1e-5
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5
    assert float(ref.std()) > 0.01 and float(ref_z.std()) > 0.5  # real samples, not constants


def test_the_distilled_guidance_is_a_setting_of_the_net(dev_dir):
    """Setting the net's guidance to 5 draws the pipeline's images at guidance_scale=5 (one call a
    step, no classifier-free guidance; measured 0), which differ from those at the default 3.5
    (by 0.35)."""
    m, pipe = sd_model(dev_dir), _pipeline(dev_dir)
    with torch.no_grad():
        base = m.sample(PROMPTS, [2, 3], 3).x0
        m.net.guidance = 5.0
        z = m.sample(PROMPTS, [2, 3], 3).x0
        ref = _reference(pipe, m, [2, 3], "latent", num_inference_steps=3, guidance_scale=5.0)
    assert float((z - ref).abs().max()) < 1e-5 and float((z - base).abs().max()) > 1e-3


def test_the_schedule_is_the_pipelines_at_any_number_of_steps(dev_dir):
    """The pipeline's timesteps (sigmas linspace(1, 1/n, n), shifted with its mu) for n = 1, 4, 28."""
    m, pipe = sd_model(dev_dir), _pipeline(dev_dir)
    for n in (1, 4, 28):
        pipe.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=m.process.mu)
        np.testing.assert_allclose(m.process.timesteps(n), pipe.scheduler.timesteps.double().numpy(), rtol=1e-6)


# ----------------------------------------------------------------------------- LoRA

LORA_LAYERS = {"attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
               "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
               "ff_context.net.2"}


def test_lora_fine_tuning_reloads_in_plain_diffusers(dev_dir, tmp_path):
    """DRaFT-K with LoRA on the layers diffusers' FLUX LoRA training adapts (the double-stream
    block's attention and feed-forwards, the single-stream block's q, k, v): the run's
    pytorch_lora_weights.safetensors loads into plain FluxPipeline.load_lora_weights and draws
    our fine-tuned images from the same latents (measured 0: the same float operations; the
    base model differs from them by 0.027)."""
    from safetensors.torch import load_file

    from rewardiff.finetune.trainer import finetune
    from rewardiff.finetune.weights import load_finetuned

    cfg = pipeline_config(dev_dir, tmp_path, method="draft-k", k=1, steps=2, lr=1e-2, num_inference_steps=3, guidance_scale=1.0)
    finetune(cfg, tmp_path / "run", progress=False)
    keys = load_file(str(tmp_path / "run" / "final" / "pytorch_lora_weights.safetensors"))
    a_keys = [k.removeprefix("transformer.").removesuffix(".lora_A.weight") for k in keys if k.endswith("lora_A.weight")]
    double = {k.split(".", 2)[2] for k in a_keys if k.startswith("transformer_blocks.")}
    single = {k.split(".", 2)[2] for k in a_keys if k.startswith("single_transformer_blocks.")}
    assert double == LORA_LAYERS and single == {"attn.to_q", "attn.to_k", "attn.to_v"}
    assert all(k.startswith("transformer.") for k in keys) and len(a_keys) == len(double) + len(single)
    tuned, base = load_finetuned(tmp_path / "run"), sd_model(dev_dir)
    kw = dict(num_inference_steps=3)
    a, b = tuned.generate(PROMPTS, [3, 4], guidance_scale=1.0, **kw), base.generate(PROMPTS, [3, 4], guidance_scale=1.0, **kw)
    assert not torch.allclose(a, b, atol=1e-4)  # the LoRA changed the model
    pipe = _pipeline(dev_dir)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    with torch.no_grad():
        ref = _reference(pipe, tuned, [3, 4], "pt", **kw)
    assert float(((a + 1) / 2 - ref).abs().max()) < 1e-5
    assert float(((b + 1) / 2 - ref).abs().max()) > 0.01


# ----------------------------------------------------------------------------- every method

C = 1  # evaluations a denoiser call


@pytest.mark.parametrize("method", list(finetune_table(C)))
def test_every_fine_tuning_method_runs_with_its_nfe(dev_dir, tmp_path, calls, method):
    assert_finetune_runs_with_its_nfe(dev_dir, tmp_path, calls, method, C, guidance_scale=1.0)


@pytest.mark.parametrize("method", list(GUIDANCE))
def test_every_inference_time_method_runs_with_its_cost(dev_dir, tmp_path, calls, method):
    assert_guidance_runs_with_its_cost(dev_dir, tmp_path, calls, method, C)
