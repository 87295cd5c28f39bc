"""The shapes world: 32x32 RGB images of 1 to 4 shapes, each with its prompt.

Every image holds ``count`` shapes of one kind and one color on a black background
("three green squares"). Shapes never touch, not even at corners, so that a classical
connected-components judge reads count and color exactly. The world is deterministic:
the same seed gives the same images, prompts and labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIZE = 32
COUNT_WORDS = ("one", "two", "three", "four")
COLORS = ("red", "green", "blue", "yellow")
# RGB values in [0, 255]; far apart so that nearest-color classification is unambiguous.
COLOR_RGB = np.array([[230, 40, 40], [40, 200, 60], [50, 90, 240], [235, 215, 40]], dtype=np.float32)
SHAPES = ("circle", "square", "triangle")
HELD_OUT = (
    "four red triangles",
    "four green triangles",
    "four blue triangles",
    "four yellow triangles",
    "three green squares",
    "two blue circles",
)
VOCAB = ("<pad>", "<null>") + COUNT_WORDS + COLORS + SHAPES + tuple(s + "s" for s in SHAPES)
MAX_TOKENS = 4


@dataclass(frozen=True)
class Spec:
    """What a prompt asks for: ``count`` shapes of kind ``shape`` in color ``color`` (indices)."""

    count: int
    color: int
    shape: int

    @property
    def prompt(self) -> str:
        noun = SHAPES[self.shape] + ("s" if self.count > 1 else "")
        return f"{COUNT_WORDS[self.count - 1]} {COLORS[self.color]} {noun}"


def all_specs() -> list[Spec]:
    return [Spec(n, c, s) for n in range(1, 5) for c in range(len(COLORS)) for s in range(len(SHAPES))]


def train_prompts() -> list[str]:
    return [s.prompt for s in all_specs() if s.prompt not in HELD_OUT]


def held_out_prompts() -> list[str]:
    return list(HELD_OUT)


def parse_prompt(prompt: str) -> Spec:
    """Read a prompt back into its :class:`Spec`; raises ``ValueError`` naming the prompt."""
    words = prompt.strip().lower().split()
    try:
        count = COUNT_WORDS.index(words[0]) + 1
        color = COLORS.index(words[1])
        shape = SHAPES.index(words[2].removesuffix("s")) if len(words) == 3 else -1
    except (IndexError, ValueError):
        shape = -1
    if len(words) != 3 or shape < 0:
        raise ValueError(f"not a shapes-world prompt: {prompt!r} (expected e.g. 'two red circles')")
    return Spec(count, color, shape)


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Token ids [B, MAX_TOKENS]; the empty prompt "" is the unconditional ``<null>`` prompt."""
    return tokenize_with(prompts, VOCAB, MAX_TOKENS, "the shapes world")


def tokenize_with(prompts: list[str], vocab: tuple[str, ...], max_tokens: int, what: str) -> torch.Tensor:
    """Token ids [B, max_tokens] of ``prompts`` over ``vocab`` (a ValueError naming the first
    unknown word, or a prompt longer than ``max_tokens``, as ``what`` reads it)."""
    out = torch.zeros(len(prompts), max_tokens, dtype=torch.long)
    for i, p in enumerate(prompts):
        words = p.strip().lower().split() or ["<null>"]
        if len(words) > max_tokens:
            raise ValueError(f"prompt too long for {what}: {p!r}")
        for j, w in enumerate(words):
            if w not in vocab:
                raise ValueError(f"unknown word {w!r} in prompt {p!r}; vocabulary: {', '.join(vocab[2:])}")
            out[i, j] = vocab.index(w)
    return out


# ----------------------------------------------------------------------------- rendering


