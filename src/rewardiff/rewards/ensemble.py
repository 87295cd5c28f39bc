"""Ensembles of rewards: weighted sums, standardized terms, and the candidate-relative
ensembles of Free2Guide (normalized sum and consensus); rewards on a video's key frames.

``"0.7*shapes-count+0.3*brightness"`` is a :class:`WeightedSum`. A term written ``z(name)`` is
the reward standardized, ``(r - mean) / std``, with the mean and standard deviation recorded for
it on a world's base-model samples (``plugins.REWARD_STATS``; the shapes world's for its rewards):
a :class:`Normalized`.
``"0.7*z(shapes-count)+0.3*z(jpeg-compressibility)"`` weighs the two on a common scale.

Free2Guide (arXiv 2411.17041) combines a vision-language judge with image rewards in three
ways; all three are here, for every inference-time method:

- weighted sum, ``"0.75*openai:MODEL@URL+0.25*clip-score"`` (beta = 0.75 on the judge);
- ``"normalized(a, b)"``, :class:`NormalizedSum`: each reward min-max scaled over the
  candidates being compared, then summed (weights allowed: ``normalized(0.75*a, 0.25*b)``);
- ``"consensus(a, b)"``, :class:`Consensus`: the Borda count of the candidates' ranks under
  each reward (rank 0 the worst, ties share the mean rank).

The last two are *relative*: a candidate's value depends on the others it is compared with.
Such a reward has ``relative = True`` and takes ``group``: rows in contiguous groups of that
size are compared among themselves (None: the whole batch is one group). Guidance methods
pass their own groups (best-of-n: the n samples of a request; svdd, free2guide: the
candidates of one particle; smc: the k particles of a request), so "the candidates" means
what the paper means. A training batch is one group (or GRPO's groups of ``group_size``).

``"keyframes(name)"`` is :class:`KeyFrames`: an image reward on a video's key frames
([B, C, F, H, W] -> the reward of frames 0, 5, 10, 15 as Free2Guide reads them, or four evenly
spaced frames of a shorter clip), averaged; ``"keyframes(name, 0, 3, 7)"`` names the frames.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.types import Reward

_NAME = r"[A-Za-z_][\w.:\-/@]*"  # a registered name, package.module:function, openai:MODEL@URL
# optional "weight *", then a name, z(name), or a function of terms: normalized(...), consensus(...), keyframes(...)
FUNCTIONS = ("normalized", "consensus", "keyframes")  # what a spec may call, besides z(...)
_TERM = re.compile(
    r"^\s*(?:([+-]?(?:\d+\.?\d*|\.\d+)(?:[eE]-?\d+)?)\s*\*)?\s*"
    rf"(?:z\(\s*({_NAME})\s*\)|({_NAME})|((?:{'|'.join(FUNCTIONS)})\s*\(.*\)))\s*$", re.S
)
_Z = re.compile(rf"^\s*z\(\s*({_NAME})\s*\)\s*$")
_CALL = re.compile(r"^\s*([a-z]+)\s*\((.*)\)\s*$", re.S)
PAPER_KEY_FRAMES = (0, 5, 10, 15)  # Free2Guide's key frames of a 16-frame clip


def split_top(spec: str, sep: str) -> list[str]:
    """``spec`` split at ``sep`` outside parentheses (``"a+consensus(b+c, d)"`` -> 2 parts).

    Raises:
        UserError: unbalanced parentheses.
    """
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(spec):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise UserError(f"unbalanced parentheses in reward spec {spec!r}")
        elif ch == sep and depth == 0:
            parts.append(spec[start:i])
            start = i + 1
    if depth != 0:
        raise UserError(f"unbalanced parentheses in reward spec {spec!r}")
    return parts + [spec[start:]]


def split_call(term: str) -> tuple[str, list[str]] | None:
    """``"consensus(a, b)"`` -> ``("consensus", ["a", "b"])``; None for a term that is no call
    of :data:`FUNCTIONS`.

    Raises:
        UserError: a call of an unknown function, or one without arguments.
    """
    m = _CALL.match(term)
    if m is None or m.group(1) == "z":
        return None
    name, inner = m.group(1), m.group(2)
    if name not in FUNCTIONS:
        raise UserError(f"unknown reward function {name}(...) in {term.strip()!r}; valid: z, {', '.join(FUNCTIONS)}")
    args = [a.strip() for a in split_top(inner, ",")]
    if not any(args):
        raise UserError(f"{name}(...) needs at least one reward, got {term.strip()!r}")
    return name, args


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
    for raw in split_top(spec, "+"):
        m = _TERM.match(raw)
        if not raw.strip() or m is None:
            raise UserError(
                f"cannot parse reward term {raw.strip()!r} in {spec!r}; "
                "write e.g. '0.7*shapes-count+0.3*brightness' or '0.7*z(shapes-count)+0.3*z(brightness)'"
            )
        weight = float(m.group(1)) if m.group(1) else 1.0
        terms.append((weight, f"z({m.group(2)})" if m.group(2) else (m.group(3) or m.group(4).strip())))
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
        self.relative = any(is_relative(r) for _, r in parts)
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

    def __call__(self, x: Tensor, prompts: list[str], group: int | None = None) -> Tensor:
        """Weighted sum of the parts' rewards, float [B] (``group`` goes to relative parts)."""
        total = torch.zeros(x.shape[0], device=x.device)
        for w, r in self.parts:
            total = total + w * call(r, x, prompts, group).to(total.dtype)
        return total

    def __repr__(self) -> str:
        return f"WeightedSum({self.name!r})"


