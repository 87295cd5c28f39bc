"""Stable Diffusion and Stable Diffusion XL through diffusers: tiny random pipelines built
offline, sampled by the one rollout loop, steered, fine-tuned with LoRA and reloaded."""

from __future__ import annotations

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.guidance import guided_sample, make_method
from rewardiff.models.sd import is_xl_pipeline, sd_model, tiny_pipeline, tiny_xl_pipeline
from rewardiff.rewards import get_reward

PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="module")
def xl_dir(tmp_path_factory):
    return tiny_xl_pipeline(tmp_path_factory.mktemp("tiny-sdxl"))


def _xl_pipeline(directory):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(directory), local_files_only=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_rollout_matches_the_diffusers_pipeline(pipe_dir):
    """Same latents, same prompts, DDIM eta 0, CFG 2: our loop and StableDiffusionPipeline agree."""
    from diffusers import StableDiffusionPipeline

    m = sd_model(pipe_dir)
    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        ours = m.generate(PROMPTS, [0, 1], num_inference_steps=4, guidance_scale=2.0)
        ref = pipe(PROMPTS, latents=m.noise([0, 1]), num_inference_steps=4, guidance_scale=2.0, output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert torch.allclose((ours + 1) / 2, ref, atol=1e-5)
    assert float(ref.std()) > 0.01  # a real image, not a constant


def test_inference_time_method_runs_on_latents_with_exact_nfe(pipe_dir):
    m = sd_model(pipe_dir)
    reward = get_reward("brightness")
    base = m.generate(PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=2.0, eta=1.0)
    x, info = guided_sample(m, make_method("svdd-pm", reward, width=3), PROMPTS, [0, 1], 3, guidance_scale=2.0)
    assert info["nfe_per_sample"] == 2 * (1 + 3 * 2)
    assert float(reward(x, PROMPTS).mean()) >= float(reward(base, PROMPTS).mean())
    one, _ = guided_sample(m, make_method("svdd-pm", reward, width=1), PROMPTS, [0, 1], 3, guidance_scale=2.0)
    assert torch.equal(one, base)


def test_lora_fine_tuning_reloads_to_the_same_images(pipe_dir, tmp_path):
    from rewardiff.finetune.trainer import finetune
    from rewardiff.finetune.weights import load_finetuned

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    prompts = str(tmp_path / "prompts.txt")
    cfg = FinetuneConfig(model=f"diffusers:{pipe_dir}", reward="brightness", method="draft-k", k=1, steps=2, batch_size=2,
                         lr=1e-2, lora_rank=4, num_inference_steps=3, guidance_scale=2.0, prompts=prompts,
                         eval_prompts=prompts, eval_samples=2, eval_every=0, checkpoint_every=0)
    finetune(cfg, tmp_path / "run", progress=False)
    tuned = load_finetuned(tmp_path / "run")
    base = sd_model(pipe_dir)
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    a, b = tuned.generate(PROMPTS, [3, 4], **kw), base.generate(PROMPTS, [3, 4], **kw)
    assert not torch.allclose(a, b, atol=1e-4)  # the LoRA changed the model
    again = load_finetuned(tmp_path / "run").generate(PROMPTS, [3, 4], **kw)
    assert torch.equal(a, again)
    # plain diffusers loads the LoRA and draws the same images from the same latents
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pipe_dir), local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=tuned.noise([3, 4]), num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
    # float32 rounding of two LoRA code paths over 3 steps and the VAE: ~1e-4; the base differs by ~0.3
    assert torch.allclose((a + 1) / 2, ref, atol=5e-4)
    assert float(((b + 1) / 2 - ref).abs().max()) > 0.05


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_xl_rollout_matches_the_diffusers_pipeline(xl_dir, scale):
    """SDXL: both text encoders, the pooled embedding, the size time ids and (with CFG) the
    zeros the pipeline uses for the unconditional embedding: our loop and
    StableDiffusionXLPipeline agree from the same latents, DDIM eta 0."""
    m = sd_model(xl_dir)
    assert is_xl_pipeline(xl_dir) and type(m.net).__name__ == "SDXLDenoiser"
    with torch.no_grad():
        ours = m.generate(PROMPTS, [0, 1], num_inference_steps=4, guidance_scale=scale)
        ref = _xl_pipeline(xl_dir)(PROMPTS, latents=m.noise([0, 1]), num_inference_steps=4, guidance_scale=scale,
                                   output_type="pt").images
    assert ours.shape == ref.shape == (2, 3, 32, 32)
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5  # measured ~5e-7
    assert float(ref.std()) > 0.01


