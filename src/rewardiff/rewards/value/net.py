"""Value networks ``v(x_t, t, c) -> predicted final reward [B]`` and the features they share.

Two networks, one contract: ``standardized(x_t, t, cond)`` is the head's output in
standardized target units, ``forward`` maps it back to reward units with the buffers
``target_mean`` and ``target_std``, and ``config()`` is what ``net_from_config`` rebuilds it
from.

- ``ValueNet``: float states of a Gaussian process, images [B, C, H, W] (a small CNN) or
  vectors [B, d] (an MLP), modulated by FiLM from a time + condition embedding.
- ``TokenValueNet``: token states of a masked discrete process, ids [B, L] or one-hot /
  relaxed probabilities [B, L, V] (a small bidirectional transformer, the mask id included).

``value_net_for(model, ...)`` picks the one that fits a model's process.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.types import Timestep

if TYPE_CHECKING:
    from rewardiff.models.base import DiffusionModel

IMAGE_WIDTHS = (32, 64, 64)  # CNN channels at full, 1/2 and 1/4 resolution
VECTOR_WIDTHS = (128, 128, 128)  # MLP hidden widths for vector states
TOKEN_WIDTHS = (64, 64)  # transformer width, one entry per layer (all equal)
HEADS = 4  # attention heads per transformer layer
EMB_DIM = 128  # width of the time + condition embedding
IMAGE_GRID = 4  # an image condition is averaged onto IMAGE_GRID x IMAGE_GRID cells
TIME_FREQS = 32  # sinusoid frequencies of the time embedding (64 features)
KIND = "tokens"  # the ``kind`` field of value.json for a TokenValueNet (no ``kind``: a ValueNet)


# ----------------------------------------------------------------------------- features


def pool_cond(cond: Any) -> Tensor:
    """A model condition -> one float vector per row [B, D].

    Args:
        cond: token states [B, L, D] (averaged over the tokens), a vector [B, D] (as is),
            one number per row [B] (read as [B, 1]), an image [B, C, H, W] (averaged onto a
            4 x 4 grid, so where things are survives: [B, 16 C]; the x4 upscaler's low-res
            input), or a dict of these (each pooled, then joined in key order).

    Raises:
        TypeError: a condition that is not a tensor, or one with more than 4 dimensions.
    """
    if isinstance(cond, dict):  # e.g. SDXL: token states, pooled text embedding, micro-conditioning
        return torch.cat([pool_cond(cond[k]) for k in sorted(cond)], dim=1)
    if not isinstance(cond, Tensor):
        raise TypeError(f"a value model needs a tensor condition, got {type(cond).__name__}")
    c = cond if cond.is_floating_point() else cond.float()
    if c.dim() == 4:
        return torch.nn.functional.adaptive_avg_pool2d(c, IMAGE_GRID).flatten(1)
    if c.dim() == 3:
        return c.mean(dim=1)
    if c.dim() == 2:
        return c
    if c.dim() == 1:
        return c[:, None]
    raise TypeError(f"cannot pool a condition of shape {tuple(cond.shape)}; expected [B, L, D], [B, D], [B] or [B, C, H, W]")


def time_embedding(t: Tensor, freqs: int = TIME_FREQS, max_period: float = 10_000.0) -> Tensor:
    """Sinusoidal features of the training timesteps. t [B] -> [B, 2 * freqs]"""
    k = torch.arange(freqs, device=t.device, dtype=torch.float32)
    omega = torch.exp(-math.log(max_period) * k / freqs)  # [freqs], 1 .. 1/max_period
    arg = t.float()[:, None] * omega[None]
    return torch.cat([torch.sin(arg), torch.cos(arg)], dim=1)


def positions(length: int, dim: int) -> Tensor:
    """Fixed sinusoidal position features [L, D] (frequencies 1 down to 1/1000)."""
    half = dim // 2
    freqs = torch.exp(-math.log(1000.0) * torch.arange(half) / half)  # [D/2]
    angles = torch.arange(length).float()[:, None] * freqs[None]  # [L, D/2]
    return torch.cat([angles.sin(), angles.cos()], 1)


def batch_times(t: Timestep | Tensor, B: int, device: torch.device) -> Tensor:
    """One timestep for the batch, or one per row -> [B]."""
    tt = torch.as_tensor(t, device=device)
    return tt.reshape(-1).expand(B) if tt.numel() == 1 else tt.reshape(B)


def pooled_rows(cond: Any, B: int, cond_dim: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The pooled condition [B, D], checked against the width the network was built for."""
    c = pool_cond(cond).to(device, dtype)
    if c.shape != (B, cond_dim):
        raise ValueError(f"condition pools to {tuple(c.shape)}; this value model expects ({B}, {cond_dim})")
    return c


