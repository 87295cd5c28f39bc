"""The shapes world's learned reward model: a small CNN reading object count and color.

Built to be hard to fool (see DESIGN.md, shapes-world prototype findings): replicate padding
leaves no zero-padded border to exploit; global pooling (a summed density map for the count,
averaged features for the color) makes every location count alike; training covers mixed-kind
and degraded images labelled by the judge (``reward_data``, trained in ``reward_training``); label smoothing keeps it
calibrated; and the reward is a log-probability clamped below at log(0.02), so that hopeless
samples cannot dominate a fine-tuning gradient (they get no gradient at all).

Rewards: ``shapes-count`` (log p(asked count)) and ``shapes-color`` (log p(asked color)).
Count classes 0..3 stand for 1..4 objects, class 4 for "other" (no object, or more than 4).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.io import atomic_write
from rewardiff.rewards.base import RewardCallable, RewardFn
from rewardiff.worlds.shapes import data as shapes
from rewardiff.worlds import WEIGHTS

WEIGHTS_DIR = WEIGHTS / "shapes-rm"
LOG_FLOOR = math.log(0.02)  # the reward's lower clamp
LABEL_SMOOTHING = 0.1
N_COUNT, N_COLOR, OTHER = 5, len(shapes.COLORS), 4  # count classes: 1..4 objects, then "other"
MANY = 5.0  # the smallest object count of the "other" class besides 0
SHARPNESS_GAIN = 10.0  # the count sharpness is exp(gain * parameter): lets one scalar learn fast
SIZE = shapes.SIZE


# ----------------------------------------------------------------------------- the network


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    """3x3 convolution with replicate padding (no zero border to exploit), batch norm, SiLU."""
    return [nn.Conv2d(c_in, c_out, 3, padding=1, padding_mode="replicate"), nn.BatchNorm2d(c_out), nn.SiLU()]


def backbone(widths: tuple[int, int, int]) -> nn.Sequential:
    """The shapes reward models' feature stack: two blocks at each of 32, 16 and 8 px."""
    a, b, c = widths
    return nn.Sequential(
        *_block(3, a), *_block(a, a), nn.AvgPool2d(2),  # 32 -> 16
        *_block(a, b), *_block(b, b), nn.AvgPool2d(2),  # 16 -> 8
        *_block(b, c), *_block(c, c),
    )


def ordinal_counts(n: Tensor, s: Tensor, top: int) -> Tensor:
    """log P(count = k) for k = 0 .. top - 1 and log P(count >= top): [..., top + 1], from real
    counts ``n`` [...] by the cumulative-logit model P(count >= k) = sigmoid(s (n - k + 1/2))."""
    k = torch.arange(1, top + 1, device=n.device, dtype=n.dtype)
    ge = F.logsigmoid(s * (n[..., None] - k + 0.5))  # log P(n >= k), k = 1..top
    lt0 = F.logsigmoid(-s * (n - 0.5))  # log P(n < 1)
    mids = [ge[..., j] + torch.log(-torch.expm1((ge[..., j + 1] - ge[..., j]).clamp(max=-1e-6))) for j in range(top - 1)]
    return torch.stack([lt0, *mids, ge[..., -1]], dim=-1)


class ShapesRM(nn.Module):
    """CNN: image [B, 3, 32, 32] in [-1, 1] -> (count logits [B, 5], color logits [B, 4]).

    Backbone: two 3x3 convolutions (replicate padding, batch norm, SiLU) at each of 32x32,
    16x16 and 8x8 (channels ``widths``), average pooling between scales.

    Count head: a non-negative density map [B, 1, 8, 8] summed into a real-valued count n,
    turned into class log-probabilities by an ordinal model (:func:`ordinal_log_probs`) with a
    learned sharpness. Counting by summing a density counts objects of a kind or color never
    seen at that count (e.g. four triangles) where a plain classifier head falls back on how
    much of the image is covered.

    Color head: a linear layer on the globally averaged features.

    Args:
        widths: channels at the three scales.
    """

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64)):
        super().__init__()
        self.widths = tuple(widths)
        a, b, c = self.widths
        self.features = backbone(self.widths)
        self.density = nn.Conv2d(c, 1, 1)
        nn.init.constant_(self.density.bias, -4.0)  # starts near one object per image, not 44
        self.log_sharpness = nn.Parameter(torch.zeros(()))
        self.color_head = nn.Linear(c, N_COLOR)

    def expected_count(self, h: Tensor) -> Tensor:
        """Features [B, C, 8, 8] -> summed density [B]."""
        return F.softplus(self.density(h)).sum(dim=(1, 2, 3))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.features(x)  # [B, C, 8, 8]
        n = self.expected_count(h)  # [B]
        s = (SHARPNESS_GAIN * self.log_sharpness).exp()
        return ordinal_log_probs(n, s), self.color_head(h.mean(dim=(2, 3)))


def ordinal_log_probs(n: Tensor, s: Tensor) -> Tensor:
    """Log-probabilities [B, 5] of 1, 2, 3, 4 and "other" objects given a real count ``n`` [B].

    A cumulative-logit (ordinal) model: P(count >= k) = sigmoid(s (n - k + 1/2)), so
    P(count = k) = sigmoid(a) - sigmoid(a - s) with a = s (n - k + 1/2); "other" is
    P(0) + P(>= 5). Its tails fall linearly in |n - k|, not quadratically, so a few
    ambiguous training images do not force the sharpness ``s`` down for all the others.
    """
    k = torch.arange(1, N_COUNT, device=n.device, dtype=n.dtype)  # 1..4
    a = s * (n[:, None] - k + 0.5)  # [B, 4]
    exact = a + torch.log(-torch.expm1(-s)) - F.softplus(a) - F.softplus(a - s)  # log(sig(a) - sig(a - s))
    none = -F.softplus(s * (n - 0.5))  # log P(0)
    many = -F.softplus(-s * (n - (MANY - 0.5)))  # log P(>= 5)
    return torch.cat([exact, torch.logaddexp(none, many)[:, None]], dim=1)


