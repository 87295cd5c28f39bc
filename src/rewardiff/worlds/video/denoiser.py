"""The video world's prompt-conditioned pixel denoiser.

A small diffusers ``UNet3DConditionModel`` in pixel space (clips [B, 3, F, 32, 32]): per-frame
2-D convolutions and attention, factorised with temporal convolutions and temporal attention
(ModelScope's text-to-video UNet in miniature), conditioned by cross-attention on a tiny text
encoder of the video vocabulary (the shapes world's :class:`TextEncoder`). The process is the
shapes model's default: Gaussian, v-prediction, cosine schedule rescaled to zero terminal SNR.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rewardiff.errors import UserError
from rewardiff.worlds import WEIGHTS
from rewardiff.worlds.shapes.denoiser import PromptedDenoiser, TextEncoder
from rewardiff.worlds.video import data as video

NAME = "shapes-video"


@dataclass
class VideoModelConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # UNet widths at 32x32, 16x16, 8x8
    cross_attention_dim: int = 64  # width of the text encoder's token states
    layers_per_block: int = 1  # resnet blocks per UNet level (the up path has one more)
    norm_groups: int = 8  # GroupNorm groups
    attention_heads: int = 4  # heads of the spatial, temporal and cross attention (lowest level only)
    frames: int = video.FRAMES  # the clip length it is trained on (any length samples; the card and rollouts use this)
    schedule: str = "cosine"  # beta schedule of the Gaussian process
    zero_snr: bool = True  # rescale so that the last timestep is pure noise
    prediction: str = "v_prediction"  # epsilon | v_prediction | sample
    extra: dict = field(default_factory=dict)  # free-form notes carried into the card


class VideoDenoiser(PromptedDenoiser):
    """``forward(x_t [B,3,F,32,32], t [B], cond [B,L,D]) -> prediction [B,3,F,32,32]``."""

    def __init__(self, config: VideoModelConfig | None = None):
        super().__init__()
        from diffusers import UNet3DConditionModel

        self.config = config or VideoModelConfig()
        c = self.config
        n = len(c.block_out_channels)
        self.tokenize = video.tokenize
        self.text = TextEncoder(c.cross_attention_dim, len(video.VOCAB), video.MAX_TOKENS)
        # diffusers names the number of heads ``attention_head_dim`` here (its input temporal
        # transformer takes 8 heads of that width); both stay small
        self.unet = UNet3DConditionModel(
            sample_size=video.SIZE,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock3D",) * (n - 1) + ("CrossAttnDownBlock3D",),
            up_block_types=("CrossAttnUpBlock3D",) + ("UpBlock3D",) * (n - 1),
            cross_attention_dim=c.cross_attention_dim,
            attention_head_dim=c.attention_heads,
            norm_num_groups=c.norm_groups,
        )
        from rewardiff.models.video import VIDEO_PIPELINE, video_lora_targets

        # LoRA adapts the UNet3D layers the text-to-video adapter adapts (spatial and temporal
        # attention, the ResNets, the temporal convolutions): the same class, the same targets
        self.lora_layers, self.lora_pipeline = video_lora_targets(self.unet), VIDEO_PIPELINE

    def process(self):
        """The model's Gaussian process (DDPM/DDIM)."""
        from rewardiff.processes.gaussian import GaussianProcess

        c = self.config
        return GaussianProcess.from_config(c.schedule, 1000, c.zero_snr, c.prediction)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        from rewardiff.io import save_module

        save_module(directory, self, {"kind": NAME, **asdict(self.config)})

    @classmethod
    def load(cls, directory: str | Path) -> VideoDenoiser:
        from rewardiff.io import read_module

        return read_module(directory, lambda **c: cls(VideoModelConfig(**c)), drop=("kind",), tuples=("block_out_channels",))


def as_model(net: VideoDenoiser):
    """``net`` as a :class:`~rewardiff.models.base.DiffusionModel` of clips (3, F, 32, 32)."""
    from rewardiff.models.base import DiffusionModel

    shape = (3, net.config.frames, video.SIZE, video.SIZE)
    return DiffusionModel(net, net.process(), net.encode, shape, name=NAME, world="video", check_prompts=net.check_prompts)


def video_model(directory: str | Path | None = None):
    """The video world's base model (shipped weights unless ``directory`` is given)."""
    d = Path(directory) if directory else WEIGHTS / NAME
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no {NAME} model weights in {d}; train them with: rewardiff pretrain {NAME}")
    net = VideoDenoiser.load(d)
    net.eval()
    return as_model(net)


def is_video_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved video denoiser (its config.json names the kind)."""
    cfg = Path(directory) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("kind") == NAME
    except (OSError, ValueError, AttributeError):
        return False
