"""Text-to-video through diffusers: tiny random TextToVideoSDPipelines built offline, sampled by
the one rollout loop and pinned against the pipeline's own output (latents and every frame),
decoded frame by frame, and LoRA-tuned with the adapter reloaded in plain diffusers and peft."""

from __future__ import annotations

import json

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.models.sd import is_xl_pipeline, sd_model
from rewardiff.models.sd3 import is_sd3_pipeline
from rewardiff.models.video import is_video_pipeline, load_video_lora, tiny_video_pipeline

PROMPTS = ["a photo of a cat", "a red dog"]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    return tiny_video_pipeline(tmp_path_factory.mktemp("tiny-t2v"), frames=8)


@pytest.fixture(scope="module")
def short_dir(tmp_path_factory):
    return tiny_video_pipeline(tmp_path_factory.mktemp("tiny-t2v-4"), seed=1, frames=4)


def _pipeline(directory):
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(str(directory), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _frames(pipe, latents, frames: int, output_type: str = "pt", **kw):
    """The pipeline's output from given latents: [B, F, 3, H, W] in [0, 1], or the latents."""
    with torch.no_grad():
        return pipe(PROMPTS, latents=latents, num_frames=frames, output_type=output_type, **kw).frames


# ----------------------------------------------------------------------------- the model


def test_the_folder_is_recognised_and_read_as_a_video_model(video_dir, short_dir):
    """model_index.json names TextToVideoSDPipeline; samples are latents (C, F, h, w) with the
    frames of rewardiff.json; the process is ModelScope's DDIM config: leading timesteps with
    steps_offset 1, which DDIMScheduler places at 751, 501, 251, 1 for 4 steps."""
    from diffusers import DDIMScheduler

    assert is_video_pipeline(video_dir) and not is_xl_pipeline(video_dir) and not is_sd3_pipeline(video_dir)
    m = sd_model(video_dir)
    assert type(m.net).__name__ == "VideoSDDenoiser" and type(m.net.unet).__name__ == "UNet3DConditionModel"
    assert m.shape == (4, 8, 16, 16) and m.image_size == 32 and m.frames == 8
    assert sd_model(short_dir).shape == (4, 4, 16, 16)
    ref = DDIMScheduler.from_pretrained(str(video_dir), subfolder="scheduler")
    for n in (1, 3, 4, 7):
        ref.set_timesteps(n)
        assert m.process.timesteps(n) == ref.timesteps.tolist()
    assert m.process.timesteps(4) == [751, 501, 251, 1]


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_rollout_matches_the_diffusers_pipeline(video_dir, scale):
    """Same latents [B, 4, 8, 16, 16], prompts and 4 DDIM steps at eta 0: our latents equal the
    pipeline's output_type="latent" and our decoded frames its output_type="pt" frames,
    without guidance and with it (the empty prompt as the unconditional one). Measured
    1.1e-5 on latents of std 4.5, and 4.8e-7 on frames in [0, 1]. A wrong steps_offset (0)
    moves the frames by 5e-3, a reversed frame order by 0.98."""
    m, pipe = sd_model(video_dir), _pipeline(video_dir)
    kw = dict(num_inference_steps=4, guidance_scale=scale)
    with torch.no_grad():
        z = m.sample(PROMPTS, [0, 1], **kw).x0
        ours = m.output(z)  # [B, 3, F, H, W] in [-1, 1]
    ref_z = _frames(pipe, m.noise([0, 1]), 8, "latent", **kw)
    ref = _frames(pipe, m.noise([0, 1]), 8, **kw)  # [B, F, 3, H, W] in [0, 1]
    assert z.shape == ref_z.shape == (2, 4, 8, 16, 16)
    assert ours.shape == (2, 3, 8, 32, 32) and ref.shape == (2, 8, 3, 32, 32)
    assert float((z - ref_z).abs().max()) < 5e-5 * float(ref_z.abs().max())
    assert float(((ours + 1) / 2 - ref.permute(0, 2, 1, 3, 4)).abs().max()) < 1e-5
    assert float(ref.std()) > 0.01 and float((ref[:, 0] - ref[:, -1]).abs().max()) > 0.1  # real, distinct frames


def test_decode_is_the_vae_on_each_frame_in_range_with_gradients(video_dir):
    """decode(z)[:, :, f] is vae.decode(z[:, :, f] / scale), videos [B, 3, F, H, W]; outputs
    are clamped to [-1, 1]; with gradients the per-frame checkpoints give the same videos, and
    the gradient reaches every frame of the latents."""
    m = sd_model(video_dir)
    vae = _pipeline(video_dir).vae
    z = torch.randn(2, 4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        video = m.decode(z)
        by_hand = torch.stack([vae.decode(z[:, :, f] / vae.config.scaling_factor).sample for f in range(3)], dim=2)
    assert video.shape == (2, 3, 3, 32, 32)
    assert float((video - by_hand).abs().max()) < 1e-5
    out = m.output(4 * z)
    assert float(out.min()) >= -1.0 and float(out.max()) <= 1.0
    zg = z.clone().requires_grad_(True)
    with_grad = m.decode(zg)
    with_grad.square().mean().backward()
    assert torch.allclose(with_grad.detach(), video, atol=1e-6)
    assert zg.grad is not None and bool(zg.grad.flatten(3).abs().sum(-1).gt(0).all())  # every frame of every sample


# ----------------------------------------------------------------------------- LoRA


def test_lora_tuned_with_rewardiff_reloads_in_plain_diffusers(short_dir, tmp_path):
    """LoRA (rank 4) on the UNet3D's spatial and temporal layers, one reward-backprop step
    through the last DDIM step and the decoder; saved with rewardiff's weights code. Plain
    TextToVideoSDPipeline.load_lora_weights fails in diffusers 0.42 (its UNet3D has no
    load_lora_adapter); diffusers' own reader (lora_state_dict) and peft load the file into
    the pipeline's UNet, and the pipeline then draws our fine-tuned frames from the same
    latents (measured 5.4e-7; the base model differs by 0.12)."""
    from safetensors.torch import load_file

    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.weights import attach_lora, load_finetuned, save_weights

    m = sd_model(short_dir)
    attach_lora(m, 4, 4.0)
    params = [p for p in m.net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=1e-2)
    traj = m.sample(PROMPTS, [0, 1], 3, guidance_scale=2.0, grad_steps={2})
    (-m.output(traj.x0).mean()).backward()  # brighter videos
    opt.step()
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    save_weights(final, m.net, FinetuneConfig(model=f"diffusers:{short_dir}", lora_rank=4, lora_alpha=4.0))

    keys = load_file(str(final / "pytorch_lora_weights.safetensors"))
    assert all(k.startswith("unet.") for k in keys)
    for part in ("attentions.0.transformer_blocks.0.attn2.to_k", "temp_attentions.0.transformer_blocks.0.attn1.to_q",
                 "temp_convs.0.conv1.2", "temp_convs.0.conv4.3", "resnets.0.conv1", "transformer_in.proj_in"):
        assert any(part + ".lora_A.weight" in k for k in keys), part  # spatial and temporal layers adapted

    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    with torch.no_grad():
        ours = m.generate(PROMPTS, [3, 4], **kw)
    assert torch.equal(load_finetuned(tmp_path / "run").generate(PROMPTS, [3, 4], **kw), ours)  # rewardiff reloads it
    with pytest.raises(AttributeError, match="load_lora_adapter"):
        _pipeline(short_dir).load_lora_weights(str(final))

    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    pipe = _pipeline(short_dir)
    state, _, meta = pipe.lora_state_dict(str(final), return_lora_metadata=True)
    inject_adapter_in_model(LoraConfig(**{k.removeprefix("unet."): v for k, v in meta.items()}), pipe.unet)
    set_peft_model_state_dict(pipe.unet, {k.removeprefix("unet."): v for k, v in state.items()})
    ref = _frames(pipe, m.noise([3, 4]), 4, **kw).permute(0, 2, 1, 3, 4)
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5
    base = _frames(_pipeline(short_dir), m.noise([3, 4]), 4, **kw).permute(0, 2, 1, 3, 4)
    assert float((base - ref).abs().max()) > 0.01  # the LoRA changed the model
    helped = _pipeline(short_dir)
    load_video_lora(helped, final)  # the same two calls
    want, got = pipe.unet.state_dict(), helped.unet.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


# ----------------------------------------------------------------------------- bad folders


def test_a_broken_folder_is_a_one_line_user_error(video_dir, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(video_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(UserError, match="cannot load the text-to-video pipeline") as e:
        sd_model(broken)
    assert "\n" not in str(e.value)
    bad_frames = tmp_path / "frames"
    shutil.copytree(video_dir, bad_frames)
    (bad_frames / "rewardiff.json").write_text(json.dumps({"num_frames": 0}))
    with pytest.raises(UserError, match="num_frames must be a positive integer"):
        sd_model(bad_frames)


def test_a_linspace_scheduler_is_refused(tmp_path, video_dir):
    """DDIM with linspace timesteps steps to t - N // n, not to the next timestep; the one
    rollout cannot reproduce it, so the folder is refused with the field named."""
    import shutil

    d = tmp_path / "linspace"
    shutil.copytree(video_dir, d)
    path = d / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "timestep_spacing": "linspace"}))
    with pytest.raises(UserError, match="timestep_spacing 'linspace'"):
        sd_model(d)


# ----------------------------------------------------------------------------- Wan 2.1

WAN_PROMPTS = ["a photo of a cat", "a red dog &amp; a cat"]  # the pipeline's prompt_clean unescapes &amp;


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from rewardiff.models.wan import tiny_wan_pipeline

    return tiny_wan_pipeline(tmp_path_factory.mktemp("tiny-wan"), frames=9)


def _wan_pipeline(directory):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(str(directory), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _wan_frames(pipe, latents, output_type: str = "pt", **kw):
    with torch.no_grad():
        return pipe(WAN_PROMPTS, latents=latents, height=32, width=32, num_frames=9, output_type=output_type, **kw).frames


def test_a_wan_folder_is_a_flow_model_of_causal_vae_latents(wan_dir):
    """9 frames of 32 x 32 compress to 3 latent frames of 4 x 4 with 16 channels; the process is
    the scheduler's shift-3 flow; prompts are 512 UMT5 states, zero after each prompt's tokens."""
    from rewardiff.models.wan import is_wan_pipeline
    from rewardiff.processes.flow import FlowProcess

    assert is_wan_pipeline(wan_dir) and not is_video_pipeline(wan_dir) and not is_xl_pipeline(wan_dir)
    m = sd_model(wan_dir)
    assert type(m.net).__name__ == "WanDenoiser" and type(m.process) is FlowProcess and m.process.shift == 3.0
    assert m.shape == (16, 3, 4, 4) and m.frames == 9 and m.image_size == (32, 32)
    c = m.encode(["a cat", ""])
    n = len(m.net.tokenizer("a cat").input_ids)  # its tokens, the end token included
    assert c.shape == (2, 512, 32) and c[0, :n].abs().sum(-1).gt(0).all() and not c[0, n:].any()
    assert c[1, :1].abs().sum() > 0 and not c[1, 1:].any()  # the empty prompt: the end token alone
    with torch.no_grad():
        video = m.output(m.noise([0]) * 3)
    assert video.shape == (1, 3, 9, 32, 32) and float(video.min()) >= -1 and float(video.max()) <= 1


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_wan_rollout_matches_the_diffusers_pipeline(wan_dir, scale):
    """Same latents, prompts and 4 Euler steps of the flow-matching scheduler (shift 3): our
    latents and frames equal WanPipeline's, without CFG and with it (two calls a step there,
    one batched call here). Measured 3.9e-6 on latents of std 1.2 and 1.5e-6 on frames; the
    masked states left unzeroed move the frames by 0.09, prompt_clean skipped by 1.7e-3, shift 5
    for 3 by 0.05, and guidance 1 for 3 by 5.6e-3."""
    m, pipe = sd_model(wan_dir), _wan_pipeline(wan_dir)
    kw = dict(num_inference_steps=4, guidance_scale=scale)
    with torch.no_grad():
        z = m.sample(WAN_PROMPTS, [0, 1], **kw).x0
        ours = m.output(z)
    ref_z, ref = _wan_frames(pipe, m.noise([0, 1]), "latent", **kw), _wan_frames(pipe, m.noise([0, 1]), **kw)
    assert z.shape == ref_z.shape == (2, 16, 3, 4, 4) and ours.shape == (2, 3, 9, 32, 32) and ref.shape == (2, 9, 3, 32, 32)
    assert float((z - ref_z).abs().max()) < 2e-5
    assert float(((ours + 1) / 2 - ref.permute(0, 2, 1, 3, 4)).abs().max()) < 1e-5
    assert float(ref.std()) > 0.01 and float((ref[:, 0] - ref[:, -1]).abs().max()) > 0.01


def test_wan_lora_reloads_with_plain_load_lora_weights(wan_dir, tmp_path):
    """LoRA on the transformer's self- and cross-attention, one reward-backprop step; the
    file rewardiff writes loads with plain WanPipeline.load_lora_weights, which then draws our
    fine-tuned frames from the same latents (measured 7.7e-7; the base model differs by 0.05)."""
    from safetensors.torch import load_file

    from rewardiff.finetune.config import FinetuneConfig
    from rewardiff.finetune.weights import attach_lora, save_weights

    m = sd_model(wan_dir)
    attach_lora(m, 4, 4.0)
    opt = torch.optim.Adam([p for p in m.net.parameters() if p.requires_grad], lr=3e-2)
    traj = m.sample(WAN_PROMPTS, [0, 1], 3, guidance_scale=2.0, grad_steps={2})
    (-m.output(traj.x0).mean()).backward()
    opt.step()
    save_weights(tmp_path, m.net, FinetuneConfig(model=f"diffusers:{wan_dir}", lora_rank=4, lora_alpha=4.0))
    keys = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    layers = {k.split(".", 3)[3].removesuffix(".lora_A.weight") for k in keys if k.endswith("lora_A.weight")}
    assert layers == {f"attn{i}.{p}" for i in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")}
    kw = dict(num_inference_steps=3, guidance_scale=2.0)
    with torch.no_grad():
        ours = m.output(m.sample(WAN_PROMPTS, [3, 4], **kw).x0)
    pipe = _wan_pipeline(wan_dir)
    base = _wan_frames(pipe, m.noise([3, 4]), **kw).permute(0, 2, 1, 3, 4)
    pipe.load_lora_weights(str(tmp_path))
    ref = _wan_frames(pipe, m.noise([3, 4]), **kw).permute(0, 2, 1, 3, 4)
    assert float(((ours + 1) / 2 - ref).abs().max()) < 1e-5
    assert float((base - ref).abs().max()) > 1e-3  # the LoRA changed the model


def test_a_wan_folder_with_another_scheduler_is_refused(wan_dir, tmp_path):
    import shutil

    from diffusers import UniPCMultistepScheduler

    d = tmp_path / "unipc"
    shutil.copytree(wan_dir, d)
    shutil.rmtree(d / "scheduler")
    unipc = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    unipc.save_pretrained(d / "scheduler")
    index = json.loads((d / "model_index.json").read_text())
    (d / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "UniPCMultistepScheduler"]}))
    with pytest.raises(UserError, match=r"FlowMatchEulerDiscreteScheduler\(shift=3.0\)"):
        sd_model(d)
    wan = tmp_path / "frames"
    shutil.copytree(wan_dir, wan)
    (wan / "rewardiff.json").write_text(json.dumps({"num_frames": 8, "height": 32, "width": 32}))
    with pytest.raises(UserError, match="num_frames - 1 must be a multiple of 4"):
        sd_model(wan)


