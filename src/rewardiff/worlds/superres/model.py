"""The super-resolution world's conditional pixel diffusion model (``shapes-sr``).

As SR3 and Stable Diffusion's x4 upscaler, the low-resolution input, upsampled to 32x32,
enters the denoiser as extra input channels: a diffusers ``UNet2DConditionModel`` with 6 input
channels (the noisy image and the upsampled input) and 3 output channels, with no
cross-attention (self-attention in its middle block only), so no text state is needed. The
prompt carries the input (``"shapes-sr:held-out/3"``, read by :func:`rewardiff.conditions.low_res`);
the empty prompt "" is the unconditional input (all zeros), which training shows with
probability ``cond_dropout`` so that classifier-free guidance has a meaning.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.worlds import WEIGHTS
from rewardiff.worlds.superres import data as sr

KIND = "shapes-sr"  # config.json's "kind": what marks a saved super-resolution model folder


@dataclass
class SRModelConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # UNet widths at 32x32, 16x16, 8x8
    layers_per_block: int = 1  # resnet blocks per UNet level
    attention_head_dim: int = 8  # channels per head of the middle block's self-attention
    upsample: str = "bicubic"  # how the 8x8 input is brought to 32x32: bicubic | bilinear | nearest
    schedule: str = "cosine"  # beta schedule of the Gaussian process
    zero_snr: bool = True  # rescale so that the last timestep is pure noise
    prediction: str = "v_prediction"  # epsilon | v_prediction | sample
    kind: str = KIND
    extra: dict = field(default_factory=dict)  # free-form notes carried into the card


class SRDenoiser(nn.Module):
    """``forward(x_t [B,3,32,32], t [B], cond [B,3,32,32]) -> prediction [B,3,32,32]``; ``cond``
    is the upsampled input that :meth:`encode` builds from the prompts."""

    def __init__(self, config: SRModelConfig | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config or SRModelConfig()
        c = self.config
        n = len(c.block_out_channels)
        self.unet = UNet2DConditionModel(
            sample_size=sr.SIZE,
            in_channels=6,
            out_channels=3,
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) * n,
            up_block_types=("UpBlock2D",) * n,
            mid_block_type="UNetMidBlock2D",
            attention_head_dim=c.attention_head_dim,
            norm_num_groups=8,
        )

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> their inputs upsampled [B, 3, 32, 32]; "" -> zeros (the unconditional input)."""
        from rewardiff import conditions

        device = next(self.parameters()).device
        lows = [torch.zeros(3, sr.LOW, sr.LOW) if not p.strip() else conditions.low_res(p) for p in prompts]
        sizes = {tuple(x.shape) for x in lows}
        if sizes != {(3, sr.LOW, sr.LOW)}:
            raise UserError(f"the shapes-sr model reads {sr.LOW}x{sr.LOW} RGB inputs; got sizes {sorted(sizes)}")
        up = sr.upsample(torch.stack(lows).float(), self.config.upsample)
        for i, p in enumerate(prompts):
            if not p.strip():
                up[i] = 0
        return up.to(device)

    def check_prompts(self, prompts: list[str]) -> None:
        """A UserError for a prompt that names no readable input of the right size."""
        self.encode([p for p in prompts if p.strip()][:64])

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.unet(torch.cat([x_t, cond.to(x_t.dtype)], dim=1), t, encoder_hidden_states=None).sample

    def process(self):
        """The Gaussian process (DDPM/DDIM) of ``config``."""
        from rewardiff.processes.gaussian import GaussianProcess

        c = self.config
        return GaussianProcess.from_config(c.schedule, 1000, c.zero_snr, c.prediction)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        from rewardiff.io import save_module

        save_module(directory, self, asdict(self.config))

    @classmethod
    def load(cls, directory: str | Path) -> SRDenoiser:
        from rewardiff.io import read_module

        return read_module(directory, lambda **c: cls(SRModelConfig(**c)), tuples=("block_out_channels",))


def is_sr_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved super-resolution model (its config says kind shapes-sr)."""
    try:
        return json.loads((Path(directory) / "config.json").read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def wrap(net: SRDenoiser):
    """``net`` as a :class:`~rewardiff.models.base.DiffusionModel` of world ``superres``."""
    from rewardiff.models.base import DiffusionModel

    return DiffusionModel(net, net.process(), net.encode, (3, sr.SIZE, sr.SIZE), name="shapes-sr", world="superres",
                          check_prompts=net.check_prompts)


def shapes_sr_model(directory: str | Path | None = None):
    """The super-resolution world's model (shipped weights unless ``directory`` is given);
    prompts name its inputs: ``model.generate(["shapes-sr:held-out/3"], seeds=[0])``."""
    d = Path(directory) if directory else WEIGHTS / "shapes-sr"
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no shapes-sr model weights in {d}; train them with: rewardiff pretrain shapes-sr")
    net = SRDenoiser.load(d)
    net.eval()
    return wrap(net)
