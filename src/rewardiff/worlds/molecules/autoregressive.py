"""The molecules world's autoregressive generator: a small causal transformer over SELFIES tokens.

``ARTransformer(x, cache) -> (logits, cache)`` reads token ids [B, T] or token probabilities
[B, T, V] (one-hot rows, or Gumbel-softmax relaxations whose gradient flows back through the
input embedding: ``probs @ embedding.weight``) and predicts the next token at each position.

Start of sequence: the tokenizer's ``<mask>`` id, which no molecule holds, serves as the
start token (BOS). Position 0 reads BOS and predicts the first symbol; position i reads
symbol i and predicts symbol i + 1, so L positions predict the L tokens of a molecule. The
sampler (:class:`rewardiff.models.tokens.TokenModel`) never draws ``<mask>`` and makes
``<pad>`` absorbing: after the first pad every token is pad.

``cache`` holds each layer's keys and values (a list of (k, v) pairs), so that sampling one
token at a time costs one position per step (with gradient, in Gumbel-softmax fine-tuning).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from rewardiff.worlds import WEIGHTS as SHIPPED_WEIGHTS


FORMAT = "rewardiff-molecules-ar"  # the ``format`` field of config.json
WEIGHTS = SHIPPED_WEIGHTS / "molecules-ar"
LORA_TARGETS = ["qkv", "proj", "fc1", "fc2"]  # the Linear layers of every block

Cache = list[tuple[Tensor, Tensor]]


@dataclass
class ARModelConfig:
    vocab_size: int = 41  # V, special tokens included
    max_len: int = 56  # L, the fixed sequence length (positions of the embedding)
    bos_id: int = 1  # the start token: the tokenizer's <mask> id
    dim: int = 128  # width of the token states
    layers: int = 3  # transformer blocks
    heads: int = 4  # attention heads
    ff_mult: int = 4  # feed-forward width = ff_mult * dim
    dropout: float = 0.1  # dropout after attention and feed-forward (training only)


class Block(nn.Module):
    """Pre-norm causal self-attention and feed-forward, with a key/value cache."""

    def __init__(self, c: ARModelConfig):
        super().__init__()
        self.heads = c.heads
        self.norm1, self.norm2 = nn.LayerNorm(c.dim), nn.LayerNorm(c.dim)
        self.qkv, self.proj = nn.Linear(c.dim, 3 * c.dim), nn.Linear(c.dim, c.dim)
        self.fc1, self.fc2 = nn.Linear(c.dim, c.ff_mult * c.dim), nn.Linear(c.ff_mult * c.dim, c.dim)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, h: Tensor, past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).split(D, dim=-1)
        q, k, v = (z.view(B, T, self.heads, D // self.heads).transpose(1, 2) for z in (q, k, v))  # (B, nh, T, hs)
        if past is not None:  # one new position, which sees every cached one
            if T != 1:
                raise ValueError("with a cache, feed one position at a time")
            k, v = torch.cat([past[0], k], 2), torch.cat([past[1], v], 2)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=past is None)  # (B, nh, T, hs)
        h = h + self.drop(self.proj(a.transpose(1, 2).reshape(B, T, D)))
        h = h + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(h)))))
        return h, (k, v)


class ARTransformer(nn.Module):
    """``forward(x [B, T] ids or [B, T, V] probabilities, cache) -> (logits [B, T, V], cache)``."""

    def __init__(self, config: ARModelConfig | None = None):
        super().__init__()
        self.config = c = config or ARModelConfig()
        self.tok = nn.Embedding(c.vocab_size, c.dim)
        self.pos = nn.Parameter(torch.randn(c.max_len, c.dim) * 0.02)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.layers))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.vocab_size)

    def embed(self, x: Tensor) -> Tensor:
        """Token embeddings [B, T, D] of ids [B, T] or of probabilities [B, T, V] (``probs @ weight``)."""
        if x.is_floating_point():
            return x.to(self.tok.weight.dtype) @ self.tok.weight
        return self.tok(x)

    def forward(self, x: Tensor, cache: Cache | None = None) -> tuple[Tensor, Cache]:
        start = 0 if cache is None else cache[0][0].shape[2]
        T = x.shape[1]
        if start + T > self.config.max_len:
            raise ValueError(f"positions {start}..{start + T - 1} exceed max_len {self.config.max_len}")
        h = self.embed(x) + self.pos[start : start + T]  # [B, T, D]
        new: Cache = []
        for i, block in enumerate(self.blocks):
            h, kv = block(h, None if cache is None else cache[i])
            new.append(kv)
        return self.head(self.norm(h)), new  # [B, T, V]

    # ------------------------------------------------------------------ persistence

    def save(self, directory: str | Path) -> None:
        """Write ``model.safetensors`` and ``config.json`` (atomically) into ``directory``."""
        from rewardiff.io import save_module

        save_module(directory, self, {"format": FORMAT, **asdict(self.config)})

    @classmethod
    def load(cls, directory: str | Path) -> ARTransformer:
        """Read a model written by :meth:`save` (in eval mode).

        Raises:
            UserError: missing or malformed files.
        """
        from rewardiff.io import load_module

        return load_module(directory, FORMAT, lambda **c: cls(ARModelConfig(**c)),
                           f"no molecules autoregressive model in {Path(directory)} (expected model.safetensors and "
                           "config.json); train one with: rewardiff pretrain molecules-ar")


def is_ar_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a saved :class:`ARTransformer`."""
    from rewardiff.io import is_module_dir

    return is_module_dir(directory, FORMAT)


def molecules_ar_model(directory: str | Path | None = None):
    """The molecules world's autoregressive model (shipped weights unless ``directory``), as a
    :class:`~rewardiff.models.tokens.TokenModel`.

    Raises:
        UserError: no weights, or a tokenizer that does not fit them.
    """
    from rewardiff.models.tokens import TokenModel
    from rewardiff.worlds.molecules import data as molecules

    d = Path(directory) if directory else WEIGHTS
    net = ARTransformer.load(d)
    c = net.config
    tok = molecules.model_tokenizer(d, c.vocab_size, c.max_len, c.bos_id)
    return TokenModel(net, tok, name="molecules-ar", lora_targets=LORA_TARGETS, world="molecules")
