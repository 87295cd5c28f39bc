"""FLUX.1 through diffusers as a :class:`DiffusionModel` (``FluxPipeline``: FLUX.1-dev, guidance-distilled,
and FLUX.1-schnell, without the guidance input).

The model's state is the VAE latent z [B, 16, h, w], as for SD3, so the flow process's math is
unchanged; the net packs it into the transformer's tokens and unpacks the velocity:

    pack(z)[b, i (w/2) + j, c 4 + p 2 + q] = z[b, c, 2i + p, 2j + q]     [B, (h/2)(w/2), 4 C]

Each token has the position id (0, i, j), each text token (0, 0, 0) (the rotary embedding's
three axes). The transformer takes the noise level sigma = t / N (the pipeline's
``timestep / 1000``) and, when it embeds guidance (``guidance_embeds``, FLUX.1-dev), the
distilled guidance value g (default 3.5, the pipeline's ``guidance_scale``), a setting of the net:
one transformer call a step, so classifier-free guidance stays at 1 (a scale above 1 is the
pipeline's ``true_cfg_scale`` with the empty negative prompt, at two calls a step). Prompts
(Black Forest Labs 2024, FLUX.1; the text encoding of ``FluxPipeline.encode_prompt``):

    hidden = t5(prompt)                  [B, L_T5, D_T5]   (the last hidden states)
    pooled = clip(prompt).pooler_output  [B, D_clip]       (CLIP-L's pooled state, not projected)

The process is ``FlowProcess`` with the pipeline's grid (``sigma_grid="flux"``: sigmas evenly
spaced from 1 to 1/n, then the scheduler's shift, with FLUX.1-dev's dynamic shift mu of the
(h/2)(w/2) image tokens). Latents: z = (vae.encode(x) - shift) * scale; images:
vae.decode(z / scale + shift).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.models.base import DiffusionModel
from rewardiff.models.sd import TextConditionedDenoiser
from rewardiff.processes.flow import FlowProcess

# the layers diffusers' FLUX LoRA training (examples/dreambooth/train_dreambooth_lora_flux.py)
# adapts: the double-stream blocks' image (to_*) and text (add_*) attention projections and
# both feed-forwards; "attn.to_q/k/v" also name the single-stream blocks' attention projections
LORA_TARGETS = ["attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
                "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
                "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2"]
T5_LENGTH = 512  # the pipeline's default max_sequence_length (its largest)
GUIDANCE = 3.5  # the pipeline's default guidance_scale: the distilled guidance FLUX.1-dev embeds


def pack(z: Tensor) -> Tensor:
    """Latents [B, C, h, w] -> 2 x 2 patches as tokens [B, (h/2)(w/2), 4 C] (the module docstring's map)."""
    B, C, h, w = z.shape
    assert h % 2 == 0 and w % 2 == 0, f"latents {h} x {w} do not split into 2 x 2 patches"
    patches = z.reshape(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # [B, h/2, w/2, C, 2, 2]
    return patches.reshape(B, (h // 2) * (w // 2), 4 * C)


def unpack(tokens: Tensor, h: int, w: int) -> Tensor:
    """The inverse of :func:`pack`: tokens [B, (h/2)(w/2), 4 C] -> latents [B, C, h, w]."""
    B, n, D = tokens.shape
    assert n == (h // 2) * (w // 2) and D % 4 == 0, f"{n} tokens of {D} features are not {h} x {w} latents"
    patches = tokens.reshape(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # [B, C, h/2, 2, w/2, 2]
    return patches.reshape(B, D // 4, h, w)


def image_ids(h: int, w: int, like: Tensor) -> Tensor:
    """The position ids (0, i, j) of the (h/2)(w/2) packed tokens, row by row [(h/2)(w/2), 3]."""
    i, j = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    return torch.stack([torch.zeros_like(i), i, j], dim=-1).reshape(-1, 3).to(like)


class FluxDenoiser(TextConditionedDenoiser):
    """``forward(z_t [B, C, h, w], t [B] float N sigma, cond) -> velocity [B, C, h, w]``;
    ``encode(prompts) -> {"hidden": [B, L_T5, D_T5], "pooled": [B, D_clip]}``.

    Args:
        transformer: the ``FluxTransformer2DModel`` (``.transformer``, where LoRA goes).
        clip: the ``CLIPTextModel`` (``.text``), and its tokenizer (padded to its ``model_max_length``).
        t5: the ``T5EncoderModel`` (``.t5``), and its tokenizer.
        t5_length: the T5 tokens of a prompt (the pipeline's ``max_sequence_length``).
        guidance: the distilled guidance value g the transformer embeds; None when it has no
            guidance input (FLUX.1-schnell).
        num_train_timesteps: N; the transformer takes sigma = t / N.
    """

    backbone = "transformer"  # the diffusers model LoRA adapts (peft's add_adapter)
    lora_layers = LORA_TARGETS
    lora_pipeline = "FluxPipeline"  # its save_lora_weights writes what load_lora_weights reads

    def __init__(self, transformer: nn.Module, clip: nn.Module, clip_tokenizer, t5: nn.Module, t5_tokenizer,
                 t5_length: int = T5_LENGTH, guidance: float | None = GUIDANCE, num_train_timesteps: int = 1000):
        super().__init__()
        self.transformer, self.text, self.tokenizer = transformer, clip, clip_tokenizer
        self.t5, self.t5_tokenizer = t5, t5_tokenizer
        self.t5_length, self.num_train_timesteps = int(t5_length), int(num_train_timesteps)
        self.guidance = None if guidance is None else float(guidance)

    @staticmethod
    def _ids(tokenizer, prompts: list[str], length: int, encoder: nn.Module) -> Tensor:
        ids = tokenizer(prompts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
        return ids.to(next(encoder.parameters()).device)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        pooled = self.text(self._ids(self.tokenizer, prompts, self.tokenizer.model_max_length, self.text)).pooler_output
        hidden = self.t5(self._ids(self.t5_tokenizer, prompts, self.t5_length, self.t5))[0]  # [B, L_T5, D_T5]
        return {"hidden": hidden, "pooled": pooled}

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        B, _, h, w = x_t.shape
        hidden = cond["hidden"]
        guidance = None if self.guidance is None else torch.full((B,), self.guidance, device=x_t.device)
        out = self.transformer(
            hidden_states=pack(x_t), timestep=t.to(x_t) / self.num_train_timesteps, guidance=guidance,
            pooled_projections=cond["pooled"], encoder_hidden_states=hidden,
            txt_ids=hidden.new_zeros(hidden.shape[1], 3), img_ids=image_ids(h, w, x_t), return_dict=False,
        )[0]
        return unpack(out, h, w)


def is_flux_pipeline(directory: str | Path) -> bool:
    """Whether a saved pipeline folder holds FLUX.1 (``FluxPipeline``, by ``model_index.json``)."""
    from rewardiff.models.sd import pipeline_index

    return str(pipeline_index(directory).get("_class_name", "")) == "FluxPipeline"


def _check(pipe, d: Path) -> None:
    """Refuse a FLUX folder whose parts do not fit together."""
    tf, clip, t5 = pipe.transformer, pipe.text_encoder, pipe.text_encoder_2
    if clip is None or t5 is None:
        raise UserError(f"{d}: a FLUX pipeline needs its CLIP (text_encoder) and T5 (text_encoder_2) encoders")
    if int(clip.config.hidden_size) != int(tf.config.pooled_projection_dim):
        raise UserError(f"{d}: the transformer takes {tf.config.pooled_projection_dim} pooled features; "
                        f"CLIP gives {clip.config.hidden_size}")
    if int(t5.config.d_model) != int(tf.config.joint_attention_dim):
        raise UserError(f"{d}: the transformer takes {tf.config.joint_attention_dim}-wide text states; "
                        f"T5 gives {t5.config.d_model}")
    if int(tf.config.in_channels) != 4 * int(pipe.vae.config.latent_channels) or int(tf.config.patch_size) != 1:
        raise UserError(f"{d}: the transformer does not take 2 x 2 patches of the VAE's "
                        f"{pipe.vae.config.latent_channels} latent channels")
    if getattr(pipe.vae.config, "latents_mean", None) is not None:
        raise UserError(f"{d}: VAEs with latents_mean/latents_std are not supported")


def flux_model(path: str | Path, guidance: float = GUIDANCE, image_size: int | None = None,
               t5_length: int | None = None) -> DiffusionModel:
    """A diffusers ``FluxPipeline`` folder as a DiffusionModel (no network access).

    Args:
        path: the folder ``save_pretrained`` wrote.
        guidance: the distilled guidance value, used when the transformer embeds guidance.
        image_size: the side of the images in pixels; by default the VAE's ``sample_size``
            (1024 for FLUX.1), a multiple of twice the VAE's downscaling.
        t5_length: the T5 tokens of a prompt; by default 512 (the pipeline's), or the T5
            tokenizer's ``model_max_length`` when that is shorter.
    """
    from diffusers import FluxPipeline

    from rewardiff.models.sd import vae_decoder
    from rewardiff.models.sd3 import time_shift_mu

    d = Path(path)
    pipe = FluxPipeline.from_pretrained(str(d), local_files_only=True)
    _check(pipe, d)
    tf, down = pipe.transformer, int(pipe.vae_scale_factor)
    size = int(image_size or pipe.vae.config.sample_size)
    if size % (2 * down):
        raise UserError(f"{d}: images of {size} pixels do not make 2 x 2 patches of latents ({2 * down} pixels each)")
    side = size // down
    config = dict(pipe.scheduler.config)
    mu = time_shift_mu((side // 2) ** 2, config) if config.get("use_dynamic_shifting") else None
    try:
        process = FlowProcess.from_scheduler_config(config, mu=mu, sigma_grid="flux")
    except ValueError as e:  # a schedule option the flow process does not implement
        raise UserError(f"{d}: {e}") from None
    length = t5_length or min(T5_LENGTH, int(pipe.tokenizer_2.model_max_length))
    net = FluxDenoiser(tf, pipe.text_encoder, pipe.tokenizer, pipe.text_encoder_2, pipe.tokenizer_2, length,
                       guidance if tf.config.guidance_embeds else None, process.num_train_timesteps)
    net.requires_grad_(False)
    net.eval()
    shape = (int(pipe.vae.config.latent_channels), side, side)
    model = DiffusionModel(net, process, net.encode, shape, vae_decoder(pipe.vae), name=f"diffusers:{d.name}")
    model.image_size = size  # type: ignore[attr-defined]
    return model


def tiny_flux_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32, guidance_embeds: bool = True) -> Path:
    """Build and save a tiny random FLUX.1 pipeline offline (tests and benchmarks).

    A FluxTransformer2DModel of width 16 (two heads of 8, rotary axes 2 + 2 + 4) with one
    double-stream and one single-stream block, taking 2 x 2 patches of a two-level AutoencoderKL
    with 16 latent channels and FLUX's shift and scale (latents at half the resolution, whose
    ``sample_size`` is the image size); a CLIP text model of width 16 (its pooled state the
    pooled input) with the character-level tokenizer of :func:`~rewardiff.models.sd.byte_tokenizer`,
    and a one-layer T5 encoder of width 48 with the character-level tokenizer of
    :func:`~rewardiff.models.sd3.t5_tokenizer`, 32 tokens long. ``guidance_embeds``: FLUX.1-dev's
    guidance input and scheduler (shift dynamically); without, FLUX.1-schnell's (no guidance
    input, no shift). About 27,000 transformer parameters (22,000 without the guidance input).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from rewardiff.models.sd import byte_tokenizer
    from rewardiff.models.sd3 import t5_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    clip_width, joint = 16, 48
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=joint, pooled_projection_dim=clip_width, guidance_embeds=guidance_embeds, axes_dims_rope=(2, 2, 4),
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=resolution, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    )
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=1000, hidden_size=clip_width, intermediate_size=2 * clip_width, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    t5 = T5EncoderModel(T5Config(vocab_size=128, d_model=joint, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                 relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
    shift = dict(shift=3.0, use_dynamic_shifting=True) if guidance_embeds else dict(shift=1.0, use_dynamic_shifting=False)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096, **shift)
    pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=clip,
                        tokenizer=byte_tokenizer(d, 32), text_encoder_2=t5, tokenizer_2=t5_tokenizer(32))
    pipe.save_pretrained(str(d))
    return d