def is_relative(reward: Reward) -> bool:
    """Whether ``reward`` compares the rows of a batch (takes ``group``)."""
    return bool(getattr(reward, "relative", False))


def call(reward: Reward, x: Tensor, prompts: list[str], group: int | None = None) -> Tensor:
    """``reward(x, prompts)``, with ``group`` when the reward is relative."""
    return reward(x, prompts, group=group) if is_relative(reward) else reward(x, prompts)  # type: ignore[call-arg]


def _groups(n: int, group: int | None) -> int:
    """The group size to use for a batch of ``n`` rows (None: one group)."""
    if group is None:
        return n
    if group < 1 or n % group:
        raise ValueError(f"a batch of {n} candidates cannot be split into groups of {group}")
    return group


def minmax(values: Tensor, group: int) -> Tensor:
    """``values`` [N] min-max scaled to [0, 1] within contiguous groups of ``group``; a group
    whose values are all equal scales to 0 (it orders nothing)."""
    v = values.double().reshape(-1, group)
    lo, hi = v.amin(1, keepdim=True), v.amax(1, keepdim=True)
    span = hi - lo
    return torch.where(span > 0, (v - lo) / span.clamp_min(1e-300), torch.zeros_like(v)).reshape(-1)


def borda(values: Tensor, group: int) -> Tensor:
    """Borda points of ``values`` [N] within contiguous groups of ``group``: the rank, 0 for the
    lowest to group-1 for the highest, ties sharing the mean of their ranks."""
    v = values.double().reshape(-1, group)
    below = (v.unsqueeze(2) > v.unsqueeze(1)).sum(2).double()  # how many each beats
    ties = (v.unsqueeze(2) == v.unsqueeze(1)).sum(2).double() - 1  # equal others
    return (below + ties / 2).reshape(-1)


