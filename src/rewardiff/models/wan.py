"""Wan 2.1 text-to-video (``WanPipeline``) through diffusers as a :class:`DiffusionModel`.

Wan (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models", arXiv
2503.20314) is a flow-matching transformer (``WanTransformer3DModel``: 3-D patches of
1 x 2 x 2 latents, self-attention over all of them, cross-attention to the text) over the
latents of a causal 3-D VAE (``AutoencoderKLWan``) that compresses 4 frames into 1 after the
first (F pixel frames -> (F - 1) / 4 + 1 latent frames) and 8 x 8 pixels into one. The state is
z [B, 16, F_lat, h, w], the process the pipeline's ``FlowMatchEulerDiscreteScheduler`` config
(:meth:`FlowProcess.from_scheduler_config`, the Euler ODE at eta 0). Prompts go through UMT5
as ``WanPipeline`` encodes them: cleaned (``prompt_clean``), padded to 512 tokens, and the
states after each prompt's last token set to zero:

    cond = umt5(ids, mask).last_hidden_state * mask     [B, 512, D]

The unconditional condition is the empty prompt encoded the same way (the pipeline's
``negative_prompt=None``). Videos: vae.decode(z * std + mean) with the VAE's per-channel
``latents_mean`` and ``latents_std``, [B, 3, F, H, W] in [-1, 1], the whole video at once (the
VAE is causal in time), checkpointed when gradients flow.

The sizes of a sample come from the folder's ``rewardiff.json`` (``num_frames``, ``height``,
``width``; the pipeline's defaults 81, 480, 832 without it). Wan's released folders carry a
``UniPCMultistepScheduler``; the one rollout samples with the flow-matching Euler step, so such
a folder is refused with the shift to save it with instead. LoRA goes on the transformer's
self- and cross-attention projections and is written by ``WanPipeline.save_lora_weights``,
which plain ``WanPipeline.load_lora_weights`` reads.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rewardiff.errors import UserError
from rewardiff.models.base import DiffusionModel
from rewardiff.models.sd import TextConditionedDenoiser, pipeline_index
from rewardiff.models.video import SETTINGS, folder_settings
from rewardiff.processes.flow import FlowProcess

WAN_PIPELINE = "WanPipeline"
WAN_LENGTH = 512  # the pipeline's max_sequence_length: UMT5 tokens of every prompt
WAN_SIZES = {"num_frames": 81, "height": 480, "width": 832}  # the pipeline's defaults
# the layers Wan LoRA trainers adapt: every block's self- (attn1) and cross-attention (attn2) projections
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


class WanDenoiser(TextConditionedDenoiser):
    """``forward(z_t [B, 16, F, h, w], t [B] float N sigma, cond [B, L, D]) -> velocity``;
    ``encode(prompts) -> [B, L, D]`` (the module docstring's masked UMT5 states).

    Args:
        transformer: the ``WanTransformer3DModel`` (``.transformer``, where LoRA goes).
        text_encoder: the UMT5 encoder (``.text``, kept in eval mode).
        tokenizer: its tokenizer.
        length: the tokens of a prompt (the pipeline's ``max_sequence_length``).
    """

    backbone = "transformer"  # the diffusers model LoRA adapts (peft's add_adapter)
    lora_layers = LORA_TARGETS
    lora_pipeline = WAN_PIPELINE  # its save_lora_weights writes what load_lora_weights reads

    def __init__(self, transformer: nn.Module, text_encoder: nn.Module, tokenizer, length: int = WAN_LENGTH):
        super().__init__()
        self.transformer, self.text, self.tokenizer, self.length = transformer, text_encoder, tokenizer, int(length)

    def encode(self, prompts: list[str]) -> Tensor:
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = self.tokenizer([prompt_clean(p) for p in prompts], padding="max_length", max_length=self.length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
        device = next(self.text.parameters()).device
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)  # [B, L]; mask 1 on the prompt's tokens
        states = self.text(ids, mask).last_hidden_state  # [B, L, D]
        return states * mask[..., None].to(states.dtype)  # zeros after each prompt, as the pipeline pads

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond, return_dict=False)[0]


def wan_decoder(vae: nn.Module):
    """Latents z [B, 16, F_lat, h, w] -> videos [B, 3, F, H, W] in [-1, 1]: vae.decode(z * std + mean)
    through the frozen causal VAE, checkpointed when gradients flow."""
    vae.eval().requires_grad_(False)
    mean = torch.tensor(vae.config.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae.config.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)

    def run(z: Tensor) -> Tensor:
        return vae.decode(z * std.to(z) + mean.to(z)).sample

    def decode(z: Tensor) -> Tensor:
        return checkpoint(run, z, use_reentrant=False) if torch.is_grad_enabled() and z.requires_grad else run(z)

    return decode


def is_wan_pipeline(directory: str | Path) -> bool:
    """Whether a saved pipeline folder holds a ``WanPipeline`` (by ``model_index.json``)."""
    return str(pipeline_index(directory).get("_class_name", "")) == WAN_PIPELINE


def _wan_process(d: Path, config: dict) -> FlowProcess:
    """The flow process of the folder's scheduler, which must be the flow-matching Euler one."""
    kind = config.get("_class_name", "")
    if kind != "FlowMatchEulerDiscreteScheduler":
        shift = config.get("flow_shift", config.get("shift", "its shift"))
        raise UserError(f"{d}: the scheduler is {kind}; rewardiff samples Wan with the flow-matching Euler step: save the "
                        f"pipeline with scheduler=FlowMatchEulerDiscreteScheduler(shift={shift})")
    if config.get("use_dynamic_shifting"):
        raise UserError(f"{d}: WanPipeline gives its scheduler no mu; use a fixed shift (use_dynamic_shifting false)")
    try:
        return FlowProcess.from_scheduler_config(config)
    except ValueError as e:  # a schedule option the flow process does not implement
        raise UserError(f"{d}: {e}") from None


def wan_model(path: str | Path) -> DiffusionModel:
    """A diffusers ``WanPipeline`` folder (Wan 2.1 text-to-video) as a DiffusionModel of video
    latents (shape (16, F_lat, h, w); ``decode`` gives [B, 3, F, H, W]); no network access."""
    from diffusers import WanPipeline

    d = Path(path)
    sizes = folder_settings(d, WAN_SIZES)
    try:
        pipe = WanPipeline.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the Wan pipeline in {d}: {str(e).splitlines()[0][:200]}") from None
    if pipe.transformer is None or pipe.transformer_2 is not None or pipe.config.get("expand_timesteps"):
        raise UserError(f"{d}: only Wan 2.1 text-to-video (one transformer, no transformer_2 or expand_timesteps) is supported")
    tf, vae = pipe.transformer, pipe.vae
    _, ph, pw = tf.config.patch_size
    ts, ss = int(vae.config.scale_factor_temporal), int(vae.config.scale_factor_spatial)
    frames, height, width = sizes["num_frames"], sizes["height"], sizes["width"]
    if (frames - 1) % ts or height % (ss * ph) or width % (ss * pw):
        raise UserError(f"{d / 'rewardiff.json'}: num_frames - 1 must be a multiple of {ts}, height of {ss * ph} and "
                        f"width of {ss * pw}; got {frames}, {height}, {width}")
    net = WanDenoiser(tf, pipe.text_encoder, pipe.tokenizer)
    net.requires_grad_(False)
    net.eval()
    shape = (int(tf.config.in_channels), (frames - 1) // ts + 1, height // ss, width // ss)
    model = DiffusionModel(net, _wan_process(d, dict(pipe.scheduler.config)), net.encode, shape, wan_decoder(vae),
                           name=f"diffusers:{d.name}")
    model.image_size = (height, width)  # type: ignore[attr-defined]
    model.frames = frames  # type: ignore[attr-defined]
    return model


def tiny_wan_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32, frames: int = 9, shift: float = 3.0) -> Path:
    """Build and save a tiny random ``WanPipeline`` offline (tests and benchmarks).

    A two-block Wan transformer of width 16 (two heads of 8, patches 1 x 2 x 2, RMS-normalised
    queries and keys across heads), a causal 3-D AutoencoderKLWan of base width 8 with the
    real one's compression (4 frames and 8 x 8 pixels to one latent of 16 channels), a one-layer
    UMT5 encoder of width 32 with the character-level tokenizer of
    :func:`~rewardiff.models.sd3.t5_tokenizer`, and the flow-matching Euler scheduler with
    ``shift`` (Wan 2.1's 3.0 by default). ``frames`` (4k + 1) and ``resolution`` go to
    ``rewardiff.json``.
    """
    import json

    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from rewardiff.io import atomic_write_text
    from rewardiff.models.sd3 import t5_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=8, in_channels=16, out_channels=16, text_dim=32,
        freq_dim=32, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(base_dim=8, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True])
    text = UMT5EncoderModel(UMT5Config(vocab_size=128, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                       relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    pipe = WanPipeline(tokenizer=t5_tokenizer(WAN_LENGTH), text_encoder=text, vae=vae, transformer=transformer,
                       scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift))
    pipe.save_pretrained(str(d))
    sizes = {"num_frames": int(frames), "height": int(resolution), "width": int(resolution)}
    atomic_write_text(d / SETTINGS, json.dumps(sizes) + "\n")
    return d
