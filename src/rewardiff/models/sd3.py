"""Stable Diffusion 3 and 3.5 through diffusers as a :class:`DiffusionModel`.

The MMDiT (``SD3Transformer2DModel``) predicts the rectified-flow velocity of 16-channel VAE
latents at the float timestep N sigma; the process is the pipeline's
``FlowMatchEulerDiscreteScheduler`` config read by :meth:`FlowProcess.from_scheduler_config`
(the Euler ODE at eta 0, as the pipeline samples). Prompts go through the two projected CLIP
text encoders and, when the folder has one, the T5 encoder (Esser et al. 2024, "Scaling
Rectified Flow Transformers", arXiv 2403.03206, section 5.1.2), as ``StableDiffusion3Pipeline``
encodes them:

    hidden = [pad(clip_1 (+) clip_2, D_T5) ; t5]   [B, L_clip + L_T5, D_T5]
    pooled = pooled_1 (+) pooled_2                  [B, P_1 + P_2]

where clip_i is the penultimate hidden state of CLIP encoder i, (+) joins feature
dimensions, ``pad`` zero-fills the features up to the T5 width and ``;`` joins the token
sequences. Without a T5 encoder its part is zeros [B, L_T5, D_joint], as the pipeline fills it.
The unconditional condition is the empty prompt encoded the same way (the pipeline's
``negative_prompt=None``: no zeros, unlike SDXL). Latents: z = (vae.encode(x) - shift) * scale;
images: vae.decode(z / scale + shift).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.models.base import DiffusionModel
from rewardiff.models.sd import TextConditionedDenoiser
from rewardiff.processes.flow import FlowProcess

# the layers diffusers' SD3 LoRA training adapts: the joint attention's image (to_*) and
# text (add_*) projections of every block
LORA_TARGETS = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
                "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out"]
T5_LENGTH = 256  # the pipeline's default max_sequence_length: T5 tokens of every prompt


class SD3Denoiser(TextConditionedDenoiser):
    """``forward(z_t [B, C, h, w], t [B] float N sigma, cond) -> velocity [B, C, h, w]``;
    ``encode(prompts) -> {"hidden": [B, L, D], "pooled": [B, P]}`` (the module docstring's sums).

    Args:
        transformer: the ``SD3Transformer2DModel`` (``.transformer``, where LoRA goes).
        clip_encoders: the two ``CLIPTextModelWithProjection`` (``.text``).
        clip_tokenizers: their tokenizers; both pad to the first one's ``model_max_length``,
            as the pipeline pads them.
        t5: the T5 encoder, or None (its part of ``hidden`` is zeros).
        t5_tokenizer: its tokenizer (None with no T5).
        t5_length: the T5 tokens of a prompt (the pipeline's ``max_sequence_length``).
    """

    backbone = "transformer"  # the diffusers model LoRA adapts (peft's add_adapter)
    lora_layers = LORA_TARGETS
    lora_pipeline = "StableDiffusion3Pipeline"  # its save_lora_weights writes what load_lora_weights reads

    def __init__(self, transformer: nn.Module, clip_encoders: list[nn.Module], clip_tokenizers: list,
                 t5: nn.Module | None = None, t5_tokenizer=None, t5_length: int = T5_LENGTH):
        super().__init__()
        self.transformer, self.text, self.tokenizers = transformer, nn.ModuleList(clip_encoders), list(clip_tokenizers)
        self.t5, self.t5_tokenizer, self.t5_length = t5, t5_tokenizer, int(t5_length)
        self.joint_dim = int(transformer.config.joint_attention_dim)

    def _ids(self, tokenizer, prompts: list[str], length: int, device) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids.to(device)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts, states, pooled = list(prompts), [], []
        length = self.tokenizers[0].model_max_length
        for tokenizer, encoder in zip(self.tokenizers, self.text):
            out = encoder(self._ids(tokenizer, prompts, length, next(encoder.parameters()).device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # the penultimate layer [B, L_clip, D_i]
            pooled.append(out.text_embeds)  # the projected pooled embedding [B, P_i]
        clip = torch.cat(states, dim=-1)  # [B, L_clip, D_1 + D_2]
        t5 = self._t5(prompts, clip)  # [B, L_T5, D_T5]
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero features up to the T5 width
        return {"hidden": torch.cat([clip, t5], dim=1), "pooled": torch.cat(pooled, dim=-1)}

    def _t5(self, prompts: list[str], like: Tensor) -> Tensor:
        if self.t5 is None:
            return like.new_zeros(len(prompts), self.t5_length, self.joint_dim)
        ids = self._ids(self.t5_tokenizer, prompts, self.t5_length, next(self.t5.parameters()).device)
        return self.t5(ids)[0]

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        return self.transformer(hidden_states=x_t, timestep=t, encoder_hidden_states=cond["hidden"],
                                pooled_projections=cond["pooled"], return_dict=False)[0]


def is_sd3_pipeline(directory: str | Path) -> bool:
    """Whether a saved pipeline folder holds Stable Diffusion 3 (by ``model_index.json``)."""
    from rewardiff.models.sd import pipeline_index

    return str(pipeline_index(directory).get("_class_name", "")).startswith("StableDiffusion3")


def time_shift_mu(seq_len: int, config: dict) -> float:
    """FLUX's resolution-dependent time shift mu for ``seq_len`` image tokens: the line through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift), as the pipeline
    computes it when the scheduler shifts dynamically."""
    n0, n1 = int(config.get("base_image_seq_len", 256)), int(config.get("max_image_seq_len", 4096))
    m0, m1 = float(config.get("base_shift", 0.5)), float(config.get("max_shift", 1.16))
    return m0 + (m1 - m0) * (seq_len - n0) / (n1 - n0)


def sd3_model(path: str | Path) -> DiffusionModel:
    """A diffusers ``StableDiffusion3Pipeline`` folder as a DiffusionModel (no network access)."""
    from diffusers import StableDiffusion3Pipeline

    from rewardiff.models.sd import pipeline_index, vae_decoder, vae_encoder

    d = Path(path)
    index = pipeline_index(d)
    # a folder saved without T5 names it null, which from_pretrained loads only when told
    absent = {k: None for k in ("text_encoder_3", "tokenizer_3") if not (index.get(k) or [None])[0]}
    pipe = StableDiffusion3Pipeline.from_pretrained(str(d), local_files_only=True, **absent)
    tf = pipe.transformer
    if pipe.text_encoder is None or pipe.text_encoder_2 is None:
        raise UserError(f"{d}: an SD3 pipeline needs both CLIP text encoders (text_encoder, text_encoder_2)")
    pooled = sum(int(e.config.projection_dim) for e in (pipe.text_encoder, pipe.text_encoder_2))
    if pooled != int(tf.config.pooled_projection_dim):
        raise UserError(f"{d}: the transformer takes {tf.config.pooled_projection_dim} pooled features; "
                        f"the CLIP encoders give {pooled}")
    if getattr(pipe.vae.config, "latents_mean", None) is not None:
        raise UserError(f"{d}: VAEs with latents_mean/latents_std are not supported")
    net = SD3Denoiser(tf, [pipe.text_encoder, pipe.text_encoder_2], [pipe.tokenizer, pipe.tokenizer_2],
                      pipe.text_encoder_3, pipe.tokenizer_3)
    net.requires_grad_(False)
    net.eval()
    size, patch = int(tf.config.sample_size), int(tf.config.patch_size)
    config = dict(pipe.scheduler.config)
    mu = time_shift_mu((size // patch) ** 2, config) if config.get("use_dynamic_shifting") else None
    try:
        process = FlowProcess.from_scheduler_config(config, mu=mu)
    except ValueError as e:  # a schedule option the flow process does not implement
        raise UserError(f"{d}: {e}") from None
    shape = (int(tf.config.in_channels), size, size)
    model = DiffusionModel(net, process, net.encode, shape, vae_decoder(pipe.vae), name=f"diffusers:{d.name}")
    model.image_size = size * pipe.vae_scale_factor  # type: ignore[attr-defined]
    model.encode_images = vae_encoder(pipe.vae)  # type: ignore[attr-defined]
    return model


def t5_tokenizer(max_length: int = T5_LENGTH):
    """A character-level T5 tokenizer built offline (a ``tokenizers`` Unigram model over the
    printable ASCII characters and the word-start mark, with T5's pad, end and unknown tokens
    first and no sentinel tokens)."""
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [(c, -math.log(len(chars))) for c in chars]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=max_length)


def tiny_sd3_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32, t5: bool = True) -> Path:
    """Build and save a tiny random Stable Diffusion 3.5 pipeline offline (tests and benchmarks).

    A two-block MMDiT of width 16 (patch 2, the first block with SD3.5's second image
    attention, RMS-normalised queries and keys), a two-level AutoencoderKL with 16 latent
    channels and SD3's shift and scale (latents at half the resolution), two projected CLIP
    text models of widths 16 and 24 (pooled 8 + 8) with the character-level tokenizers of
    :func:`~rewardiff.models.sd.byte_tokenizer` (40-wide token states, zero-padded to the
    T5 width), and (``t5``) a one-layer T5 encoder of width 48 with the character-level
    tokenizer of :func:`t5_tokenizer`, or none; the flow-matching Euler scheduler with SD3's
    shift 3. About 26,000 transformer parameters (95,000 with the text encoders, mostly
    their token embeddings).
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from rewardiff.models.sd import byte_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    widths, pooled, joint = (16, 24), 8, 48
    transformer = SD3Transformer2DModel(
        sample_size=resolution // 2, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=joint, caption_projection_dim=16, pooled_projection_dim=2 * pooled,
        pos_embed_max_size=resolution // 4, dual_attention_layers=(0,), qk_norm="rms_norm",
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=resolution, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
    )
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=1000, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=32, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=pooled)) for w in widths]
    encoder_3, tokenizer_3 = None, None
    if t5:
        encoder_3 = T5EncoderModel(T5Config(vocab_size=128, d_model=joint, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                            relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1))
        tokenizer_3 = t5_tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0), vae=vae,
        text_encoder=clips[0], tokenizer=byte_tokenizer(d, 32), text_encoder_2=clips[1], tokenizer_2=byte_tokenizer(d, 32),
        text_encoder_3=encoder_3, tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(str(d))
    return d
