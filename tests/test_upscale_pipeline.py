"""Stable Diffusion's x4 upscaler through diffusers: a tiny random StableDiffusionUpscalePipeline
built offline, its low-res image carried by the prompt ("TEXT | file:low.png"), sampled by the
one rollout loop and pinned against the pipeline's own output, LoRA-tuned and reloaded with
plain load_lora_weights, and fine-tuned by every method of the DRaFT family through the
trainer on a reward that reads the prompt's image."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from rewardiff import conditions
from rewardiff.errors import UserError
from rewardiff.models.sd import SDDenoiser, is_xl_pipeline, sd_model
from rewardiff.models.upscale import is_upscale_pipeline, noise_seed, tiny_upscale_pipeline
from rewardiff.rewards.base import RewardFn

TEXTS = ["a photo of a cat", "a red dog"]
LOW = 8  # the tiny pipeline's low-res side (outputs 32)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    return tiny_upscale_pipeline(tmp_path_factory.mktemp("tiny-x4"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two random 8 x 8 RGB PNGs (paths)."""
    import numpy as np
    from PIL import Image

    d = tmp_path_factory.mktemp("low-res")
    rng = np.random.default_rng(0)
    paths = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (LOW, LOW, 3), dtype=np.uint8)).save(d / f"low{i}.png")
        paths.append(str(d / f"low{i}.png"))
    return paths


def _prompts(images) -> list[str]:
    return [f"{t} | file:{p}" for t, p in zip(TEXTS, images)]


