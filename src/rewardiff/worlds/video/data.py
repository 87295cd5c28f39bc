"""The moving-shapes video world: clips of 32x32 RGB frames of 1 to 4 shapes moving together.

Every clip holds ``count`` shapes of one kind and one colour on black, moving with one
constant velocity in the direction the prompt states ("two red circles moving right"), and
bouncing off the border (the velocity component along the motion flips). The shapes move as
one rigid group, so the spacing drawn in the first frame holds in every frame: they never
touch. Start and speed are redrawn until the stated direction dominates the clip (most
per-frame steps go that way, and so does the net displacement), so a late bounce is allowed
but never reverses the clip. Deterministic: the same seed gives the same clips and prompts.

A clip is a float tensor [3, F, 32, 32] in [-1, 1]; a batch [B, 3, F, 32, 32] (the layout of
diffusers' video latents).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rewardiff.worlds.shapes import data as shapes

SIZE = shapes.SIZE
FRAMES = 8  # frames a clip by default
MIN_FRAMES, MAX_FRAMES = 8, 16  # the clip lengths the world draws
COUNT_WORDS, COLORS, SHAPES, COLOR_RGB = shapes.COUNT_WORDS, shapes.COLORS, shapes.SHAPES, shapes.COLOR_RGB
DIRECTIONS = ("left", "right", "up", "down")
# (axis, sign) of each direction: axis 0 is x (columns, right is +), axis 1 is y (rows, down is +)
MOTION = {"left": (0, -1), "right": (0, 1), "up": (1, -1), "down": (1, 1)}
SPEED = (1.0, 2.0)  # pixels a frame, drawn uniformly
RADIUS = (3.0, 4.6)  # shape radii in pixels (a little smaller than the still world's, to leave room to move)
GAP = 2  # pixels kept empty between any two shapes, in every frame
MIN_STEP = 1.0  # a per-frame step counts towards the stated direction when at least this long (pixels)
HELD_OUT = (
    "four red triangles moving left",
    "three green squares moving up",
    "two blue circles moving down",
    "one yellow square moving right",
    "four yellow circles moving up",
    "two green triangles moving left",
    "three red circles moving right",
    "one blue triangle moving down",
)
VOCAB = ("<pad>", "<null>") + COUNT_WORDS + COLORS + SHAPES + tuple(s + "s" for s in SHAPES) + ("moving",) + DIRECTIONS
MAX_TOKENS = 5


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: ``count`` shapes of kind ``shape`` in colour ``color`` moving
    ``direction`` (indices of the world's tuples)."""

    count: int
    color: int
    shape: int
    direction: int

    @property
    def prompt(self) -> str:
        noun = SHAPES[self.shape] + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count - 1]} {COLORS[self.color]} {noun} moving {DIRECTIONS[self.direction]}"


def all_specs() -> list[Spec]:
    return [Spec(n, c, s, d) for n in range(1, 5) for c in range(len(COLORS)) for s in range(len(SHAPES))
            for d in range(len(DIRECTIONS))]


def all_prompts() -> list[str]:
    """Every prompt of the world (192), held-out ones included."""
    return [s.prompt for s in all_specs()]


def train_prompts() -> list[str]:
    return [p for p in all_prompts() if p not in HELD_OUT]


def held_out_prompts() -> list[str]:
    return list(HELD_OUT)


def parse_prompt(prompt: str) -> Spec:
    """Read a prompt back into its :class:`Spec`; raises ``ValueError`` naming the prompt."""
    words = prompt.strip().lower().split()
    if len(words) == 5 and words[3] == "moving" and words[4] in DIRECTIONS:
        try:
            still = shapes.parse_prompt(" ".join(words[:3]))
        except ValueError:
            pass
        else:
            return Spec(still.count, still.color, still.shape, DIRECTIONS.index(words[4]))
    raise ValueError(f"not a video-world prompt: {prompt!r} (expected e.g. 'two red circles moving right')")


