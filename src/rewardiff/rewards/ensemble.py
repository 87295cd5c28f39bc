"""Weighted sums of rewards and standardized rewards.

``"0.7*shapes-count+0.3*brightness"`` is a :class:`WeightedSum`. A term written ``z(name)`` is
the reward standardized, ``(r - mean) / std``, with the mean and standard deviation recorded for
it on a world's base-model samples (``plugins.REWARD_STATS``; the shapes world's for its rewards):
a :class:`Normalized`.
``"0.7*z(shapes-count)+0.3*z(jpeg-compressibility)"`` weighs the two on a common scale.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.types import Reward

_NAME = r"[A-Za-z_][\w.:\-]*"  # a registered name or package.module:function
# optional "weight *", then a name or z(name)
_TERM = re.compile(
    r"^\s*(?:([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\s*\*)?\s*"
    rf"(?:z\(\s*({_NAME})\s*\)|({_NAME}))\s*$"
)
_Z = re.compile(rf"^\s*z\(\s*({_NAME})\s*\)\s*$")


def parse_weighted(spec: str) -> list[tuple[float, str]]:
    """Split ``"0.7*a+0.3*z(b)"`` into ``[(0.7, "a"), (0.3, "z(b)")]``; a bare term has weight 1.

    Negative weights are written ``"a+-0.5*b"``. A standardized term comes back as
    ``"z(name)"`` without inner spaces (see :func:`split_z`).

    Args:
        spec: the weighted-sum spec.

    Returns:
        (weight, term) pairs in the order written.

    Raises:
        UserError: on a malformed term.
    """
    terms = []
    for raw in spec.split("+"):
        m = _TERM.match(raw)
        if not raw.strip() or m is None:
            raise UserError(
                f"cannot parse reward term {raw.strip()!r} in {spec!r}; "
                "write e.g. '0.7*shapes-count+0.3*brightness' or '0.7*z(shapes-count)+0.3*z(brightness)'"
            )
        weight = float(m.group(1)) if m.group(1) else 1.0
        terms.append((weight, f"z({m.group(2)})" if m.group(2) else m.group(3)))
    return terms


def split_z(term: str) -> tuple[str, bool]:
    """``"z(name)"`` -> ``("name", True)``; any other term -> ``(term, False)``.

    Args:
        term: one term of a spec, without its weight.
    """
    m = _Z.match(term)
    return (m.group(1), True) if m else (term, False)


class Normalized:
    """A reward standardized by fixed statistics: ``(reward(x, prompts) - mean) / std``.

    Differentiable iff the wrapped reward is (the affine map keeps the gradient, scaled by
    1 / std). The value range, when the wrapped reward's is known, is mapped the same way.

    Args:
        reward: the reward to standardize.
        mean: its mean on the reference samples.
        std: its standard deviation there (> 0).
        name: the name to show (``"z(<reward name>)"`` when None).
    """

    def __init__(self, reward: Reward, mean: float, std: float, name: str | None = None):
        mean, std = float(mean), float(std)
        if not math.isfinite(mean) or not math.isfinite(std) or std <= 0:
            raise UserError(f"cannot standardize reward {reward.name!r}: mean {mean} and std {std} must be finite, std > 0")
        self.reward, self.mean, self.std = reward, mean, std
        self.name = name or f"z({reward.name})"
        self.differentiable = bool(reward.differentiable)
        lo_hi = reward.value_range
        self.value_range = None if lo_hi is None else ((lo_hi[0] - mean) / std, (lo_hi[1] - mean) / std)
        shift = f"r - {mean:.4g}" if mean >= 0 else f"r + {-mean:.4g}"
        self.description = f"{reward.name} standardized: ({shift}) / {std:.4g}"

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        """Standardized reward of ``x`` [B, ...] with ``prompts`` (B strings), float [B]."""
        return (self.reward(x, prompts) - self.mean) / self.std

    def __repr__(self) -> str:
        return f"Normalized({self.name!r}, mean={self.mean:.4g}, std={self.std:.4g})"


class WeightedSum:
    """``sum_i w_i * reward_i(x, prompts)``; differentiable iff every part is.

    Args:
        parts: (weight, reward) pairs.
        name: the spec it was built from (built from the parts when None).
    """

    def __init__(self, parts: list[tuple[float, Reward]], name: str | None = None):
        if not parts:
            raise UserError("a weighted sum of rewards needs at least one term")
        self.parts = parts
        self.name = name or "+".join(f"{w:g}*{r.name}" for w, r in parts)
        self.differentiable = all(r.differentiable for _, r in parts)
        self.value_range = self._range()
        self.description = "weighted sum: " + ", ".join(f"{w:g} x {r.name}" for w, r in parts)

    def _range(self) -> tuple[float, float] | None:
        """The sum's range from the parts' ranges (None when any part's is unknown)."""
        lo = hi = 0.0
        for w, r in self.parts:
            if r.value_range is None:
                return None
            a, b = w * r.value_range[0], w * r.value_range[1]
            lo, hi = lo + min(a, b), hi + max(a, b)
        return (lo, hi)

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        """Weighted sum of the parts' rewards, float [B]."""
        total = torch.zeros(x.shape[0], device=x.device)
        for w, r in self.parts:
            total = total + w * r(x, prompts).to(total.dtype)
        return total

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r})"
