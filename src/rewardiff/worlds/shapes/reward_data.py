"""Training data of the shapes reward model: clean world images and judge-labelled degraded ones.

This is the one place in ``rewardiff.rewards`` that uses the classical judge, and only to
LABEL training and evaluation images (``judge.read``); no reward ever calls it. A degraded
image (noise, blur, color jitter, tinted background, speckles, smears, extra or missing
objects) gets the labels the judge reads off it, not the labels of the prompt it was
rendered from, so the reward model learns to agree with the judge where a naive one is fooled.

Labels:
    count: class 0..3 for 1..4 objects, class 4 (``OTHER``) for 0 or more than 4 objects.
    color: a distribution over ``shapes.COLORS`` [4]: the share of objects in each color
        (one-hot for a clean image), uniform when the judge sees no object.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from rewardiff.worlds.shapes import data as shapes

N_COUNT = 5  # classes 0..3 = 1..4 objects, 4 = OTHER (no object, or more than 4)
OTHER = 4
N_COLOR = len(shapes.COLORS)


@dataclass
class LabelledImages:
    """Images with their labels.

    Fields:
        images: uint8 [N, 32, 32, 3].
        count: int64 [N], count classes (see the module docstring).
        color: float32 [N, 4], color distributions.
    """

    images: np.ndarray
    count: np.ndarray
    color: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    def concat(self, other: LabelledImages) -> LabelledImages:
        return LabelledImages(
            np.concatenate([self.images, other.images]),
            np.concatenate([self.count, other.count]),
            np.concatenate([self.color, other.color]),
        )


# ----------------------------------------------------------------------------- labels


def clean_images(n: int, rng: np.random.Generator, prompts: list[str]) -> LabelledImages:
    """``n`` world images for prompts drawn from ``prompts``, labelled by their specs."""
    specs = [shapes.parse_prompt(prompts[i]) for i in rng.integers(0, len(prompts), size=n)]
    images = np.stack([shapes.render(s, rng) for s in specs])
    count = np.array([s.count - 1 for s in specs], dtype=np.int64)
    color = np.eye(N_COLOR, dtype=np.float32)[[s.color for s in specs]]
    return LabelledImages(images, count, color)


def _place_mixed(kinds: list[int], colors: list[int], rng: np.random.Generator) -> np.ndarray | None:
    """Render objects of the given kinds and colors without touching (None when they do not fit)."""
    img = np.zeros((shapes.SIZE, shapes.SIZE, 3), np.uint8)
    occupied = np.zeros((shapes.SIZE, shapes.SIZE), bool)
    tint = {c: np.clip(shapes.COLOR_RGB[c] + rng.uniform(-12, 12, 3), 0, 255) for c in set(colors)}
    for kind, color in zip(kinds, colors):
        for _ in range(100):
            r = rng.uniform(3.2, 5.0)
            cy, cx = rng.uniform(r + 1, shapes.SIZE - r - 1, size=2)
            mask = shapes._shape_mask(kind, cy, cx, r)
            if mask.sum() >= 12 and not (shapes._dilate(mask, 2) & occupied).any():
                break
        else:
            return None
        occupied |= mask
        img[mask] = tint[color].astype(np.uint8)
    return img


def mixed_images(n: int, rng: np.random.Generator) -> LabelledImages:
    """``n`` images of 1-4 objects of mixed kinds (mostly one color, sometimes two), judge-labelled.

    They teach counting objects whatever their kind. Images that would show exactly what a
    held-out prompt asks for are skipped, so held-out scores stay held out.
    """
    held = {shapes.parse_prompt(p) for p in shapes.held_out_prompts()}
    out = []
    while len(out) < n:
        k = int(rng.integers(1, 5))
        kinds = [int(v) for v in rng.integers(0, len(shapes.SHAPES), k)]
        base = int(rng.integers(0, N_COLOR))
        colors = [base if rng.random() < 0.8 else int(rng.integers(0, N_COLOR)) for _ in range(k)]
        if len(set(kinds)) == 1 and len(set(colors)) == 1 and shapes.Spec(k, base, kinds[0]) in held:
            continue
        img = _place_mixed(kinds, colors, rng)
        if img is not None:
            out.append(img)
    return judge_labels(np.stack(out))


def judge_labels(images: np.ndarray) -> LabelledImages:
    """Label uint8 images [N, 32, 32, 3] by what the classical judge reads off them."""
    from rewardiff.worlds.shapes import judge  # labelling only; see the module docstring

    per_color = np.array([judge.read(im).per_color for im in images], dtype=np.float32)  # [N, 4]
    total = per_color.sum(1)
    count = np.where((total >= 1) & (total <= 4), total - 1, OTHER).astype(np.int64)
    color = np.where(total[:, None] > 0, per_color / np.maximum(total, 1)[:, None], 1.0 / N_COLOR)
    return LabelledImages(images, count, color.astype(np.float32))


def as_uint8_images(images: torch.Tensor | np.ndarray) -> np.ndarray:
    """uint8 [N, H, W, 3] from uint8 [N, H, W, 3] or float [N, 3, H, W] in [-1, 1]."""
    if isinstance(images, torch.Tensor):
        if images.dtype == torch.uint8:
            return images.cpu().numpy()
        return shapes.to_uint8(images)
    if images.dtype != np.uint8:
        raise ValueError(f"numpy images must be uint8 [N, H, W, 3], got {images.dtype}")
    return images


# ----------------------------------------------------------------------------- degradations
# Each takes and returns a float image [32, 32, 3] in [0, 255] (values may leave the range
# until the final clip).


def _noise(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img + rng.normal(0.0, rng.uniform(3, 40), img.shape)


def _blur(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    s = rng.uniform(0.4, 1.3)
    return gaussian_filter(img, sigma=(s, s, 0))


def _jitter(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return img * rng.uniform(0.7, 1.3, 3) + rng.uniform(-30, 30, 3)


def _background(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gray or tinted, possibly blotchy background where the image is black."""
    level = rng.uniform(10, 75) * rng.uniform(0.7, 1.3, 3)
    field = gaussian_filter(rng.normal(0, 1, img.shape[:2]), 3) * rng.uniform(0, 60)
    bg = np.clip(level + field[..., None], 0, None)
    return np.where(img.max(-1, keepdims=True) < 20, bg, img)