class _Relative:
    """A weighted combination of rewards scaled relative to the candidates compared."""

    relative = True
    differentiable = False  # ranks and min-max over a batch are not a reward's gradient
    kind = ""

    def __init__(self, parts: list[tuple[float, Reward]], name: str | None = None):
        if not parts:
            raise UserError(f"{self.kind}(...) needs at least one reward")
        self.parts = parts
        inner = ", ".join(f"{w:g}*{r.name}" if w != 1 else r.name for w, r in parts)
        self.name = name or f"{self.kind}({inner})"
        self.description = f"{self.kind} ensemble over the candidates compared: {inner}"

    def _scale(self, values: Tensor, group: int) -> Tensor:
        raise NotImplementedError

    def __call__(self, x: Tensor, prompts: list[str], group: int | None = None) -> Tensor:
        """float [B]: each part scaled within its group, then weighted and summed."""
        g = _groups(x.shape[0], group)
        total = torch.zeros(x.shape[0], dtype=torch.float64)
        with torch.no_grad():
            for w, r in self.parts:
                total += w * self._scale(call(r, x, prompts, group).detach().cpu(), g)
        return total.float().to(x.device)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class NormalizedSum(_Relative):
    """Free2Guide's normalized sum: sum_i w_i * minmax_group(reward_i), in [0, sum w_i]."""

    kind = "normalized"

    @property
    def value_range(self) -> tuple[float, float]:
        return (sum(min(w, 0.0) for w, _ in self.parts), sum(max(w, 0.0) for w, _ in self.parts))

    def _scale(self, values: Tensor, group: int) -> Tensor:
        return minmax(values, group)


class Consensus(_Relative):
    """Free2Guide's consensus: sum_i w_i * Borda points of the candidates under reward_i."""

    kind = "consensus"
    value_range = None  # depends on the group size

    def _scale(self, values: Tensor, group: int) -> Tensor:
        return borda(values, group)


def key_frame_indices(frames: int, wanted: tuple[int, ...] | None = None) -> tuple[int, ...]:
    """The key frames of a clip of ``frames`` frames: ``wanted`` (each checked), else
    Free2Guide's (0, 5, 10, 15) when the clip has 16 frames or more, else four evenly spaced
    frames (all of them when fewer than four)."""
    if wanted is not None:
        bad = [f for f in wanted if not 0 <= f < frames]
        if bad:
            raise UserError(f"key frames {bad} are outside a clip of {frames} frames (0 .. {frames - 1})")
        return tuple(wanted)
    if frames >= 16:
        return PAPER_KEY_FRAMES
    if frames <= 4:
        return tuple(range(frames))
    return tuple(sorted({round(i * (frames - 1) / 3) for i in range(4)}))


class KeyFrames:
    """An image reward on a video's key frames, averaged: x [B, C, F, H, W] -> [B].

    Args:
        reward: an image reward, [N, C, H, W] -> [N].
        frames: the key frames (None: :func:`key_frame_indices`' default for the clip).
    """

    def __init__(self, reward: Reward, frames: tuple[int, ...] | None = None):
        self.reward, self.frames = reward, None if frames is None else tuple(int(f) for f in frames)
        self.differentiable = bool(reward.differentiable)
        self.value_range = reward.value_range
        self.relative = is_relative(reward)
        which = "default key frames" if self.frames is None else "frames " + ", ".join(map(str, self.frames))
        self.name = f"keyframes({reward.name}" + ("" if self.frames is None else ", " + ", ".join(map(str, self.frames))) + ")"
        self.description = f"{reward.name} on a video's {which}, averaged"

    def __call__(self, x: Tensor, prompts: list[str], group: int | None = None) -> Tensor:
        if x.dim() != 5:
            raise UserError(f"reward {self.name!r} scores videos [B, C, F, H, W]; got a tensor of shape {tuple(x.shape)}")
        B, F = x.shape[0], x.shape[2]
        idx = key_frame_indices(F, self.frames)
        frames = x[:, :, list(idx)].permute(0, 2, 1, 3, 4).flatten(0, 1)  # [B*K, C, H, W], sample-major
        per = [p for p in prompts for _ in idx]
        g = None if group is None else group * len(idx)  # a sample's frames stay inside its group
        return call(self.reward, frames, per, g).reshape(B, len(idx)).mean(1)

    def __repr__(self) -> str:
        return f"KeyFrames({self.name!r})"
