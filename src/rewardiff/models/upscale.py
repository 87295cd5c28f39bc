"""Stable Diffusion's x4 upscaler (``StableDiffusionUpscalePipeline``) as a :class:`DiffusionModel`.

The upscaler (Stable Diffusion 2's ``stabilityai/stable-diffusion-x4-upscaler``; Rombach et al.
2022, "High-Resolution Image Synthesis with Latent Diffusion Models", arXiv 2112.10752, with
the noise augmentation of Ho et al. 2022, "Cascaded Diffusion Models", arXiv 2106.15282) is a
latent UNet whose input is the noisy latents z_t [B, 4, h, w] side by side with the
low-resolution image itself, noised, at the latents' own resolution; the VAE decodes z to an
image 4 times larger (a three-level VAE). With the pipeline's notation:

    1. y_s = sqrt(abar_s) y + sqrt(1 - abar_s) n      y: the low-res image [B, 3, h, w] in [-1, 1],
                                                       n ~ N(0, I), s = noise_level (default 20),
                                                       abar from ``low_res_scheduler`` (DDPM)
    2. out = unet([z_t ; y_s], t, text, class_labels=s)   the noise level is embedded as a class
    3. CFG: out_u + w (out_c - out_u), the unconditional branch with the empty text and the SAME y_s
    4. x = vae.decode(z_0 / scale)                     [B, 3, 4h, 4w] in [-1, 1]

The conditioning image comes through the prompt (:mod:`rewardiff.conditions`): ``"TEXT |
file:low.png"`` or a world's ``SCHEME:KEY``. ``encode(prompts)`` returns a dict condition
``{"hidden": [B, L, D], "image": y_s [B, 3, h, w], "noise_level": s [B] (long)}``, and the
unconditional prompt of ``"TEXT | REF"`` is ``" | REF"`` (:func:`rewardiff.conditions.unconditional`),
so step 3 is the pipeline's.

Determinism: the noise n of step 1 is drawn with a generator seeded from the prompt's image
reference alone (:func:`noise_seed`: the first 8 bytes of SHA-256 of ``REF``, as an integer
below 2**63), ``torch.randn((1, 3, h, w), generator=...)`` for each sample. A prompt therefore
names the same noised image in any batch, for any seed, and in both CFG branches; the sample's
seed draws z_T as for every model. The pipeline reproduces it given one generator per sample
seeded so (``generator=[torch.Generator().manual_seed(noise_seed(p)) for p in prompts]``):
its ``randn_tensor`` draws each sample's noise from its own generator.

Settings: ``noise_level`` in the folder's ``rewardiff.json`` (0 .. the pipeline's
``max_noise_level``, default 20); the low-res images are ``unet.config.sample_size`` square
(the real upscaler: 128, outputs 512).

Sampling: the process is the scheduler config's DDIM (:func:`~rewardiff.models.sd.process_from_scheduler`;
the released upscaler's scheduler is DDIM with ``v_prediction``, ``leading`` timesteps,
``steps_offset`` 1, no clipping). diffusers 0.42.1's pipeline calls ``scheduler.step`` with
``eta`` (default 0) and its generator, and ``scale_model_input`` (the identity for DDIM). A
folder saved with another scheduler class (DDPM, Euler) is sampled by rewardiff's DDIM on the
same betas: the same model, not that scheduler's sampler. Clipped or thresholded x0 estimates
(``clip_sample``, ``thresholding``) are refused: the process has neither.

LoRA: the UNet's LoRA is written by ``StableDiffusionUpscalePipeline.save_lora_weights`` and
loads with plain ``pipe.load_lora_weights(DIR)`` (the pipeline has Stable Diffusion's loader).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff import conditions
from rewardiff.errors import UserError
from rewardiff.models.base import DiffusionModel
from rewardiff.models.sd import SDDenoiser, pipeline_index, process_from_scheduler, vae_decoder

UPSCALE_PIPELINE = "StableDiffusionUpscalePipeline"
DEFAULT_NOISE_LEVEL = 20  # the pipeline's noise_level
IMAGE_CHANNELS = 3


def noise_seed(prompt: str) -> int:
    """The seed of the noise that augments ``prompt``'s low-res image: the first 8 bytes of
    SHA-256 of its image reference (``file:low.png``), little-endian, halved (below 2**63)."""
    _, ref = conditions.split(prompt)
    if ref is None:
        raise UserError(f"prompt {prompt!r} names no image; write 'TEXT | file:PATH' or a world's reference such as shapes-sr:0")
    return int.from_bytes(hashlib.sha256(ref.encode("utf-8")).digest()[:8], "little") >> 1


class UpscaleDenoiser(SDDenoiser):
    """``forward(z_t [B, 4, h, w], t [B], cond) -> prediction [B, 4, h, w]``: the UNet on the
    latents joined with the noised low-res image, its noise level as the class label.

    ``encode(prompts)`` -> ``{"hidden": [B, L, D], "image": [B, 3, h, w], "noise_level": [B]}``
    (steps 1 and 2 of the module docstring). Holds the UNet (``.unet``, where LoRA goes) and
    the text encoder (``.text``).

    Args:
        unet, text_encoder, tokenizer: the pipeline's.
        low_res_scheduler: the pipeline's DDPM scheduler whose ``add_noise`` noises the image.
        noise_level: s, the noise level of the image and the UNet's class label.
        size: the low-res images' side h = w, the latents' own.
    """

    lora_pipeline = UPSCALE_PIPELINE  # its save_lora_weights writes the unet's LoRA

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer, low_res_scheduler, noise_level: int, size: int):
        super().__init__(unet, text_encoder, tokenizer)
        self.low_res_scheduler, self.noise_level, self.size = low_res_scheduler, int(noise_level), int(size)

    def low_res(self, prompt: str) -> Tensor:
        """``prompt``'s low-res image [3, h, w] in [-1, 1]; UserError when it names none, cannot be
        read, or is not of the size the model takes."""
        image = conditions.low_res(prompt)
        if tuple(image.shape) != (IMAGE_CHANNELS, self.size, self.size):
            s = self.size
            raise UserError(f"prompt {prompt!r}: its image is {image.shape[-2]}x{image.shape[-1]}; this upscaler takes "
                            f"{s}x{s} low-resolution images (outputs {4 * s}x{4 * s})")
        return image

    def check_prompts(self, prompts: list[str]) -> None:
        """UserError for the first prompt whose image is missing, unreadable or of the wrong size."""
        for p in dict.fromkeys(prompts):
            self.low_res(p)

    def encode(self, prompts: list[str]) -> dict[str, Tensor]:
        prompts = list(prompts)
        hidden = super().encode([conditions.split(p)[0] for p in prompts])  # [B, L, D], the text alone
        images = torch.stack([self.low_res(p) for p in prompts]).to(hidden)  # y [B, 3, h, w]
        noise = torch.cat([torch.randn((1, *images.shape[1:]), generator=torch.Generator().manual_seed(noise_seed(p)))
                           for p in prompts]).to(hidden)  # n, one generator a sample
        levels = torch.full((len(prompts),), self.noise_level, dtype=torch.long, device=hidden.device)  # s [B]
        noised = self.low_res_scheduler.add_noise(images, noise, levels)  # 1. y_s
        return {"hidden": hidden, "image": noised, "noise_level": levels}

    def forward(self, z_t: Tensor, t: Tensor, cond: dict[str, Tensor]) -> Tensor:
        x = torch.cat([z_t, cond["image"].to(z_t)], dim=1)  # [B, 4 + 3, h, w]
        return self.unet(x, t, encoder_hidden_states=cond["hidden"], class_labels=cond["noise_level"]).sample  # 2.


def is_upscale_pipeline(directory: str | Path) -> bool:
    """Whether a saved pipeline folder holds a ``StableDiffusionUpscalePipeline`` (by ``model_index.json``)."""
    return str(pipeline_index(directory).get("_class_name", "")) == UPSCALE_PIPELINE


def _check(pipe, d: Path, level: int) -> None:
    """UserError for what the adapter cannot reproduce or the pipeline would refuse."""
    if level > int(pipe.config.max_noise_level):
        raise UserError(f"{d / 'rewardiff.json'}: noise_level must be at most the pipeline's max_noise_level "
                        f"{pipe.config.max_noise_level}, got {level}")
    for field in ("clip_sample", "thresholding"):
        if pipe.scheduler.config.get(field, False):
            raise UserError(f"{d / 'scheduler'}: {field} is on; rewardiff's DDIM process neither clips nor thresholds "
                            f"x0 estimates (set {field} to false in scheduler_config.json)")
    unet, latent = pipe.unet, int(pipe.vae.config.latent_channels)
    if int(unet.config.in_channels) != latent + IMAGE_CHANNELS:
        raise UserError(f"{d}: the UNet takes {unet.config.in_channels} channels, not the {latent} latent channels "
                        f"and the {IMAGE_CHANNELS} of the low-res image")
    if getattr(unet, "class_embedding", None) is None:
        raise UserError(f"{d}: the UNet has no class embedding to read the noise level (num_class_embeds)")


def upscale_model(path: str | Path) -> DiffusionModel:
    """A diffusers ``StableDiffusionUpscalePipeline`` folder as a DiffusionModel of latents
    (shape (4, h, w); ``decode`` gives [B, 3, 4h, 4w]; prompts carry the low-res image);
    no network access."""
    from diffusers import StableDiffusionUpscalePipeline

    from rewardiff.models.video import folder_settings

    d = Path(path)
    level = folder_settings(d, {"noise_level": DEFAULT_NOISE_LEVEL}, minimum=0)["noise_level"]
    try:
        pipe = StableDiffusionUpscalePipeline.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the upscale pipeline in {d}: {str(e).splitlines()[0][:200]}") from None
    _check(pipe, d, level)
    size = int(pipe.unet.config.sample_size)
    net = UpscaleDenoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.low_res_scheduler, level, size)
    net.requires_grad_(False)
    net.eval()
    shape = (int(pipe.vae.config.latent_channels), size, size)
    model = DiffusionModel(net, process_from_scheduler(dict(pipe.scheduler.config)), net.encode, shape,
                           vae_decoder(pipe.vae), name=f"diffusers:{d.name}", check_prompts=net.check_prompts,
                           unconditional=lambda prompts: [conditions.unconditional(p) for p in prompts])
    model.image_size = size * pipe.vae_scale_factor  # type: ignore[attr-defined]
    model.noise_level = level  # type: ignore[attr-defined]
    return model


def tiny_upscale_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32) -> Path:
    """Build and save a tiny random ``StableDiffusionUpscalePipeline`` offline (tests and benchmarks).

    Outputs ``resolution`` square from low-res images a quarter of it: a UNet with
    block_out_channels (32, 64), 7 input channels (4 latent + 3 image), linear projections and
    1000 class embeddings (the released upscaler's), a three-level AutoencoderKL (latents at a
    quarter of the resolution, scaling factor 0.08333), a two-layer CLIP text model with the
    character-level tokenizer of :func:`~rewardiff.models.sd.byte_tokenizer`, the released
    upscaler's DDIM (scaled-linear betas, ``v_prediction``, ``leading`` timesteps with
    ``steps_offset`` 1) and a linear-beta DDPM as its ``low_res_scheduler``; ``max_noise_level`` 350.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionUpscalePipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rewardiff.models.sd import byte_tokenizer

    if resolution % 8:
        raise UserError(f"resolution must be a multiple of 8 (latents a quarter of it, halved once in the UNet), got {resolution}")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=resolution // 4, in_channels=4 + IMAGE_CHANNELS, out_channels=4, block_out_channels=(32, 64),
        layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
        use_linear_projection=True, num_class_embeds=1000,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3, norm_num_groups=8,
        sample_size=resolution, scaling_factor=0.08333,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="v_prediction", timestep_spacing="leading", steps_offset=1, clip_sample=False,
                              set_alpha_to_one=False)
    low_res_scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0001, beta_end=0.02)
    pipe = StableDiffusionUpscalePipeline(vae=vae, text_encoder=text, tokenizer=byte_tokenizer(d, 32), unet=unet,
                                          low_res_scheduler=low_res_scheduler, scheduler=scheduler, max_noise_level=350)
    pipe.save_pretrained(str(d))
    return d