# ----------------------------------------------------------------------------- steering


@pytest.mark.parametrize("folder", ["short_dir", "wan_dir"])
def test_an_inference_time_method_steers_videos_with_exact_nfe(folder, request):
    """SVDD-PM (2 candidates a step) on video latents toward the mean pixel of the decoded
    video: NFE c (1 + M (T - 1)) = 2 (1 + 2 x 2) = 10 per sample with CFG (c = 2), M = 2, T = 3,
    a video [B, 3, F, H, W], and a reward no lower than the plain sampler's draws; with one
    candidate it is the plain sampler (eta 1, the same seeds)."""
    from rewardiff.guidance import guided_sample, make_method
    from rewardiff.rewards.base import RewardFn

    m = sd_model(request.getfixturevalue(folder))
    reward = RewardFn("mean-pixel", True, (-1.0, 1.0), "mean of the video", lambda x, p: x.flatten(1).mean(1))
    x, info = guided_sample(m, make_method("svdd-pm", reward, width=2), PROMPTS, [0, 1], 3, guidance_scale=2.0)
    base = m.generate(PROMPTS, [0, 1], num_inference_steps=3, guidance_scale=2.0, eta=1.0)
    assert info["nfe_per_sample"] == 2 * (1 + 2 * 2) and x.shape == base.shape and x.shape[:3] == (2, 3, m.frames)
    assert float(reward(x, PROMPTS).mean()) >= float(reward(base, PROMPTS).mean())
    one, _ = guided_sample(m, make_method("svdd-pm", reward, width=1), PROMPTS, [0, 1], 3, guidance_scale=2.0)
    assert torch.equal(one, base)