def num_params(net: nn.Module) -> int:
    """Number of parameters of ``net``."""
    return sum(p.numel() for p in net.parameters())


# ----------------------------------------------------------------------------- save / load


def save_reward_model(net: ShapesRM, out_dir: str | Path, card: dict) -> Path:
    """Write ``model.safetensors`` (config in its metadata) and ``card.json`` atomically."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    meta = {"config": json.dumps({"widths": list(net.widths)})}
    atomic_write(out / "model.safetensors", lambda p: save_file(tensors, str(p), metadata=meta))
    atomic_write(out / "card.json", lambda p: p.write_text(json.dumps(card, indent=2) + "\n"))
    return out


def _weights_file(path: str | Path | None) -> Path:
    """The .safetensors file named by ``path`` (a directory holding ``model.safetensors`` or the file)."""
    p = Path(path) if path is not None else WEIGHTS_DIR
    return p / "model.safetensors" if p.is_dir() or p.suffix != ".safetensors" else p


def _check_exists(file: Path) -> None:
    if not file.is_file():
        raise UserError(f"shapes reward model weights not found: {file}; run `rewardiff train-reward` to train them")


_CACHE: dict[tuple[str, int, str], nn.Module] = {}


def load_saved(cls: type[nn.Module], file: Path, missing: str) -> nn.Module:
    """A CNN that :func:`save_reward_model` wrote: ``cls(widths)`` filled from ``file``, frozen,
    in eval mode, loaded once per file version; a UserError saying ``missing`` without the file."""
    if not file.is_file():
        raise UserError(missing)
    key = (str(file.resolve()), file.stat().st_mtime_ns, cls.__name__)
    if key not in _CACHE:
        with safe_open(str(file), framework="pt") as f:
            config = json.loads((f.metadata() or {}).get("config", "{}"))
            state = {k: f.get_tensor(k) for k in f.keys()}
        net = cls(tuple(config.get("widths", (32, 64, 64))))
        net.load_state_dict(state)
        _CACHE[key] = net.eval().requires_grad_(False)
    return _CACHE[key]


def load_reward_model(path: str | Path | None = None) -> ShapesRM:
    """The reward model at ``path`` (a directory or .safetensors file; shipped weights by default).

    Loaded once per file version and cached; frozen (no parameter gradients) and in eval mode.
    """
    file = _weights_file(path)
    return load_saved(ShapesRM, file, f"shapes reward model weights not found: {file}; run `rewardiff train-reward` to train them")


# ----------------------------------------------------------------------------- rewards


def _fit(x: Tensor) -> Tensor:
    """Images [B, 3, H, W] -> float32 [B, 3, 32, 32] (resized when H, W differ from 32)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"the shapes reward model takes RGB images [B, 3, H, W]; got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    return x


def _specs(prompts: list[str]) -> list[shapes.Spec]:
    try:
        return [shapes.parse_prompt(p) for p in prompts]
    except ValueError as e:
        raise UserError(f"shapes rewards need shapes-world prompts: {e}") from None


def _log_probs(net: ShapesRM, x: Tensor) -> tuple[Tensor, Tensor]:
    """Log-probabilities (count [B, 5], color [B, 4]) with the net on ``x``'s device."""
    net = net.to(x.device)
    count_logits, color_logits = net(_fit(x))
    return count_logits.log_softmax(-1), color_logits.log_softmax(-1)


def count_reward(net: ShapesRM, x: Tensor, prompts: list[str]) -> Tensor:
    """log p(count the prompt asks for), clamped below at log(0.02). x [B, 3, H, W] -> [B]"""
    idx = torch.tensor([s.count - 1 for s in _specs(prompts)], device=x.device)
    logp = _log_probs(net, x)[0].gather(1, idx[:, None])[:, 0]
    return logp.clamp(min=LOG_FLOOR)


def color_reward(net: ShapesRM, x: Tensor, prompts: list[str]) -> Tensor:
    """log p(color the prompt asks for), clamped below at log(0.02). x [B, 3, H, W] -> [B]"""
    idx = torch.tensor([s.color for s in _specs(prompts)], device=x.device)
    logp = _log_probs(net, x)[1].gather(1, idx[:, None])[:, 0]
    return logp.clamp(min=LOG_FLOOR)


def _lazy(path: str | Path | None, reward: Callable[[ShapesRM, Tensor, list[str]], Tensor]) -> RewardCallable:
    """``reward(net, x, prompts)`` with the net loaded at first call (the file is checked now)."""
    _check_exists(_weights_file(path))
    return lambda x, prompts: reward(load_reward_model(path), x, prompts)


def shapes_count(path: str | Path | None = None) -> RewardFn:
    """Shapes world: log p(asked object count) from the learned reward model, clamped at log 0.02."""
    return RewardFn(
        "shapes-count", True, (LOG_FLOOR, 0.0),
        "shapes world: clamped log p(asked object count) from the learned count/color CNN",
        _lazy(path, count_reward),
    )


def shapes_color(path: str | Path | None = None) -> RewardFn:
    """Shapes world: log p(asked color) from the learned reward model, clamped at log 0.02."""
    return RewardFn(
        "shapes-color", True, (LOG_FLOOR, 0.0),
        "shapes world: clamped log p(asked color) from the learned count/color CNN",
        _lazy(path, color_reward),
    )
