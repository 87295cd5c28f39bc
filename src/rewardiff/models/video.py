"""Text-to-video pipelines through diffusers as :class:`DiffusionModel` s.

``TextToVideoSDPipeline`` (ModelScope's text-to-video, Wang et al. 2023, "ModelScope
Text-to-Video Technical Report", arXiv 2308.06571): a ``UNet3DConditionModel`` denoises video
latents z [B, C, F, h, w] (spatial layers per frame, temporal convolutions and attention
across frames), prompts go through one CLIP text encoder as in Stable Diffusion
(:class:`~rewardiff.models.sd.SDDenoiser`), the process is the scheduler config's DDIM
(:func:`~rewardiff.models.sd.process_from_scheduler`: ModelScope's own config has ``leading``
timesteps with ``steps_offset`` 1), and the 2-D ``AutoencoderKL`` decodes each frame:

    video[:, :, f] = vae.decode(z[:, :, f] / scale)     f = 0 .. F - 1,   [B, 3, F, H, W] in [-1, 1]

which is what the pipeline's ``decode_latents`` computes with the frames folded into the
batch (``[B, C, F, h, w] -> [B F, C, h, w]``, frame-major within each video). Decoding one
frame at a time, each checkpointed when gradients flow, keeps reward backpropagation through
the decoder at the memory of one frame.

The number of frames is not part of the pipeline's components: ``num_frames`` in the folder's
``rewardiff.json`` sets it (:func:`tiny_video_pipeline` writes it; diffusers ignores the
file), else the pipeline's default of 16.

LoRA: diffusers gives ``UNet3DConditionModel`` no PEFT mixin (no ``add_adapter``, no
``load_lora_adapter``), so ``TextToVideoSDPipeline.load_lora_weights`` fails on it in diffusers
0.42 (the pipeline is deprecated there, last supported in 0.33.1). rewardiff injects the
adapter with peft directly and writes it with ``TextToVideoSDPipeline.save_lora_weights``
(keys ``unet.<layer>.lora_A.weight``, the LoraConfig in the file's metadata); plain diffusers
and peft load it into a pipeline as ``load_lora_adapter`` would::

    state, _, meta = TextToVideoSDPipeline.lora_state_dict(DIR, return_lora_metadata=True)
    config = {k.removeprefix("unet."): v for k, v in meta.items()}      # the LoraConfig, from the file
    inject_adapter_in_model(LoraConfig(**config), pipe.unet)
    set_peft_model_state_dict(pipe.unet, {k.removeprefix("unet."): v for k, v in state.items()})

(:func:`load_video_lora` does exactly this). The adapted layers (:func:`video_lora_targets`)
are Stable Diffusion's, spatial and temporal alike, and the temporal convolutions.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.models.base import DiffusionModel
from rewardiff.models.sd import SDDenoiser, pipeline_index, process_from_scheduler, vae_decoder

VIDEO_PIPELINE = "TextToVideoSDPipeline"
DEFAULT_FRAMES = 16  # TextToVideoSDPipeline's num_frames
SETTINGS = "rewardiff.json"  # rewardiff's settings of a pipeline folder: {"num_frames": F}
# Stable Diffusion's LoRA layers (finetune/weights.py LORA_TARGETS) by the end of their names:
# attention projections, the transformers' proj_in/out, the ResNets' convolutions and time projections
_SD_LAYERS = (".to_q", ".to_k", ".to_v", ".to_out.0", ".proj_in", ".proj_out", ".conv1", ".conv2", ".time_emb_proj")
_TEMPORAL_CONV = re.compile(r"\.temp_convs\.\d+\.conv[1-4]\.\d+$")  # the Conv3d inside a temporal conv block


def video_lora_targets(unet: nn.Module) -> list[str]:
    """The names of the UNet3D layers LoRA adapts: every ``Linear``, ``Conv2d`` or ``Conv3d``
    that Stable Diffusion's list names (spatial and temporal attention's ``to_q``, ``to_k``,
    ``to_v``, ``to_out.0``; the spatial and temporal transformers' ``proj_in``, ``proj_out``,
    ``transformer_in`` included; the ResNets' ``conv1``, ``conv2``, ``time_emb_proj``), and the
    3-D convolution of each temporal convolution block (``temp_convs.i.conv1`` .. ``conv4``).

    Full names, not suffixes: in UNet3D ``conv1`` also names the temporal blocks'
    ``nn.Sequential(GroupNorm, SiLU, Conv3d)``, which peft cannot adapt."""
    layers = (nn.Linear, nn.Conv2d, nn.Conv3d)
    return [n for n, m in unet.named_modules()
            if isinstance(m, layers) and (n.endswith(_SD_LAYERS) or _TEMPORAL_CONV.search(n))]


class VideoSDDenoiser(SDDenoiser):
    """``forward(z_t [B, C, F, h, w], t [B], cond [B, L, D]) -> eps [B, C, F, h, w]``; ``encode``
    as Stable Diffusion's (one CLIP encoder's last hidden states, the empty prompt encoded).

    Holds the ``UNet3DConditionModel`` (``.unet``, where LoRA goes: :func:`video_lora_targets`)
    and the text encoder (``.text``)."""

    lora_pipeline = VIDEO_PIPELINE  # its save_lora_weights writes the unet's LoRA

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, tokenizer):
        super().__init__(unet, text_encoder, tokenizer)
        self.lora_layers = video_lora_targets(unet)


def frame_decoder(vae: nn.Module):
    """Video latents [B, C, F, h, w] -> videos [B, 3, F, H, W] in [-1, 1]: the 2-D VAE on each
    frame (:func:`~rewardiff.models.sd.vae_decoder`, checkpointed frame by frame when gradients
    flow)."""
    decode_image = vae_decoder(vae)

    def decode(z: Tensor) -> Tensor:
        return torch.stack([decode_image(z[:, :, f]) for f in range(z.shape[2])], dim=2)

    return decode


def is_video_pipeline(directory: str | Path) -> bool:
    """Whether a saved pipeline folder holds a ``TextToVideoSDPipeline`` (by ``model_index.json``)."""
    return str(pipeline_index(directory).get("_class_name", "")) == VIDEO_PIPELINE


def folder_settings(directory: Path, defaults: dict[str, int], minimum: int = 1) -> dict[str, int]:
    """The sizes of a sample (``defaults``' keys: ``num_frames``, and for Wan ``height`` and
    ``width``; the upscaler's ``noise_level``) from the folder's ``rewardiff.json``, each an
    integer of at least ``minimum``; the defaults fill what it leaves out, and all of them
    without the file."""
    path = directory / SETTINGS
    settings: object = {}
    if path.is_file():
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise UserError(f"cannot read {path}: {e}") from None
    if not isinstance(settings, dict):
        raise UserError(f"{path}: expected a JSON object such as {json.dumps(defaults)}")
    out = {k: settings.get(k, v) for k, v in defaults.items()}
    for k, v in out.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise UserError(f"{path}: {k} must be {what}, got {v!r}")
    return out


def video_model(path: str | Path) -> DiffusionModel:
    """A diffusers ``TextToVideoSDPipeline`` folder as a DiffusionModel of video latents
    (shape (C, F, h, w); ``decode`` gives [B, 3, F, H, W]); no network access."""
    from diffusers import TextToVideoSDPipeline

    d = Path(path)
    frames = folder_settings(d, {"num_frames": DEFAULT_FRAMES})["num_frames"]
    try:
        pipe = TextToVideoSDPipeline.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        raise UserError(f"cannot load the text-to-video pipeline in {d}: {str(e).splitlines()[0][:200]}") from None
    if type(pipe.unet).__name__ != "UNet3DConditionModel":
        raise UserError(f"{d}: a TextToVideoSDPipeline needs a UNet3DConditionModel, found {type(pipe.unet).__name__}")
    net = VideoSDDenoiser(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    net.requires_grad_(False)
    net.eval()
    size = int(pipe.unet.config.sample_size)
    shape = (int(pipe.unet.config.in_channels), frames, size, size)
    model = DiffusionModel(net, process_from_scheduler(dict(pipe.scheduler.config)), net.encode, shape,
                           frame_decoder(pipe.vae), name=f"diffusers:{d.name}")
    model.image_size = size * pipe.vae_scale_factor  # type: ignore[attr-defined]
    model.frames = frames  # type: ignore[attr-defined]
    return model


def load_video_lora(pipe, directory: str | Path) -> None:
    """Load a LoRA that rewardiff wrote for a text-to-video UNet (``pytorch_lora_weights.safetensors``
    in ``directory``) into ``pipe.unet`` with diffusers' reader and peft, as ``load_lora_adapter``
    would, since ``UNet3DConditionModel`` has no ``load_lora_adapter``."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    state, _, meta = pipe.lora_state_dict(str(directory), return_lora_metadata=True)
    if not meta or "unet" not in {k.split(".")[0] for k in meta}:
        raise UserError(f"{directory}: the LoRA file records no unet LoraConfig in its metadata")
    config = {k.removeprefix("unet."): v for k, v in meta.items() if k.startswith("unet.")}
    inject_adapter_in_model(LoraConfig(**config), pipe.unet)
    set_peft_model_state_dict(pipe.unet, {k.removeprefix("unet."): v for k, v in state.items() if k.startswith("unet.")})


def tiny_video_pipeline(directory: str | Path, seed: int = 0, resolution: int = 32, frames: int = 8) -> Path:
    """Build and save a tiny random ``TextToVideoSDPipeline`` offline (tests and benchmarks).

    A UNet3DConditionModel with block_out_channels (16, 32) (one cross-attention level, the
    temporal convolutions and attention of every block), a two-level AutoencoderKL (latents at
    half the resolution), a two-layer CLIP text model with the character-level tokenizer of
    :func:`~rewardiff.models.sd.byte_tokenizer`, and ModelScope's DDIM config (scaled-linear
    betas, ``leading`` timesteps with ``steps_offset`` 1, ``set_alpha_to_one`` False). The
    temporal convolutions' last layers, zero at initialisation, get small random weights, so
    that frames interact as in a trained model. ``frames`` is written to ``rewardiff.json``
    as ``num_frames``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler, TextToVideoSDPipeline, UNet3DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from rewardiff.models.sd import byte_tokenizer

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    unet = UNet3DConditionModel(
        sample_size=resolution // 2, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    )
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".temp_convs." in name and ".conv4." in name:
                p.normal_(0.0, 0.05)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8,
        sample_size=resolution,
    )
    text = CLIPTextModel(CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                                        pad_token_id=1))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              prediction_type="epsilon", timestep_spacing="leading", steps_offset=1, clip_sample=False,
                              set_alpha_to_one=False)
    pipe = TextToVideoSDPipeline(vae=vae, text_encoder=text, tokenizer=byte_tokenizer(d, 32), unet=unet, scheduler=scheduler)
    pipe.save_pretrained(str(d))
    atomic_write_text(d / SETTINGS, json.dumps({"num_frames": int(frames)}) + "\n")
    return d
