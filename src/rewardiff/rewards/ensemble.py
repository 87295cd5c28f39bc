"""WeightedSum: a fixed linear combination of rewards, written ``"0.7*shapes-count+0.3*brightness"``."""

from __future__ import annotations

import re

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.types import Reward

# optional "weight *", then a registered name or package.module:function
_TERM = re.compile(r"^\s*(?:([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\s*\*)?\s*([A-Za-z_][\w.:\-]*)\s*$")


def parse_weighted(spec: str) -> list[tuple[float, str]]:
    """Split ``"0.7*a+0.3*b"`` into ``[(0.7, "a"), (0.3, "b")]``; a bare name has weight 1.

    Negative weights are written ``"a+-0.5*b"``. Raises ``UserError`` on a malformed term.
    """
    terms = []
    for raw in spec.split("+"):
        m = _TERM.match(raw)
        if not raw.strip() or m is None:
            raise UserError(f"cannot parse reward term {raw.strip()!r} in {spec!r}; write e.g. '0.7*shapes-count+0.3*brightness'")
        terms.append((float(m.group(1)) if m.group(1) else 1.0, m.group(2)))
    return terms


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