class FiLM(nn.Module):
    """Feature-wise scale and shift from an embedding, starting as the identity.

    Args:
        emb_dim: width of the embedding [B, E].
        channels: features modulated; ``h`` is [B, C] or [B, C, H, W].
    """

    def __init__(self, emb_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(emb_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        scale, shift = self.proj(emb).chunk(2, dim=1)  # [B, C] each
        if h.dim() == 4:
            scale, shift = scale[:, :, None, None], shift[:, :, None, None]
        return h * (1 + scale) + shift


def _groups(channels: int) -> int:
    return 8 if channels % 8 == 0 else 1


def _head(features: int, emb_dim: int) -> nn.Sequential:
    """features -> emb_dim -> 1, the last layer zero so the net starts at the target mean."""
    head = nn.Sequential(nn.Linear(features, emb_dim), nn.SiLU(), nn.Linear(emb_dim, 1))
    nn.init.zeros_(head[-1].weight)
    nn.init.zeros_(head[-1].bias)
    return head


# ----------------------------------------------------------------------------- float states


class ValueNet(nn.Module):
    """Time- and prompt-conditioned regressor ``(x_t, t, cond) -> predicted final reward [B]``.

    Videos [B, C, F, H, W] are read as images of C * F channels (the frames stacked on the
    channels: a small value net that sees the whole clip at once).
    Images [B, C, H, W]: a 3x3 convolution at full resolution, one stride-2 convolution per
    further width (so (32, 64, 64) halves the resolution twice), one more convolution at the
    last width; each followed by GroupNorm, FiLM from the embedding, and SiLU; then global
    average pooling. GroupNorm discards each sample's overall intensity, so the head also
    reads the input's per-channel mean and standard deviation [B, 2C] (what brightness- or
    contrast-like rewards depend on), standardized by the buffers ``stat_mean`` and
    ``stat_std`` [2C] (set by training from its states), besides the pooled features and
    the embedding.
    Vectors [B, d]: linear layers with FiLM and SiLU (no normalization, which would discard
    the state's scale). The embedding is an MLP of the sinusoidal time features plus a
    linear map of the pooled condition.

    The head predicts standardized targets; ``forward`` maps them back to reward units with
    the buffers ``target_mean`` and ``target_std`` (set by training, saved with the weights).

    Args:
        shape: one state's shape, (C, H, W) for images, (C, F, H, W) for videos or (d,) for vectors.
        cond_dim: D of the pooled condition [B, D].
        in_channels: image channels (default ``shape[0]``); ignored for vectors.
        widths: channels (images) or hidden widths (vectors); defaults (32, 64, 64) and (128, 128, 128).
        emb_dim: width of the time + condition embedding.
    """

    def __init__(self, shape: tuple[int, ...], cond_dim: int, *, in_channels: int | None = None,
                 widths: tuple[int, ...] | None = None, emb_dim: int = EMB_DIM):
        super().__init__()
        shape = tuple(int(s) for s in shape)
        if len(shape) not in (1, 3, 4):
            raise ValueError(f"ValueNet takes images (C, H, W), videos (C, F, H, W) or vectors (d,), got shape {shape}")
        if cond_dim < 1:
            raise ValueError(f"cond_dim must be at least 1, got {cond_dim}")
        self.shape, self.cond_dim, self.emb_dim = shape, int(cond_dim), int(emb_dim)
        self.image = len(shape) >= 3
        frames = shape[1] if len(shape) == 4 else 1
        self.in_channels = int(in_channels if in_channels is not None else shape[0] * frames) if self.image else shape[0]
        self.widths = tuple(int(w) for w in (widths or (IMAGE_WIDTHS if self.image else VECTOR_WIDTHS)))
        if not self.widths:
            raise ValueError("widths must name at least one layer width")

        self.time_mlp = nn.Sequential(nn.Linear(2 * TIME_FREQS, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.cond_proj = nn.Linear(self.cond_dim, emb_dim)
        self._body()
        stats = 2 * self.in_channels if self.image else 0  # per-channel mean and std of the input
        self.head = _head(self.widths[-1] + stats + emb_dim, emb_dim)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))
        self.register_buffer("stat_mean", torch.zeros(stats))
        self.register_buffer("stat_std", torch.ones(stats))

    def _body(self) -> None:
        """``layers``, ``norms`` and ``films``: the CNN for images, the MLP for vectors."""
        layers, norms, films = [], [], []
        if self.image:
            plan = [(self.in_channels, self.widths[0], 1)]
            plan += [(a, b, 2) for a, b in zip(self.widths[:-1], self.widths[1:])]
            plan += [(self.widths[-1], self.widths[-1], 1)]
            for c_in, c_out, stride in plan:
                layers.append(nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1))
                norms.append(nn.GroupNorm(_groups(c_out), c_out))
                films.append(FiLM(self.emb_dim, c_out))
        else:
            dims = [self.in_channels, *self.widths]
            for c_in, c_out in zip(dims[:-1], dims[1:]):
                layers.append(nn.Linear(c_in, c_out))
                norms.append(nn.Identity())
                films.append(FiLM(self.emb_dim, c_out))
        self.layers, self.norms, self.films = nn.ModuleList(layers), nn.ModuleList(norms), nn.ModuleList(films)

    def config(self) -> dict:
        """What ``ValueNet(**config)`` needs to rebuild this architecture."""
        return {"shape": list(self.shape), "cond_dim": self.cond_dim, "in_channels": self.in_channels,
                "widths": list(self.widths), "emb_dim": self.emb_dim}

    def input_stats(self, x: Tensor) -> Tensor:
        """Per-channel mean and standard deviation of images, before standardization. [B, C, H, W] -> [B, 2C]
        (videos [B, C, F, H, W]: per channel of each frame, [B, 2 C F])."""
        if x.dim() == 5:
            x = x.flatten(1, 2)
        return torch.cat([x.mean(dim=(2, 3)), (x.var(dim=(2, 3), unbiased=False) + 1e-8).sqrt()], dim=1)

    def embed(self, t: Tensor, cond: Tensor) -> Tensor:
        """Time [B] and pooled condition [B, D] -> embedding [B, E]."""
        return self.time_mlp(time_embedding(t)) + self.cond_proj(cond)

    def standardized(self, x_t: Tensor, t: Timestep | Tensor, cond: Any) -> Tensor:
        """The head's output in standardized target units [B]; see ``forward`` for the arguments."""
        B = x_t.shape[0]
        dtype = self.target_mean.dtype
        x = x_t.to(dtype)
        if x.dim() == 5:  # a video [B, C, F, H, W]: its frames stacked on the channels
            x = x.flatten(1, 2)
        emb = self.embed(batch_times(t, B, x.device), pooled_rows(cond, B, self.cond_dim, x.device, dtype))  # [B, E]
        h = x
        for layer, norm, film in zip(self.layers, self.norms, self.films):
            h = F.silu(film(norm(layer(h)), emb))
        feats = [h]
        if self.image:
            feats = [h.mean(dim=(2, 3)), (self.input_stats(x) - self.stat_mean) / self.stat_std]
        return self.head(torch.cat([*feats, emb], dim=1)).squeeze(1)

    def forward(self, x_t: Tensor, t: Timestep | Tensor, cond: Any) -> Tensor:
        """Predicted final reward, in reward units.

        Args:
            x_t: noisy states [B, C, H, W], [B, C, F, H, W] or [B, d].
            t: their training timestep, one int for the batch or a tensor [B].
            cond: the model condition of the B rows ([B, L, D], [B, D] or [B]; pooled here).

        Returns:
            Float [B].
        """
        return self.standardized(x_t, t, cond) * self.target_std + self.target_mean


# ----------------------------------------------------------------------------- token states


class TokenValueNet(nn.Module):
    """Time- and condition-aware regressor ``(x_t tokens, t, cond) -> predicted final reward [B]``.

    x_t is read as token ids [B, L] (the mask id is a token like any other: "still masked"
    is information) or as one-hot / relaxed probabilities [B, L, V], so gradients reach
    relaxed inputs. A small bidirectional transformer:

    1. the time + condition embedding e = MLP(sinusoid(t)) + W_c pool(cond)   [B, E]
    2. token states h = onehot(x_t) W_tok + pos + W_e e                       [B, L, D]
       (W_tok [V, D] is an embedding that also reads probabilities; pos fixed sinusoids)
    3. pre-norm transformer encoder layers, a final LayerNorm, mean over positions [B, D]
    4. head([pooled, token shares, e]) -> 1, where the token shares [B, V] are the fraction of
       positions holding each id (the mask included). Composition-like rewards depend on them,
       and for a reward that counts tokens the exact value E[r | x_t] is linear in them.

    Args:
        vocab_size: V, the token ids (the mask id included).
        length: L, the sequence length.
        cond_dim: D of the pooled condition [B, D] (1 for unconditional models).
        widths: the transformer width once per layer; all equal (default (64, 64)).
        heads: attention heads (must divide the width).
        emb_dim: width of the time + condition embedding.
    """

    image = False  # no input statistics to standardize

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
        self.head = _head(dim + self.vocab_size + emb_dim, emb_dim)
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

    def standardized(self, x_t: Tensor, t: Timestep | Tensor, cond: Any) -> Tensor:
        """The head's output in standardized target units [B]; see ``forward`` for the arguments."""
        oh = self.one_hot(x_t)  # [B, L, V]
        B = oh.shape[0]
        tt = batch_times(t, B, oh.device)
        c = pooled_rows(cond, B, self.cond_dim, oh.device, oh.dtype)
        emb = self.time_mlp(time_embedding(tt)) + self.cond_proj(c)  # 1. [B, E]
        h = self.tok(oh) + self.pos + self.emb_proj(emb)[:, None]  # 2. [B, L, D]
        pooled = self.norm(self.encoder(h)).mean(1)  # 3. [B, D]
        return self.head(torch.cat([pooled, oh.mean(1), emb], 1)).squeeze(1)  # 4. [B]

    def forward(self, x_t: Tensor, t: Timestep | Tensor, cond: Any) -> Tensor:
        """Predicted final reward, in reward units.

        Args:
            x_t: token ids [B, L] (long) or one-hot / probabilities [B, L, V] (float).
            t: their training timestep, one int for the batch or a tensor [B].
            cond: the model condition of the B rows ([B, L', D], [B, D] or [B]; pooled here).

        Returns:
            Float [B].
        """
        return self.standardized(x_t, t, cond) * self.target_std + self.target_mean


AnyValueNet = Union[ValueNet, TokenValueNet]  # what train_value fits and load_value returns inside LearnedValue


# ----------------------------------------------------------------------------- picking a network


def value_net_for(model: DiffusionModel, shape: tuple[int, ...], cond_dim: int,
                  widths: tuple[int, ...] | None = None) -> AnyValueNet:
    """The value network for ``model``'s states: a ``TokenValueNet`` when its process is
    discrete (it has a ``vocab_size``; states are ids [L]), else a ``ValueNet`` of ``shape``.

    Raises:
        UserError: token states that are not ids [L], or widths a token network cannot take.
    """
    vocab = getattr(model.process, "vocab_size", None)
    if vocab is None:
        return ValueNet(shape, cond_dim, widths=widths)
    if len(shape) != 1:
        raise UserError(f"a value model of token states needs ids [L] per sample; model {model.name!r} has states of shape {shape}")
    try:
        return TokenValueNet(int(vocab), shape[0], cond_dim, widths=widths)
    except ValueError as e:
        raise UserError(f"widths: {e}") from None


def net_from_config(config: dict) -> AnyValueNet:
    """The architecture ``value.json`` describes: ``kind: tokens`` a ``TokenValueNet``, no ``kind``
    a ``ValueNet`` (ValueError, KeyError or TypeError when it cannot)."""
    kind = config.get("kind")
    if kind == KIND:
        return TokenValueNet.from_config(config)
    if kind is not None:
        raise ValueError(f"unknown kind {kind!r} (known: {KIND}, or none for float states)")
    return ValueNet(
        tuple(config["shape"]), int(config["cond_dim"]), in_channels=int(config["in_channels"]),
        widths=tuple(config["widths"]), emb_dim=int(config.get("emb_dim", EMB_DIM)),
    )
