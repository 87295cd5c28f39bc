"""The molecules world's masked-diffusion denoiser: a small bidirectional transformer.

``MaskedDenoiser(x_t [B, L] long, t [B], cond) -> logits [B, L, V]`` over SELFIES token ids:
token embeddings plus fixed sinusoidal positions, plus an embedding of the continuous time
s = (t + 1) / N (its last layer starts at zero) added to every token state, then a pre-norm
transformer encoder. Molecules are unconditional: the condition is a zeros tensor [B, 1] that the net
ignores (it exists so that the rollout's condition handling works unchanged), and
classifier-free guidance does not apply.

Every call computes the same way, in eval or train mode, with or without gradient, so that LoRA
adapters take effect and a model and its frozen copy agree to the bit (a KL to the base of
exactly 0 when nothing has changed):

1. The encoder runs PyTorch's per-operation path, never the fused "fast path" that
   ``nn.TransformerEncoderLayer`` takes in eval mode without gradient: the fused kernel reads
   the layers' weights directly and so skips LoRA adapters (which act in the layers' forward
   calls), and it rounds differently (~1e-7) from the path that runs with gradient.
2. The layers read sequence-first states [L, B, D], contiguous: a batch-first layer hands the
   attention's input projection a strided [L, B, D] view, and PyTorch's matmul then takes a
   route that depends on whether the weights require grad (frozen copy or not), which rounds
   differently again.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.processes.masked import MaskedProcess
from rewardiff.worlds import WEIGHTS as SHIPPED_WEIGHTS

FORMAT = "rewardiff-masked-denoiser"  # the ``format`` field of config.json
WEIGHTS = SHIPPED_WEIGHTS / "molecules-mdm"
# what LoRA adapts in every encoder layer: the attention's query/key/value projection (a parameter
# of nn.MultiheadAttention, adapted through peft's parameter targeting) and the feed-forward layers.
# The attention's out_proj is left alone: MultiheadAttention never calls its forward, and peft's
# wrapper of the whole attention merges and unmerges the base weights in place at every call,
# which drifts the frozen weights by rounding (no bit-identical resume).
LORA_TARGETS = ["self_attn.in_proj_weight", "linear1", "linear2"]


@dataclass
class MaskedModelConfig:
    vocab_size: int = 41  # V, special tokens included
    max_len: int = 56  # L, the fixed sequence length
    mask_id: int = 1  # the absorbing mask token
    dim: int = 128  # width of the token states
    layers: int = 3  # transformer encoder layers
    heads: int = 4  # attention heads
    ff_mult: int = 4  # feed-forward width = ff_mult * dim
    dropout: float = 0.0  # dropout inside the transformer layers (training only)
    schedule: str = "linear"  # masking schedule of the process: linear or cosine
    num_train_timesteps: int = 1000  # N, training timesteps of the process


@contextmanager
def per_op_path() -> Iterator[None]:
    """PyTorch's fused transformer fast path off while active (a global switch; restored after)."""
    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def sinusoidal(p: Tensor, dim: int) -> Tensor:
    """Sinusoidal features [B, dim] of positions p [B] (frequencies 1 down to 1/1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half, device=p.device) / half)
    angles = p.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([angles.sin(), angles.cos()], 1)


class MaskedDenoiser(nn.Module):
    """``forward(x_t [B, L] long, t [B], cond) -> logits [B, L, V]`` (cond is ignored)."""

    def __init__(self, config: MaskedModelConfig | None = None):
        super().__init__()
        self.config = c = config or MaskedModelConfig()
        self.tok = nn.Embedding(c.vocab_size, c.dim)
        self.register_buffer("pos", sinusoidal(torch.arange(c.max_len), c.dim), persistent=False)  # [L, D]
        self.time = nn.Sequential(nn.Linear(c.dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        nn.init.zeros_(self.time[2].weight)  # time starts silent: it must not drown tokens and positions
        nn.init.zeros_(self.time[2].bias)
        layer = nn.TransformerEncoderLayer(c.dim, c.heads, c.ff_mult * c.dim, c.dropout, activation="gelu",
                                           batch_first=False, norm_first=True)  # sequence-first: see the module doc
        self.encoder = nn.TransformerEncoder(layer, c.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        B, L = x_t.shape
        t = torch.as_tensor(t, device=x_t.device).expand(B)
        s = (t.float() + 1) / self.config.num_train_timesteps  # [B]
        h = self.tok(x_t) + self.pos[:L] + self.time(sinusoidal(1000.0 * s, self.config.dim))[:, None]  # [B, L, D]
        h = h.transpose(0, 1).contiguous()  # [L, B, D]: module doc, step 2
        with per_op_path():  # module doc, step 1
            for layer in self.encoder.layers:  # = self.encoder(h), whose own checks read attributes a LoRA wrapper hides
                h = layer(h)  # [L, B, D]
        return self.head(self.norm(h.transpose(0, 1)))  # [B, L, V]

    def encode(self, prompts: list[str]) -> Tensor:
        """The (empty) condition of unconditional sampling: zeros [B, 1]."""
        return torch.zeros(len(prompts), 1, device=self.head.weight.device)

    def process(self) -> MaskedProcess:
        c = self.config
        return MaskedProcess(c.vocab_size, c.mask_id, c.schedule, c.num_train_timesteps)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (atomically) into ``directory``."""
        from rewardiff.io import save_module

        save_module(directory, self, {"format": FORMAT, **asdict(self.config)})

    @classmethod
    def load(cls, directory: str | Path) -> MaskedDenoiser:
        """Read a denoiser written by :meth:`save` (in eval mode).

        Raises:
            UserError: missing or malformed files.
        """
        from rewardiff.io import load_module

        return load_module(directory, FORMAT, lambda **c: cls(MaskedModelConfig(**c)),
                           f"no masked-diffusion model in {Path(directory)} (expected model.safetensors and config.json)")


def is_masked_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved :class:`MaskedDenoiser`."""
    from rewardiff.io import is_module_dir

    return is_module_dir(directory, FORMAT)


def molecules_model(directory: str | Path | None = None):
    """The molecules world's masked-diffusion model (shipped weights unless ``directory``).

    Samples are SELFIES token ids [B, L]; x_T is all mask. ``output`` returns its input
    unchanged (ids stay ids; x0_hat probabilities [B, L, V] stay probabilities, which the
    chemistry rewards read by argmax); ``texts`` decodes ids to canonical SMILES.
    """
    from rewardiff.models.base import DiffusionModel
    from rewardiff.worlds.molecules import data as molecules

    d = Path(directory) if directory else WEIGHTS
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no molecules model weights in {d}; train them with: rewardiff pretrain molecules")
    net = MaskedDenoiser.load(d)
    c = net.config
    tok = molecules.model_tokenizer(d, c.vocab_size, c.max_len, c.mask_id)
    return DiffusionModel(net, net.process(), net.encode, (c.max_len,), name="molecules", world="molecules", output_range=None,
                          conditional=False, texts=tok.decode_batch, lora_targets=LORA_TARGETS)