def _random_color(rng: np.random.Generator) -> np.ndarray:
    if rng.random() < 0.7:
        return shapes.COLOR_RGB[rng.integers(0, N_COLOR)] * rng.uniform(0.5, 1.1)
    return rng.uniform(0, 255, 3)


def _speckles(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    for _ in range(rng.integers(3, 40)):
        y, x = rng.integers(0, 32, 2)
        h, w = rng.integers(1, 3, 2)
        out[y : y + h, x : x + w] = _random_color(rng)
    return out


def _smear(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A colored band along part of a border, or a stroke across the image."""
    mask = np.zeros(img.shape[:2], np.float32)
    if rng.random() < 0.6:
        width, start = rng.integers(1, 5), rng.integers(0, 24)
        length = rng.integers(6, 33 - start)
        band = (slice(start, start + length), slice(0, width))
        mask[band] = 1.0
        mask = np.rot90(mask, rng.integers(0, 4)).copy()
    else:
        (y0, x0), (y1, x1) = rng.uniform(0, 32, (2, 2))
        for t in np.linspace(0, 1, 48):
            y, x = int(y0 + t * (y1 - y0)), int(x0 + t * (x1 - x0))
            mask[max(y - 1, 0) : y + 1, max(x - 1, 0) : x + 1] = 1.0
    mask = gaussian_filter(mask, rng.uniform(0, 1)) * rng.uniform(0.3, 1.0)
    return img * (1 - mask[..., None]) + _random_color(rng) * mask[..., None]


def _main_color(img: np.ndarray) -> int:
    """Index of the world color nearest to the mean bright pixel (0 when none is bright)."""
    bright = img.reshape(-1, 3)[img.reshape(-1, 3).max(-1) > 100]
    if len(bright) == 0:
        return 0
    return int(((shapes.COLOR_RGB - bright.mean(0)) ** 2).sum(-1).argmin())


def _extra(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Paste the objects of another rendered image (same or other color; may overlap)."""
    color = _main_color(img) if rng.random() < 0.5 else int(rng.integers(0, N_COLOR))
    spec = shapes.Spec(int(rng.integers(1, 4)), color, int(rng.integers(0, 3)))
    other = shapes.render(spec, rng).astype(np.float32)
    return np.where(other.max(-1, keepdims=True) > 0, other, img)


def _missing(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    out = img.copy()
    for _ in range(rng.integers(1, 3)):
        y, x = rng.integers(0, 28, 2)
        h, w = rng.integers(5, 17, 2)
        out[y : y + h, x : x + w] = 0.0
    return out


def _blank(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return np.zeros_like(img)


Degradation = Callable[[np.ndarray, np.random.Generator], np.ndarray]
# (function, probability of being picked as one of the 1-3 degradations of an image); speckles
# and smears weigh most: they are where the judge and a learned counter disagree most often.
DEGRADATIONS: tuple[tuple[Degradation, float], ...] = (
    (_noise, 0.10), (_blur, 0.08), (_jitter, 0.08), (_background, 0.10), (_speckles, 0.18),
    (_smear, 0.22), (_extra, 0.12), (_missing, 0.09), (_blank, 0.03),
)


def degrade(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Apply 1 to 3 random degradations to a uint8 image [32, 32, 3]; returns uint8."""
    fns, probs = zip(*DEGRADATIONS)
    k = int(rng.integers(1, 4))
    picks = rng.choice(len(fns), size=k, replace=False, p=np.array(probs) / sum(probs))
    out = img.astype(np.float32)
    for i in sorted(picks, key=lambda j: j in (0, 1)):  # noise and blur last, as a camera would
        out = fns[i](out, rng)
    return np.clip(out, 0, 255).round().astype(np.uint8)


def degraded_images(n: int, rng: np.random.Generator, prompts: list[str], mixed: bool = False) -> LabelledImages:
    """``n`` degraded world images (of ``prompts``, or mixed-kind ones), labelled by the judge."""
    clean = mixed_images(n, rng) if mixed else clean_images(n, rng, prompts)
    return judge_labels(np.stack([degrade(im, rng) for im in clean.images]))
