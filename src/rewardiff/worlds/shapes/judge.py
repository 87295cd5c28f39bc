"""The shapes world's independent judge: a classical, non-learned counter.

No reward ever calls this module. It reads objects off an image by color segmentation
and connected components, so every accuracy figure it gives is independent of the
learned reward models that fine-tuning optimizes: a model that fools the reward shows
up here as reward hacking, not as progress.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from rewardiff.worlds.shapes import data as shapes

FOREGROUND_MIN = 110  # a pixel is foreground when its brightest channel exceeds this (of 255)
MIN_PIXELS = 5  # connected components smaller than this are specks, not objects
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity: shapes touching at a corner merge


@dataclass(frozen=True)
class Reading:
    """What the judge sees in one image: objects per color (indices of ``shapes.COLORS``)."""

    per_color: tuple[int, ...]

    @property
    def count(self) -> int:
        return sum(self.per_color)


def read(image: np.ndarray) -> Reading:
    """Count objects per color in one uint8 image [H, W, 3]."""
    rgb = image.astype(np.float32)
    fg = rgb.max(axis=-1) > FOREGROUND_MIN
    dist = ((rgb[:, :, None, :] - shapes.COLOR_RGB[None, None]) ** 2).sum(-1)  # [H, W, 4]
    nearest = dist.argmin(-1)
    counts = []
    for c in range(len(shapes.COLORS)):
        labels, n = ndimage.label(fg & (nearest == c), structure=_EIGHT)
        sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
        counts.append(int((sizes >= MIN_PIXELS).sum()))
    return Reading(tuple(counts))


def _as_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(images, torch.Tensor):
        return shapes.to_uint8(images)
    return images


def judge(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-sample verdicts against the prompts.

    Returns boolean arrays [B]: ``count`` (number of objects equals the asked count),
    ``color`` (at least one object and all of them in the asked color) and ``both``.
    """
    arr = _as_uint8(images)
    specs = [shapes.parse_prompt(p) for p in prompts]
    readings = [read(im) for im in arr]
    count = np.array([r.count == s.count for r, s in zip(readings, specs)])
    color = np.array([r.count > 0 and r.per_color[s.color] == r.count for r, s in zip(readings, specs)])
    return {"count": count, "color": color, "both": count & color}


def accuracy(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Mean of each verdict of :func:`judge`."""
    return {k: float(v.mean()) for k, v in judge(images, prompts).items()}