def _shape_mask(shape: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5
    if shape == 0:  # circle
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    if shape == 1:  # square, side ~ 1.7 r
        h = 0.85 * r
        return (np.abs(yy - cy) <= h) & (np.abs(xx - cx) <= h)
    # upward triangle inscribed in the circle of radius r
    top, bottom = cy - r, cy + 0.75 * r
    half_w = (yy - top) / (bottom - top) * r
    return (yy >= top) & (yy <= bottom) & (np.abs(xx - cx) <= half_w)


def _dilate(mask: np.ndarray, k: int) -> np.ndarray:
    from scipy.ndimage import binary_dilation

    return binary_dilation(mask, iterations=k, structure=np.ones((3, 3), bool))


def render(spec: Spec, rng: np.random.Generator, tries: int = 200, restarts: int = 50) -> np.ndarray:
    """One uint8 image [SIZE, SIZE, 3] for ``spec``, shapes placed at random without touching.

    Placement is greedy; when ``tries`` random positions could not fit every shape, the
    canvas is cleared and placement starts over (the same rng keeps it deterministic).
    """
    color = np.clip(COLOR_RGB[spec.color] + rng.uniform(-12, 12, 3), 0, 255).astype(np.uint8)
    for _ in range(restarts):
        masks = _place(spec, rng, tries)
        if masks is not None:
            img = np.zeros((SIZE, SIZE, 3), np.uint8)
            img[np.any(masks, axis=0)] = color
            return img
    raise RuntimeError(f"could not place {spec.count} shapes for {spec.prompt!r}")


def _place(spec: Spec, rng: np.random.Generator, tries: int) -> list[np.ndarray] | None:
    """Masks of ``spec.count`` shapes at least 2 px apart, or None when they did not fit."""
    occupied = np.zeros((SIZE, SIZE), bool)
    masks: list[np.ndarray] = []
    for _ in range(tries):
        r = rng.uniform(3.2, 5.0)
        cy, cx = rng.uniform(r + 1, SIZE - r - 1, size=2)
        mask = _shape_mask(spec.shape, cy, cx, r)
        if mask.sum() < 12 or (_dilate(mask, 2) & occupied).any():
            continue
        occupied |= mask
        masks.append(mask)
        if len(masks) == spec.count:
            return masks
    return None


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [B, H, W, 3] -> float [B, 3, H, W] in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float [B, 3, H, W] in [-1, 1] -> uint8 [B, H, W, 3]."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def make_batch(n: int, seed: int, prompts: list[str] | None = None) -> tuple[torch.Tensor, list[str], list[Spec]]:
    """``n`` images in [-1, 1] with prompts drawn from ``prompts`` (training prompts by default)."""
    rng = np.random.default_rng(seed)
    pool = prompts or train_prompts()
    chosen = [pool[i] for i in rng.integers(0, len(pool), size=n)]
    specs = [parse_prompt(p) for p in chosen]
    images = np.stack([render(s, rng) for s in specs])
    return to_tensor(images), chosen, specs


def all_prompts() -> list[str]:
    """Every prompt of the world, held-out ones included."""
    return [s.prompt for s in all_specs()]


def is_prompt(prompt: str) -> bool:
    """Whether ``prompt`` is one of the world's prompts (a count, a color and a shape)."""
    try:
        parse_prompt(prompt)
        return True
    except ValueError:
        return False


def prompt_features(prompts: list[str]) -> np.ndarray:
    """Each prompt as a context vector [P, 11]: one-hot count (4), one-hot color (4), one-hot shape (3).

    The contexts of ``rewardiff tune`` (``plugins.PROMPT_FEATURES``); every row has norm sqrt(3).
    Raises ``ValueError`` naming the first prompt that is not the world's.
    """
    out = np.zeros((len(prompts), len(COUNT_WORDS) + len(COLORS) + len(SHAPES)))
    for i, p in enumerate(prompts):
        s = parse_prompt(p)
        out[i, [s.count - 1, len(COUNT_WORDS) + s.color, len(COUNT_WORDS) + len(COLORS) + s.shape]] = 1.0
    return out