def test_xl_condition_is_a_dict_with_zeros_for_the_empty_prompt(xl_dir):
    m = sd_model(xl_dir)
    c = m.encode(["a cat", ""])
    assert {k: tuple(v.shape) for k, v in c.items()} == {"hidden": (2, 32, 80), "pooled": (2, 24), "time_ids": (2, 6)}
    assert c["hidden"][0].abs().sum() > 0 and c["pooled"][0].abs().sum() > 0
    assert not c["hidden"][1].any() and not c["pooled"][1].any()  # force_zeros_for_empty_prompt
    assert c["time_ids"].tolist() == [[32.0, 32.0, 0.0, 0.0, 32.0, 32.0]] * 2  # (orig h, w, crop top, left, target h, w)


def test_xl_inference_time_method_runs_with_exact_nfe(xl_dir):
    m = sd_model(xl_dir)
    reward = get_reward("brightness")
    base = m.generate(PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=2.0, eta=1.0)
    x, info = guided_sample(m, make_method("svdd-pm", reward, width=2), PROMPTS, [0, 1], 3, guidance_scale=2.0)
    assert info["nfe_per_sample"] == 2 * (1 + 2 * 2)  # c (1 + M (T - 1)) with CFG c = 2, M = 2, T = 3
    assert float(reward(x, PROMPTS).mean()) >= float(reward(base, PROMPTS).mean())


def test_xl_lora_fine_tuning_reloads_in_plain_diffusers(xl_dir, tmp_path):
    from rewardiff.finetune.trainer import finetune
    from rewardiff.finetune.weights import load_finetuned

    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    prompts = str(tmp_path / "prompts.txt")
    cfg = FinetuneConfig(model=f"diffusers:{xl_dir}", reward="brightness", method="draft-k", k=1, steps=2, batch_size=2,
                         lr=1e-2, lora_rank=4, num_inference_steps=3, guidance_scale=2.0, prompts=prompts,
                         eval_prompts=prompts, eval_samples=2, eval_every=0, checkpoint_every=0)
    finetune(cfg, tmp_path / "run", progress=False)
    tuned, base = load_finetuned(tmp_path / "run"), sd_model(xl_dir)
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    a, b = tuned.generate(PROMPTS, [3, 4], **kw), base.generate(PROMPTS, [3, 4], **kw)
    assert not torch.allclose(a, b, atol=1e-4)  # the LoRA changed the model
    pipe = _xl_pipeline(xl_dir)
    pipe.load_lora_weights(str(tmp_path / "run" / "final"))
    with torch.no_grad():
        ref = pipe(PROMPTS, latents=tuned.noise([3, 4]), num_inference_steps=3, guidance_scale=2.0, output_type="pt").images
    assert float(((a + 1) / 2 - ref).abs().max()) < 5e-4  # two LoRA code paths in float32
    assert float(((b + 1) / 2 - ref).abs().max()) > 0.05


def test_missing_pipeline_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no diffusers pipeline"):
        sd_model(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        sd_model(tmp_path)


def test_prompt_sets_from_names_text_and_json(tmp_path):
    from rewardiff.prompts import ANIMALS, ANIMALS_HELD_OUT, prompt_set

    assert prompt_set("animals") == ANIMALS and not set(ANIMALS) & set(ANIMALS_HELD_OUT)
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "p.json").write_text('{"prompts": ["a cat", "a dog"]}')
    (tmp_path / "q.json").write_text('["a cat", "a dog"]')
    (tmp_path / "bad.json").write_text('{"prompts": [1, 2]}')
    assert prompt_set(str(tmp_path / "p.txt")) == prompt_set(str(tmp_path / "p.json")) == prompt_set(str(tmp_path / "q.json")) == ["a cat", "a dog"]
    with pytest.raises(UserError, match="list of strings"):
        prompt_set(str(tmp_path / "bad.json"))
    with pytest.raises(UserError, match="neither"):
        prompt_set("no-such-set")
