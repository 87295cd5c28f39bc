"""Stable Diffusion (and any diffusers text-to-image pipeline with a UNet2DConditionModel,
a VAE and a CLIP text encoder) and Stable Diffusion XL as a :class:`DiffusionModel`.

The UNet denoises latents; prompts go through the pipeline's tokenizer and text encoder
(SDXL: both text encoders, plus its size micro-conditioning, in a dict condition);
``decode`` runs the VAE (checkpointed when gradients flow, so reward backpropagation through
the decoder costs recomputation, not memory). The process is built from the pipeline's
scheduler config, so sampling through the one rollout loop matches the pipeline's own DDIM
sampler. ``model: diffusers:PATH`` in a fine-tuning config, or ``--model diffusers:PATH``,
loads a pipeline folder saved with ``save_pretrained`` (offline); a ``StableDiffusionXLPipeline``
folder is recognised by its ``model_index.json``, and so are a ``StableDiffusion3Pipeline``
folder, which :mod:`rewardiff.models.sd3` loads, a ``FluxPipeline`` folder, which
:mod:`rewardiff.models.flux` loads, a ``TextToVideoSDPipeline`` folder, which
:mod:`rewardiff.models.video` loads, a ``WanPipeline`` folder, which
:mod:`rewardiff.models.wan` loads, and a ``StableDiffusionUpscalePipeline`` folder (the x4
upscaler, its low-res image carried by the prompt), which :mod:`rewardiff.models.upscale` loads.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rewardiff.errors import UserError
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import SPACINGS, GaussianProcess, make_betas, rescale_zero_terminal_snr


class TextConditionedDenoiser(nn.Module):
    """A diffusers backbone and the text encoders it reads prompts through (``.text``, and
    ``.t5`` where there is one): train mode reaches the backbone only. The encoders stay in eval
    mode, so that a dropout of theirs (T5's is 0.1 in its config) never draws from the global
    random state: a prompt encodes the same during training as at sampling, and a resumed run
    continues bit for bit. Gradients still reach them when they are trained (``lora_rank: 0``)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for name in ("text", "t5"):
            encoder = getattr(self, name, None)
            if encoder is not None:
                encoder.eval()
        return self


class SDDenoiser(TextConditionedDenoiser):
    """``forward(z_t [B,C,h,w], t [B], cond [B,L,D]) -> prediction``; ``encode(prompts)`` -> cond.

    Holds the UNet (``.unet``, where LoRA goes) and the text encoder (``.text``); the VAE is
    kept outside the module so that fine-tuning never touches it.
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__()
        self.unet, self.text, self.tokenizer = unet, text_encoder, tokenizer

    def encode(self, prompts: list[str]) -> Tensor:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        return self.text(ids.to(next(self.text.parameters()).device))[0]

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        return self.unet(x_t, t, encoder_hidden_states=cond).sample


class SDXLDenoiser(TextConditionedDenoiser):
    """Stable Diffusion XL's UNet with its two text encoders.

    ``encode(prompts)`` -> ``{"hidden": [B, L, D1 + D2], "pooled": [B, P], "time_ids": [B, 6]}``:
    the penultimate hidden states of the text encoders side by side, the last encoder's
    projected pooled embedding, and the size micro-conditioning (original height and width,
    crop top and left, target height and width). ``forward(z_t [B,C,h,w], t [B], cond)``.

    Args:
        unet: a UNet with ``addition_embed_type="text_time"`` (``.unet``, where LoRA goes).
        text_encoders: the CLIP text encoders in order (``.text``); the last one is projected.
        tokenizers: one per text encoder.
        image_size: (height, width) of the images; original and target size, crop at (0, 0).
        zeros_for_empty: the empty prompt encodes to zeros (the pipeline's
            ``force_zeros_for_empty_prompt``: its unconditional embedding when no negative
            prompt is given). The empty prompt is then zeros also as a conditional prompt.
    """

    def __init__(self, unet: nn.Module, text_encoders: list[nn.Module], tokenizers: list, image_size: tuple[int, int],
                 zeros_for_empty: bool = True):
        super().__init__()
        self.unet, self.text, self.tokenizers = unet, nn.ModuleList(text_encoders), list(tokenizers)
        h, w = image_size
        self.register_buffer("time_ids", torch.tensor([h, w, 0, 0, h, w], dtype=torch.float32), persistent=False)
        self.zeros_for_empty = zeros_for_empty

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts, states = list(prompts), []
        for tokenizer, encoder in zip(self.tokenizers, self.text):
            ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            out = encoder(ids.to(next(encoder.parameters()).device), output_hidden_states=True)
            states.append(out.hidden_states[-2])  # the penultimate layer, [B, L, D_i]
        hidden, pooled = torch.cat(states, dim=-1), out.text_embeds  # [B, L, D1 + D2]; the last encoder's [B, P]
        if self.zeros_for_empty:
            empty = torch.tensor([p == "" for p in prompts], device=hidden.device)
            hidden, pooled = hidden.masked_fill(empty[:, None, None], 0.0), pooled.masked_fill(empty[:, None], 0.0)
        time_ids = self.time_ids.to(hidden).repeat(len(prompts), 1)  # [B, 6]
        return {"hidden": hidden, "pooled": pooled, "time_ids": time_ids}

    def forward(self, x_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        added = {"text_embeds": cond["pooled"], "time_ids": cond["time_ids"]}
        return self.unet(x_t, t, encoder_hidden_states=cond["hidden"], added_cond_kwargs=added).sample


def process_from_scheduler(config: dict) -> GaussianProcess:
    """The Gaussian process a diffusers scheduler config describes (betas, prediction type,
    zero-terminal-SNR rescaling, ``set_alpha_to_one``, and where its timesteps fall:
    ``timestep_spacing``, diffusers' default ``leading``, with ``steps_offset``)."""
    kind = config.get("beta_schedule", "linear")
    kinds = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    if kind not in kinds:
        raise UserError(f"scheduler beta_schedule {kind!r} is not supported; supported: {', '.join(kinds)}")
    spacing = config.get("timestep_spacing", "leading")
    if spacing not in SPACINGS:  # linspace: DDIM's step to t - N // n misses the next timestep
        raise UserError(f"scheduler timestep_spacing {spacing!r} is not supported; supported: {', '.join(SPACINGS)}")
    n = int(config.get("num_train_timesteps", 1000))
    betas = make_betas(kinds[kind], n, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return GaussianProcess(betas, config.get("prediction_type", "epsilon"), bool(config.get("set_alpha_to_one", True)),
                           spacing, int(config.get("steps_offset", 0) or 0))


def sd_model(path: str | Path) -> DiffusionModel:
    """A diffusers Stable Diffusion, Stable Diffusion XL, Stable Diffusion 3, FLUX.1 or
    text-to-video pipeline folder as a DiffusionModel (no network access; SD3:
    :func:`rewardiff.models.sd3.sd3_model`, FLUX: :func:`rewardiff.models.flux.flux_model`,
    ``TextToVideoSDPipeline``: :func:`rewardiff.models.video.video_model`, ``WanPipeline``:
    :func:`rewardiff.models.wan.wan_model`, ``StableDiffusionUpscalePipeline``:
    :func:`rewardiff.models.upscale.upscale_model`)."""
    from rewardiff.models.flux import flux_model, is_flux_pipeline
    from rewardiff.models.sd3 import is_sd3_pipeline, sd3_model
    from rewardiff.models.upscale import is_upscale_pipeline, upscale_model
    from rewardiff.models.video import is_video_pipeline, video_model
    from rewardiff.models.wan import is_wan_pipeline, wan_model

    d = Path(path)
    if not (d / "model_index.json").is_file():
        raise UserError(f"no diffusers pipeline in {d} (model_index.json missing); save one with pipeline.save_pretrained(DIR)")
    if is_sd3_pipeline(d):
        return sd3_model(d)
    if is_flux_pipeline(d):
        return flux_model(d)
    if is_video_pipeline(d):
        return video_model(d)
    if is_wan_pipeline(d):
        return wan_model(d)
    if is_upscale_pipeline(d):
        return upscale_model(d)
    if is_xl_pipeline(d):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(str(d), local_files_only=True)
        net: nn.Module = _xl_denoiser(pipe, d)
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(str(d), local_files_only=True, safety_checker=None,
                                                       requires_safety_checker=False)
        net = SDDenoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    net.requires_grad_(False)
    net.eval()
    size = int(pipe.unet.config.sample_size)
    shape = (int(pipe.unet.config.in_channels), size, size)
    model = DiffusionModel(net, process_from_scheduler(dict(pipe.scheduler.config)), net.encode, shape,
                           vae_decoder(pipe.vae), name=f"diffusers:{d.name}")
    model.image_size = size * pipe.vae_scale_factor  # type: ignore[attr-defined]
    model.encode_images = vae_encoder(pipe.vae)  # type: ignore[attr-defined]
    return model


def pipeline_index(directory: str | Path) -> dict:
    """A saved pipeline folder's ``model_index.json``: its class and components."""
    path = Path(directory) / "model_index.json"
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(index, dict):
        raise UserError(f"cannot read {path}: not a JSON object")
    return index


def is_xl_pipeline(directory: str | Path) -> bool:
    """Whether a saved pipeline folder holds Stable Diffusion XL (by ``model_index.json``)."""
    index = pipeline_index(directory)
    name = str(index.get("_class_name", ""))
    others = ("StableDiffusion3", "Flux")  # pipelines with a second text encoder that are not SDXL
    return name.startswith("StableDiffusionXL") or ("text_encoder_2" in index and not name.startswith(others))


def _xl_denoiser(pipe, d: Path) -> SDXLDenoiser:
    """The SDXL denoiser of a loaded pipeline, after checking what it cannot handle."""
    unet = pipe.unet
    if unet.config.addition_embed_type != "text_time" or pipe.text_encoder_2 is None:
        raise UserError(f"{d} is not a text-to-image SDXL pipeline (needs text_encoder_2 and a 'text_time' UNet)")
    wanted = unet.add_embedding.linear_1.in_features  # 6 time ids embedded, then the pooled text
    given = 6 * int(unet.config.addition_time_embed_dim) + int(pipe.text_encoder_2.config.projection_dim)
    if wanted != given:
        raise UserError(f"{d}: the UNet's added embedding takes {wanted} inputs but 6 time ids and the pooled text give {given}")
    if getattr(pipe.vae.config, "latents_mean", None) is not None:
        raise UserError(f"{d}: VAEs with latents_mean/latents_std are not supported")
    pairs = [(e, t) for e, t in ((pipe.text_encoder, pipe.tokenizer), (pipe.text_encoder_2, pipe.tokenizer_2)) if e is not None]
    if len({t.model_max_length for _, t in pairs}) != 1:
        raise UserError(f"{d}: the two tokenizers pad to different lengths; their token states cannot be joined")
    side = int(unet.config.sample_size) * pipe.vae_scale_factor
    return SDXLDenoiser(unet, [e for e, _ in pairs], [t for _, t in pairs], (side, side),
                        bool(pipe.config.get("force_zeros_for_empty_prompt", True)))


def vae_decoder(vae: nn.Module):
    """latents z -> images in [-1, 1], vae.decode(z / scale + shift) through the frozen VAE
    (``scaling_factor``; ``shift_factor``, SD3's, else none), checkpointed when gradients flow."""
    vae.eval().requires_grad_(False)
    scale, shift = float(vae.config.scaling_factor), getattr(vae.config, "shift_factor", None)

    def run(z: Tensor) -> Tensor:
        return vae.decode(z / scale if shift is None else z / scale + float(shift)).sample

    def decode(z: Tensor) -> Tensor:
        return checkpoint(run, z, use_reentrant=False) if torch.is_grad_enabled() and z.requires_grad else run(z)

    return decode


def vae_encoder(vae: nn.Module):
    """images in [-1, 1] -> latents z = (mean of vae.encode(x) - shift) * scale, the inverse of
    :func:`vae_decoder`, differentiable (score distillation pushes its gradient through it)."""
    vae.eval().requires_grad_(False)
    scale, shift = float(vae.config.scaling_factor), getattr(vae.config, "shift_factor", None)

    def encode(x: Tensor) -> Tensor:
        mean = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist.mean
        return mean * scale if shift is None else (mean - float(shift)) * scale

    return encode


def _byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE tokenizers (CLIP's) use for the bytes: printable ones as
    themselves, the rest shifted past 255."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(256 + extra))
            extra += 1
    return out


def tiny_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """Build and save a tiny random Stable Diffusion pipeline offline (tests and benchmarks).

    UNet block_out_channels (32, 64), a two-level AutoencoderKL (latents at half the
    resolution), a two-layer CLIP text model and a character-level CLIP tokenizer written
    from a local vocabulary; DDIM with trailing timesteps.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=resolution,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    tokenizer = byte_tokenizer(d, 32)
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(d))
    return d


def tiny_xl_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """Build and save a tiny random Stable Diffusion XL pipeline offline (tests and benchmarks).

    As :func:`tiny_pipeline`, with two text encoders of different widths (a CLIP text model
    of 32 and a projected one of 48 with a 24-wide pooled embedding: 80-wide token states)
    and a UNet whose added embedding takes 6 time ids of 8 features each and that pooled
    embedding.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    widths, pooled, time_dim = (32, 48), 24, 8
    unet = UNet2DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=sum(widths), attention_head_dim=8, norm_num_groups=8, addition_embed_type="text_time",
        addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=resolution, scaling_factor=0.13025,
    )
    configs = [CLIPTextConfig(vocab_size=1000, hidden_size=w, intermediate_size=2 * w, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, projection_dim=pooled) for w in widths]
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", timestep_spacing="trailing", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    pipe = StableDiffusionXLPipeline(
        vae=vae, text_encoder=CLIPTextModel(configs[0]), text_encoder_2=CLIPTextModelWithProjection(configs[1]),
        tokenizer=byte_tokenizer(d, 32), tokenizer_2=byte_tokenizer(d, 32), unet=unet, scheduler=scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False,
    )
    pipe.save_pretrained(str(d))
    return d


def byte_tokenizer(work_dir: str | Path, max_length: int):
    """A character-level byte-level ``CLIPTokenizer`` built offline (no merges): the 256 byte
    symbols and their word-final forms plus the start and end tokens. ``work_dir`` holds the
    vocabulary files only while the tokenizer is built."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in _byte_symbols():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    src = Path(work_dir) / "_tokenizer_src"
    src.mkdir(parents=True, exist_ok=True)
    try:
        (src / "vocab.json").write_text(json.dumps(vocab))
        (src / "merges.txt").write_text("#version: 0.2\n")
        return CLIPTokenizer(str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=max_length)
    finally:
        shutil.rmtree(src, ignore_errors=True)
