"""A value network over the token states of masked discrete diffusion (SVDD-MC on tokens).

``TokenValueNet(x_t, t, cond) -> predicted final reward [B]`` reads x_t as token ids [B, L]
(the mask id is a token like any other: "still masked" is information) or as one-hot /
relaxed probabilities [B, L, V], so gradients reach relaxed inputs. It is the token-state
counterpart of :class:`~rewardiff.guidance.value.ValueNet` and shares its contract:
``standardized`` gives the head's output in standardized target units, ``forward`` maps it
back to reward units with the buffers ``target_mean`` and ``target_std``, and ``config()``
is what ``load_value`` rebuilds it from (``kind: tokens`` in ``value.json``).

Architecture (a small bidirectional transformer, like the molecules denoiser but narrower):

1. the time + condition embedding e = MLP(sinusoid(t)) + W_c pool(cond)   [B, E]
2. token states h = onehot(x_t) W_tok + pos + W_e e                       [B, L, D]
   (W_tok [V, D] is an embedding that also reads probabilities; pos fixed sinusoids)
3. pre-norm transformer encoder layers, a final LayerNorm, mean over positions [B, D]
4. head([pooled, token shares, e]) -> 1, where the token shares [B, V] are the fraction of
   positions holding each id (the mask included). Composition-like rewards depend on them,
   and for a reward that counts tokens the exact value E[r | x_t] is linear in them.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.guidance.value import EMB_DIM, TIME_FREQS, pool_cond, time_embedding

KIND = "tokens"  # the ``kind`` field of value.json for this network
TOKEN_WIDTHS = (64, 64)  # transformer width, one entry per layer (all equal)
HEADS = 4  # attention heads per layer


def positions(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal position features [L, D] (frequencies 1 down to 1/1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)  # [D/2]
    angles = torch.arange(length).float()[:, None] * freqs[None]  # [L, D/2]
    return torch.cat([angles.sin(), angles.cos()], 1)


class TokenValueNet(nn.Module):
    """Time- and condition-aware regressor ``(x_t tokens, t, cond) -> predicted final reward [B]``.

    Args:
        vocab_size: V, the token ids (the mask id included).
        length: L, the sequence length.
        cond_dim: D of the pooled condition [B, D] (1 for unconditional models).
        widths: the transformer width once per layer; all equal (default (64, 64)).
        heads: attention heads (must divide the width).
        emb_dim: width of the time + condition embedding.
    """

    image = False  # no input statistics to standardize (``train_value`` asks)

    def __init__(self, vocab_size: int, length: int, cond_dim: int, *, widths: tuple[int, ...] | None = None,
                 heads: int = HEADS, emb_dim: int = EMB_DIM):
        super().__init__()
        self.widths = tuple(int(w) for w in (widths or TOKEN_WIDTHS))
        if not self.widths or len(set(self.widths)) != 1:
            raise ValueError(f"a token value net needs one width repeated per layer, e.g. (64, 64); got {self.widths}")
        dim = self.widths[0]
        if vocab_size < 2 or length < 1 or cond_dim < 1:
            raise ValueError(f"vocab_size >= 2, length >= 1 and cond_dim >= 1 needed; got {vocab_size}, {length}, {cond_dim}")
        if dim % heads:
            raise ValueError(f"heads ({heads}) must divide the width ({dim})")
        self.vocab_size, self.length, self.cond_dim = int(vocab_size), int(length), int(cond_dim)
        self.heads, self.emb_dim = int(heads), int(emb_dim)
        self.shape = (self.length,)

        self.time_mlp = nn.Sequential(nn.Linear(2 * TIME_FREQS, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(self.cond_dim, emb_dim)
        self.tok = nn.Linear(self.vocab_size, dim, bias=False)  # an embedding that also reads probabilities
        self.emb_proj = nn.Linear(emb_dim, dim)
        self.register_buffer("pos", positions(self.length, dim), persistent=False)  # [L, D]
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, 0.0, activation="gelu", batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, len(self.widths), enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Sequential(nn.Linear(dim + self.vocab_size + emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, 1))
        nn.init.zeros_(self.head[-1].weight)  # starts at the target mean
        nn.init.zeros_(self.head[-1].bias)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def config(self) -> dict:
        """What ``TokenValueNet.from_config`` needs to rebuild this architecture."""
        return {"kind": KIND, "shape": [self.length], "vocab_size": self.vocab_size, "cond_dim": self.cond_dim,
                "widths": list(self.widths), "heads": self.heads, "emb_dim": self.emb_dim}

    @classmethod
    def from_config(cls, config: dict) -> TokenValueNet:
        """The network ``config()`` describes (weights left at their initialization)."""
        return cls(int(config["vocab_size"]), int(config["shape"][0]), int(config["cond_dim"]),
                   widths=tuple(config["widths"]), heads=int(config.get("heads", HEADS)),
                   emb_dim=int(config.get("emb_dim", EMB_DIM)))

    def one_hot(self, x_t: Tensor) -> Tensor:
        """Token ids [B, L] or probabilities [B, L, V] -> float rows [B, L, V]."""
        dtype = self.target_mean.dtype
        if x_t.is_floating_point():
            if tuple(x_t.shape[1:]) != (self.length, self.vocab_size):
                raise ValueError(f"token probabilities of shape {tuple(x_t.shape)}; "
                                 f"this value model expects (B, {self.length}, {self.vocab_size})")
            return x_t.to(dtype)
        if tuple(x_t.shape[1:]) != (self.length,):
            raise ValueError(f"token ids of shape {tuple(x_t.shape)}; this value model expects (B, {self.length})")
        return F.one_hot(x_t.long(), self.vocab_size).to(dtype)

    def standardized(self, x_t: Tensor, t: int | Tensor, cond: Any) -> Tensor:
        """The head's output in standardized target units [B]; see ``forward`` for the arguments."""
        oh = self.one_hot(x_t)  # [B, L, V]
        B = oh.shape[0]
        tt = torch.as_tensor(t, device=oh.device)
        tt = tt.reshape(-1).expand(B) if tt.numel() == 1 else tt.reshape(B)
        c = pool_cond(cond).to(oh.device, oh.dtype)
        if c.shape != (B, self.cond_dim):
            raise ValueError(f"condition pools to {tuple(c.shape)}; this value model expects ({B}, {self.cond_dim})")
        emb = self.time_mlp(time_embedding(tt)) + self.cond_proj(c)  # 1. [B, E]
        h = self.tok(oh) + self.pos + self.emb_proj(emb)[:, None]  # 2. [B, L, D]
        pooled = self.norm(self.encoder(h)).mean(1)  # 3. [B, D]
        return self.head(torch.cat([pooled, oh.mean(1), emb], 1)).squeeze(1)  # 4. [B]

    def forward(self, x_t: Tensor, t: int | Tensor, cond: Any) -> Tensor:
        """Predicted final reward, in reward units.

        Args:
            x_t: token ids [B, L] (long) or one-hot / probabilities [B, L, V] (float).
            t: their training timestep, one int for the batch or a tensor [B].
            cond: the model condition of the B rows ([B, L', D], [B, D] or [B]; pooled here).

        Returns:
            Float [B].
        """
        return self.standardized(x_t, t, cond) * self.target_std + self.target_mean


__all__ = ["TokenValueNet", "TOKEN_WIDTHS", "KIND", "positions"]
