"""The shapes world's prompt-conditioned pixel denoiser.

A small diffusers ``UNet2DConditionModel`` in pixel space, conditioned by cross-attention
on a tiny text encoder (word embeddings, positions, one transformer layer). Because the
network is the same class as Stable Diffusion's UNet, LoRA targets and adapters serve both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.worlds import WEIGHTS
from rewardiff.worlds.shapes import data as shapes


def grammar(prompts: str) -> tuple[int, int, Callable[[list[str]], Tensor]]:
    """(vocabulary size, most tokens, tokenizer) of a grammar of prompts: ``count`` (the
    counting world's words), ``geneval`` (those and GenEval's: a, and, left of, above, ...) or
    ``shapes3d`` (the 3D world's: "two red spheres and a blue cube")."""
    if prompts == "count":
        return len(shapes.VOCAB), shapes.MAX_TOKENS, shapes.tokenize
    if prompts == "geneval":
        from rewardiff.worlds.shapes import compositions

        return len(compositions.GENEVAL_VOCAB), compositions.GENEVAL_MAX_TOKENS, compositions.tokenize
    if prompts == "shapes3d":
        from rewardiff.worlds.shapes3d import data as shapes3d

        return len(shapes3d.VOCAB), shapes3d.MAX_TOKENS, shapes3d.tokenize
    raise UserError(f"unknown prompts {prompts!r} in the shapes model's config; count, geneval or shapes3d")


@dataclass
class ShapesModelConfig:
    block_out_channels: tuple[int, ...] = (16, 32, 64)  # UNet widths at 32x32, 16x16, 8x8
    cross_attention_dim: int = 64  # width of the text encoder's token states
    layers_per_block: int = 1  # resnet blocks per UNet level
    attention_head_dim: int = 8  # channels per attention head
    schedule: str = "cosine"  # beta schedule of the Gaussian process
    zero_snr: bool = True  # rescale so that the last timestep is pure noise
    prediction: str = "v_prediction"  # epsilon | v_prediction | sample (the Gaussian process)
    process: str = "gaussian"  # gaussian (DDPM/DDIM) | flow (rectified flow: velocity, as SD3)
    shift: float = 1.0  # flow: the schedule's shift (SD3: 3 at 1024 px; 1 at 32 px)
    prompts: str = "count"  # the grammar it reads: count (the counting prompts) | geneval (GenEval's six tasks) | shapes3d
    extra: dict = field(default_factory=dict)  # free-form notes carried into the card


class TextEncoder(nn.Module):
    """Token ids [B, L] -> token states [B, L, D]."""

    def __init__(self, dim: int, vocab: int = len(shapes.VOCAB), length: int = shapes.MAX_TOKENS):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(length, dim))
        self.layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.tok(ids) + self.pos[: ids.shape[1]]
        return self.norm(self.layer(h))


class PromptedDenoiser(nn.Module):
    """A diffusers UNet conditioned on the token states of a small text encoder: subclasses set
    ``text`` (a :class:`TextEncoder`), ``unet`` and ``tokenize`` (prompts -> ids [B, L], raising
    ValueError on an unknown word). The shapes and video worlds' denoisers."""

    text: TextEncoder
    unet: nn.Module
    tokenize: Callable[[list[str]], Tensor]

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts -> token states; "" is the unconditional prompt used by guidance."""
        device = next(self.parameters()).device
        return self.text(self.tokenize(prompts).to(device))

    def check_prompts(self, prompts: list[str]) -> None:
        """A UserError naming the first word its text encoder does not know."""
        try:
            self.tokenize(prompts)
        except ValueError as e:
            raise UserError(str(e)) from None

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])
        return self.unet(x_t, t, encoder_hidden_states=cond).sample


class ShapesDenoiser(PromptedDenoiser):
    """``forward(x_t [B,3,32,32], t [B], cond [B,L,D]) -> prediction [B,3,32,32]``."""

    def __init__(self, config: ShapesModelConfig | None = None):
        super().__init__()
        from diffusers import UNet2DConditionModel

        self.config = config or ShapesModelConfig()
        c = self.config
        n = len(c.block_out_channels)
        vocab, length, self.tokenize = grammar(c.prompts)
        self.text = TextEncoder(c.cross_attention_dim, vocab, length)
        self.unet = UNet2DConditionModel(
            sample_size=shapes.SIZE,
            in_channels=3,
            out_channels=3,
            block_out_channels=tuple(c.block_out_channels),
            layers_per_block=c.layers_per_block,
            down_block_types=("DownBlock2D",) * (n - 1) + ("CrossAttnDownBlock2D",),
            up_block_types=("CrossAttnUpBlock2D",) + ("UpBlock2D",) * (n - 1),
            cross_attention_dim=c.cross_attention_dim,
            attention_head_dim=c.attention_head_dim,
            norm_num_groups=8,
        )

    def process(self):
        """The model's process: DDPM/DDIM, or rectified flow (``config.process``)."""
        c = self.config
        if c.process == "flow":
            from rewardiff.processes.flow import FlowProcess

            return FlowProcess(1000, shift=c.shift)
        if c.process != "gaussian":
            raise UserError(f"unknown process {c.process!r} in the shapes model's config; gaussian or flow")
        from rewardiff.processes.gaussian import GaussianProcess

        return GaussianProcess.from_config(c.schedule, 1000, c.zero_snr, c.prediction)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        from rewardiff.io import save_module

        save_module(directory, self, asdict(self.config))

    @classmethod
    def load(cls, directory: str | Path) -> ShapesDenoiser:
        from rewardiff.io import read_module

        return read_module(directory, lambda **c: cls(ShapesModelConfig(**c)), tuples=("block_out_channels",))


def shapes_model(directory: str | Path | None = None):
    """The shapes world's base model (shipped weights unless ``directory`` is given)."""
    from rewardiff.models.base import DiffusionModel

    d = Path(directory) if directory else WEIGHTS / "shapes-base"
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no shapes model weights in {d}; train them with: rewardiff pretrain shapes")
    net = ShapesDenoiser.load(d)
    net.eval()
    name = "shapes-flow" if net.config.process == "flow" else "shapes"
    return DiffusionModel(net, net.process(), net.encode, (3, 32, 32), name=name, world="shapes", check_prompts=net.check_prompts)


def shapes_flow_model(directory: str | Path | None = None):
    """The shapes world's rectified-flow model (``rewardiff pretrain shapes-flow``): the same
    denoiser trained to predict the velocity, sampled by the flow steps."""
    d = Path(directory) if directory else WEIGHTS / "shapes-flow"
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no shapes-flow model weights in {d}; train them with: rewardiff pretrain shapes-flow")
    return shapes_model(d)


def shapes_geneval_model(directory: str | Path | None = None):
    """The shapes world's flow model of the GenEval grammar (``rewardiff pretrain shapes-geneval``):
    the shapes-flow network with the larger vocabulary, trained on the six tasks' prompts."""
    d = Path(directory) if directory else WEIGHTS / "shapes-geneval"
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no shapes-geneval model weights in {d}; train them with: rewardiff pretrain shapes-geneval")
    model = shapes_model(d)
    model.name = "shapes-geneval"
    return model


def is_shapes_dir(directory: str | Path) -> bool:
    """Whether ``directory`` is a folder to read as a shapes model (the last reader tried: any folder)."""
    return Path(directory).is_dir()