def is_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is one of the world's prompts."""
    try:
        parse_prompt(prompt)
        return True
    except ValueError:
        return False


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Token ids [B, MAX_TOKENS]; the empty prompt "" is the unconditional ``<null>`` prompt."""
    return shapes.tokenize_with(prompts, VOCAB, MAX_TOKENS, "the video world")


# ----------------------------------------------------------------------------- motion


def trajectory(start: float, velocity: float, frames: int, lo: float, hi: float) -> np.ndarray:
    """Offsets [frames] of a point moving at ``velocity`` a frame from ``start``, bouncing
    between ``lo`` and ``hi`` (a step past a wall is folded back, and the velocity flips)."""
    out = np.empty(frames)
    o, v = float(start), float(velocity)
    for f in range(frames):
        out[f] = o
        o += v
        while o > hi or o < lo:  # a fold can overshoot the other wall only for speeds above hi - lo
            if o > hi:
                o, v = 2 * hi - o, -v
            else:
                o, v = 2 * lo - o, -v
    return out


def dominates(offsets: np.ndarray, sign: int) -> bool:
    """Whether the stated direction ``sign`` dominates a 1-D path: more than half of its steps go
    that way by at least :data:`MIN_STEP`, and so does the net displacement."""
    steps = np.diff(offsets) * sign
    return bool((steps >= MIN_STEP).sum() * 2 > len(steps) and (offsets[-1] - offsets[0]) * sign >= MIN_STEP)


# ----------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class Layout:
    """One clip's drawing: shape centres (cy, cx) and radii in the first frame, and the group's
    offset (dy, dx) in pixels at every frame."""

    centres: np.ndarray  # [count, 2] (y, x)
    radii: np.ndarray  # [count]
    offsets: np.ndarray  # [frames, 2] (dy, dx)


def _frame_masks(spec: Spec, layout: Layout, f: int) -> list[np.ndarray]:
    dy, dx = layout.offsets[f]
    return [shapes._shape_mask(spec.shape, cy + dy, cx + dx, r) for (cy, cx), r in zip(layout.centres, layout.radii)]


def _apart(masks: list[np.ndarray]) -> bool:
    """Every mask big enough, and at least :data:`GAP` empty pixels from every other (corners too)."""
    occupied = np.zeros((SIZE, SIZE), bool)
    for m in masks:
        if m.sum() < 12 or (shapes._dilate(m, GAP) & occupied).any():
            return False
        occupied |= m
    return True


def _draw_layout(spec: Spec, frames: int, rng: np.random.Generator, tries: int = 200) -> Layout | None:
    """A layout whose motion matches ``spec.direction`` and whose shapes are apart in every frame, or None."""
    axis, sign = MOTION[DIRECTIONS[spec.direction]]
    speed = rng.uniform(*SPEED)
    centres: list[tuple[float, float]] = []
    radii: list[float] = []
    occupied = np.zeros((SIZE, SIZE), bool)
    for _ in range(tries):  # the first frame: shapes placed greedily, apart
        r = rng.uniform(*RADIUS)
        cy, cx = rng.uniform(r + 1, SIZE - r - 1, size=2)
        mask = shapes._shape_mask(spec.shape, cy, cx, r)
        if mask.sum() < 12 or (shapes._dilate(mask, GAP) & occupied).any():
            continue
        occupied |= mask
        centres.append((cy, cx))
        radii.append(r)
        if len(centres) == spec.count:
            break
    else:
        return None
    c, rad = np.array(centres), np.array(radii)
    # the group's extent along the motion axis (index 1 - axis of (y, x)) bounds its offset
    k = 1 - axis
    lo, hi = float(-(c[:, k] - rad).min() + 0.5), float(SIZE - 0.5 - (c[:, k] + rad).max())
    if hi - lo < 2 * speed:
        return None
    path = trajectory(rng.uniform(lo, hi), sign * speed, frames, lo, hi)
    if not dominates(path, sign):
        return None
    offsets = np.zeros((frames, 2))
    offsets[:, k] = path
    layout = Layout(c, rad, offsets)
    if not all(_apart(_frame_masks(spec, layout, f)) for f in range(frames)):
        return None
    return layout


def layout_for(spec: Spec, frames: int, rng: np.random.Generator, restarts: int = 500) -> Layout:
    """A random :class:`Layout` for ``spec`` (redrawn until the motion and the spacing hold)."""
    if not MIN_FRAMES <= frames <= MAX_FRAMES:
        raise ValueError(f"frames must be between {MIN_FRAMES} and {MAX_FRAMES}, got {frames}")
    for _ in range(restarts):
        layout = _draw_layout(spec, frames, rng)
        if layout is not None:
            return layout
    raise RuntimeError(f"could not lay out {spec.prompt!r} over {frames} frames")


def render(spec: Spec, rng: np.random.Generator, frames: int = FRAMES) -> np.ndarray:
    """One uint8 clip [frames, SIZE, SIZE, 3] for ``spec``."""
    color = np.clip(COLOR_RGB[spec.color] + rng.uniform(-12, 12, 3), 0, 255).astype(np.uint8)
    layout = layout_for(spec, frames, rng)
    clip = np.zeros((frames, SIZE, SIZE, 3), np.uint8)
    for f in range(frames):
        clip[f][np.any(_frame_masks(spec, layout, f), axis=0)] = color
    return clip


def to_tensor(clips: np.ndarray) -> torch.Tensor:
    """uint8 [B, F, H, W, 3] -> float [B, 3, F, H, W] in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(clips)).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, F, H, W] in [-1, 1] -> uint8 [B, F, H, W, 3]."""
    if x.dim() != 5:
        raise ValueError(f"expected clips [B, 3, F, H, W], got shape {tuple(x.shape)}")
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def make_batch(n: int, seed: int, prompts: list[str] | None = None, frames: int = FRAMES) -> tuple[torch.Tensor, list[str], list[Spec]]:
    """``n`` clips [n, 3, frames, 32, 32] in [-1, 1] with prompts drawn from ``prompts`` (training prompts by default)."""
    rng = np.random.default_rng(seed)
    pool = prompts or train_prompts()
    chosen = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    specs = [parse_prompt(p) for p in chosen]
    clips = np.stack([render(s, rng, frames) for s in specs])
    return to_tensor(clips), chosen, specs