def _pipeline(directory):
    from diffusers import StableDiffusionUpscalePipeline

    pipe = StableDiffusionUpscalePipeline.from_pretrained(str(directory), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _upscaled(pipe, images, latents, output_type: str = "pt", **kw):
    """The pipeline's output from given latents, the PNGs as PIL images and one generator a
    sample seeded with noise_seed (its image noise): [B, 3, H, W] in [0, 1], or the latents."""
    from PIL import Image

    gens = [torch.Generator().manual_seed(noise_seed(p)) for p in _prompts(images)]
    with torch.no_grad():
        return pipe(TEXTS, image=[Image.open(p) for p in images], latents=latents, generator=gens, noise_level=20,
                    output_type=output_type, **kw).images


def _fidelity(x: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """Minus the mean squared distance of the output, average-pooled to the low-res size, to
    the prompt's low-res image [B]."""
    low = torch.stack([conditions.low_res(p) for p in prompts]).to(x)
    return -(F.avg_pool2d(x, x.shape[-1] // low.shape[-1]) - low).square().flatten(1).mean(1)


def low_res_fidelity():
    """A differentiable reward that reads the condition (``tests.test_upscale_pipeline:low_res_fidelity``)."""
    return RewardFn("low-res-fidelity", True, (-4.0, 0.0), "agreement of the downsampled output with the low-res image", _fidelity)


# ----------------------------------------------------------------------------- the model


def test_the_folder_is_recognised_and_encodes_text_image_and_noise_level(pipe_dir, images):
    """model_index.json names the upscaler; latents (4, 8, 8) decode to 32 x 32; the condition
    holds the text states, the image noised as sqrt(abar_20) y + sqrt(1 - abar_20) n with abar
    of the linear DDPM betas 1e-4 .. 0.02 (by hand), and the level 20; the same prompt gives
    the same noise in any batch, and its unconditional prompt the same image with no text."""
    assert is_upscale_pipeline(pipe_dir) and not is_xl_pipeline(pipe_dir)
    m = sd_model(pipe_dir)
    assert type(m.net).__name__ == "UpscaleDenoiser" and m.shape == (4, LOW, LOW) and m.image_size == 32
    p = _prompts(images)
    c = m.encode(p)
    assert c["hidden"].shape == (2, 32, 32) and c["image"].shape == (2, 3, LOW, LOW) and c["noise_level"].tolist() == [20, 20]
    abar = torch.cumprod(1 - torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64), 0)[20]
    y = conditions.read_image(images[0])
    n = torch.randn((1, 3, LOW, LOW), generator=torch.Generator().manual_seed(noise_seed(p[0])))[0]
    assert torch.allclose(c["image"][0], (abar.sqrt() * y + (1 - abar).sqrt() * n).float(), atol=1e-5)  # float32 betas there
    alone = m.encode([p[1], p[0], p[0]])
    assert torch.equal(alone["image"][1], c["image"][0]) and torch.equal(alone["image"][2], c["image"][0])
    assert m.unconditional(p) == [f" | file:{images[0]}", f" | file:{images[1]}"]
    u = m.encode(m.unconditional(p))
    assert torch.equal(u["image"], c["image"]) and torch.equal(u["hidden"], SDDenoiser.encode(m.net, ["", ""]))


@pytest.mark.parametrize("scale", [1.0, 4.0])
def test_rollout_matches_the_diffusers_pipeline(pipe_dir, images, scale):
    """Same latents, low-res images (the PNGs, given to the pipeline as PIL images), image noise
    (one generator a sample, seeded with noise_seed) and 4 DDIM steps (v-prediction, leading
    timesteps 751, 501, 251, 1): our latents and images equal the pipeline's, without guidance
    and with it (the unconditional branch with the same noised image). Measured 1.8e-6 on
    latents of max 3.0 and 1.1e-6 on images in [0, 1]. Broken by hand once, on this tiny
    pipeline: the low-res image left unnoised moved the images by 0.03 (this test failed), the
    noise level embedded as 0 by 0.26 to 0.36 (failed), the unconditional branch's image left
    unnoised by 0.078 at scale 4."""
    m, pipe = sd_model(pipe_dir), _pipeline(pipe_dir)
    assert m.process.timesteps(4) == [751, 501, 251, 1]
    kw = dict(num_inference_steps=4, guidance_scale=scale)
    with torch.no_grad():
        z = m.sample(_prompts(images), [0, 1], **kw).x0
        ours = m.output(z)  # [B, 3, 32, 32] in [-1, 1]
    ref_z = _upscaled(pipe, images, m.noise([0, 1]), "latent", **kw)
    ref = _upscaled(pipe, images, m.noise([0, 1]), **kw)
    assert z.shape == ref_z.shape == (2, 4, LOW, LOW) and ours.shape == ref.shape == (2, 3, 32, 32)
    assert float((z - ref_z).abs().max()) < 2e-5 * max(1.0, float(ref_z.abs().max()))
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5
    assert float(ref.std()) > 0.05


def test_a_prompt_without_an_image_or_with_an_unreadable_one_is_a_one_line_user_error(pipe_dir, images, tmp_path):
    """From sampling, the model's prompt check, and a training run's prompt file (before it writes anything)."""
    m = sd_model(pipe_dir)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    big = tmp_path / "big.png"
    from PIL import Image

    Image.new("RGB", (16, 16)).save(big)
    cases = [("a photo of a cat", "names no image"), (f"a cat | file:{tmp_path / 'missing.png'}", "cannot read image"),
             (f"a cat | file:{bad}", "cannot read image"), (f"a cat | file:{big}", "its image is 16x16; this upscaler takes 8x8")]
    for prompt, message in cases:
        for call in (lambda: m.sample([prompt], [0], 2), lambda: m.check_prompts([_prompts(images)[0], prompt])):
            with pytest.raises(UserError, match=message) as e:
                call()
            assert "\n" not in str(e.value)
    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.trainer import finetune

    prompts = tmp_path / "prompts.txt"
    prompts.write_text(_prompts(images)[0] + "\na photo of a cat\n")
    cfg = FinetuneConfig(model=f"diffusers:{pipe_dir}", reward="tests.test_upscale_pipeline:low_res_fidelity", steps=1,
                         prompts=str(prompts), eval_prompts=str(prompts))
    with pytest.raises(UserError, match=r"config field 'prompts' .*'a photo of a cat' names no image"):
        finetune(cfg, tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_noise_level_above_the_pipeline_maximum_or_a_clipping_scheduler_is_refused(pipe_dir, tmp_path):
    """rewardiff.json sets the noise level (0 .. max_noise_level 350); the pipeline clips nothing."""
    import shutil

    d = tmp_path / "levels"
    shutil.copytree(pipe_dir, d)
    (d / "rewardiff.json").write_text(json.dumps({"noise_level": 0}))
    assert sd_model(d).net.noise_level == 0
    (d / "rewardiff.json").write_text(json.dumps({"noise_level": 351}))
    with pytest.raises(UserError, match="at most the pipeline's max_noise_level 350, got 351"):
        sd_model(d)
    (d / "rewardiff.json").unlink()
    path = d / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "clip_sample": True}))
    with pytest.raises(UserError, match="clip_sample is on"):
        sd_model(d)


# ----------------------------------------------------------------------------- LoRA


def test_lora_tuned_with_rewardiff_reloads_with_plain_load_lora_weights(pipe_dir, images, tmp_path):
    """LoRA (rank 4) on the UNet, one reward-backprop step through the last DDIM step and the
    decoder, saved by rewardiff's weights code; plain StableDiffusionUpscalePipeline
    .load_lora_weights reads it, and the pipeline then draws our fine-tuned images from the
    same latents and image noise (measured 7.2e-7; the base model differs by 0.38)."""
    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.weights import attach_lora, save_weights

    m, p = sd_model(pipe_dir), _prompts(images)
    attach_lora(m, 4, 4.0)
    opt = torch.optim.Adam([q for q in m.net.parameters() if q.requires_grad], lr=1e-2)
    traj = m.sample(p, [0, 1], 3, guidance_scale=2.0, grad_steps={2})
    (-m.output(traj.x0).mean()).backward()  # brighter images
    opt.step()
    save_weights(tmp_path, m.net, FinetuneConfig(model=f"diffusers:{pipe_dir}", lora_rank=4, lora_alpha=4.0))
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    with torch.no_grad():
        ours = m.output(m.sample(p, [3, 4], **kw).x0)
    pipe = _pipeline(pipe_dir)
    base = _upscaled(pipe, images, m.noise([3, 4]), **kw)
    pipe.load_lora_weights(str(tmp_path))
    ref = _upscaled(pipe, images, m.noise([3, 4]), **kw)
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5
    assert float((base - ref).abs().max()) > 0.01  # the LoRA changed the model


# ----------------------------------------------------------------------------- the DRaFT family

DRAFT_FAMILY = {"draft": {}, "draft-k": {"k": 1}, "draft-lv": {"lv_n": 2}, "alignprop": {}, "refl": {}}


@pytest.mark.parametrize("method", sorted(DRAFT_FAMILY))
def test_every_draft_method_fine_tunes_the_upscaler_from_a_prompt_file(pipe_dir, images, tmp_path, method):
    """Two steps of ``method`` through the trainer (model: diffusers:DIR, a prompt file of
    "TEXT | file:PATH" lines for training and evaluation, CFG 2, LoRA rank 4) on a reward that
    reads each prompt's image: finite losses and rewards, and the LoRA trained."""
    from safetensors.torch import load_file

    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.trainer import finetune

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# low-res inputs\n" + "\n".join(_prompts(images)) + "\n")
    cfg = FinetuneConfig(model=f"diffusers:{pipe_dir}", reward="tests.test_upscale_pipeline:low_res_fidelity", method=method,
                         steps=2, batch_size=2, lr=1e-2, lora_rank=4, lora_alpha=4.0, num_inference_steps=3, guidance_scale=2.0,
                         prompts=str(prompts), eval_prompts=str(prompts), eval_samples=2, eval_every=0, checkpoint_every=0,
                         seed=1, **{"k": 3, **DRAFT_FAMILY[method]})
    summary = finetune(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 2 and all(math.isfinite(r["loss"]) and math.isfinite(r["reward_mean"]) for r in steps)
    assert math.isfinite(summary["after"]["eval_reward_mean"])
    weights = load_file(str(tmp_path / "run" / "final" / "trainable.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)  # lora_B starts at zero


def test_vard_fine_tunes_the_upscaler_its_value_reading_the_low_res_image(pipe_dir, images, tmp_path):
    """VARD on the upscaler: its value model takes the image condition (pooled onto a 4 x 4 grid
    beside the text), fits on a short warm-up and trains the LoRA through two steps."""
    from safetensors.torch import load_file

    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.trainer import finetune

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(_prompts(images)) + "\n")
    cfg = FinetuneConfig(model=f"diffusers:{pipe_dir}", reward="tests.test_upscale_pipeline:low_res_fidelity", method="vard",
                         steps=2, batch_size=2, lr=1e-2, lora_rank=4, lora_alpha=4.0, num_inference_steps=3, guidance_scale=2.0,
                         prompts=str(prompts), eval_prompts=str(prompts), eval_samples=2, eval_every=0, checkpoint_every=0,
                         seed=1, eta=1.0, vard_warmup=4, vard_warmup_steps=5, vard_value_steps=2)
    finetune(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in rows if "loss" in r]) == 2 and all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    weights = load_file(str(tmp_path / "run" / "final" / "trainable.safetensors"))
    assert any(float(v.abs().max()) > 0 for k, v in weights.items() if "lora_B" in k)
