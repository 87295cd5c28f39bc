"""Stable Diffusion (and any diffusers text-to-image pipeline with a UNet2DConditionModel,
a VAE and a CLIP text encoder) as a :class:`DiffusionModel`.

The UNet denoises latents; prompts go through the pipeline's tokenizer and text encoder;
``decode`` runs the VAE (checkpointed when gradients flow, so reward backpropagation through
the decoder costs recomputation, not memory). The process is built from the pipeline's
scheduler config, so sampling through the one rollout loop matches the pipeline's own DDIM
sampler. ``model: diffusers:PATH`` in a fine-tuning config, or ``--model diffusers:PATH``,
loads a pipeline folder saved with ``save_pretrained`` (offline).
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
from rewardiff.processes.gaussian import GaussianProcess, make_betas, rescale_zero_terminal_snr


class SDDenoiser(nn.Module):
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


def process_from_scheduler(config: dict) -> GaussianProcess:
    """The Gaussian process a diffusers scheduler config describes (betas, prediction type,
    zero-terminal-SNR rescaling, ``set_alpha_to_one``)."""
    kind = config.get("beta_schedule", "linear")
    kinds = {"linear": "linear", "scaled_linear": "scaled_linear", "squaredcos_cap_v2": "cosine"}
    if kind not in kinds:
        raise UserError(f"scheduler beta_schedule {kind!r} is not supported; supported: {', '.join(kinds)}")
    n = int(config.get("num_train_timesteps", 1000))
    betas = make_betas(kinds[kind], n, float(config.get("beta_start", 1e-4)), float(config.get("beta_end", 0.02)))
    if config.get("rescale_betas_zero_snr", False):
        betas = rescale_zero_terminal_snr(betas)
    return GaussianProcess(betas, config.get("prediction_type", "epsilon"), bool(config.get("set_alpha_to_one", True)))


def sd_model(path: str | Path) -> DiffusionModel:
    """A diffusers Stable Diffusion pipeline folder as a DiffusionModel (no network access)."""
    from diffusers import StableDiffusionPipeline

    d = Path(path)
    if not (d / "model_index.json").is_file():
        raise UserError(f"no diffusers pipeline in {d} (model_index.json missing); save one with pipeline.save_pretrained(DIR)")
    pipe = StableDiffusionPipeline.from_pretrained(str(d), local_files_only=True, safety_checker=None, requires_safety_checker=False)
    net = SDDenoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    net.requires_grad_(False)
    net.eval()
    vae = pipe.vae.eval().requires_grad_(False)
    scale = float(vae.config.scaling_factor)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    size = int(pipe.unet.config.sample_size)

    def decode(z: Tensor) -> Tensor:
        run = lambda latents: vae.decode(latents / scale).sample  # noqa: E731
        return checkpoint(run, z, use_reentrant=False) if torch.is_grad_enabled() and z.requires_grad else run(z)

    shape = (int(pipe.unet.config.in_channels), size, size)
    model = DiffusionModel(net, process_from_scheduler(dict(pipe.scheduler.config)), net.encode, shape, decode,
                           name=f"diffusers:{d.name}")
    model.image_size = size * factor  # type: ignore[attr-defined]
    return model


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
