"""The shapes world's independent judge: a classical, non-learned counter.

No learned reward calls this module. It reads objects off an image by color segmentation
and connected components, so every accuracy figure it gives is independent of the
learned reward models that fine-tuning optimizes: a model that fools the reward shows
up here as reward hacking, not as progress.

:func:`judge` reads counting prompts; :func:`objects` also reads each object's shape, box and
centroid, for GenEval's rules (:func:`geneval_judge`). The black-box ``geneval-shapes`` reward
reads images with it too, so a run trained on that reward has no independent check here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from scipy import ndimage

from rewardiff.geneval import Detection, score, summarize
from rewardiff.worlds.shapes import data as shapes
from rewardiff.worlds.shapes.compositions import spec_of

FOREGROUND_MIN = 110  # a pixel is foreground when its brightest channel exceeds this (of 255)
MIN_PIXELS = 5  # connected components smaller than this are specks, not objects
_EIGHT = np.ones((3, 3), bool)  # 8-connectivity: shapes touching at a corner merge
# Shape from a component's pixels (measured on every radius 3.2-5 and sub-pixel offset the
# renderer draws): an upward triangle's centroid sits 0.09-0.18 of its height below the box
# centre, a circle's within 0.06 of it; a square fills its box, a circle at most 0.94 of it.
TRIANGLE_DROP = 0.075  # centroid below the box centre, as a share of the height: a triangle above this
SQUARE_FILL = 0.97  # share of its box a component fills: a square above this, else a circle


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


# ----------------------------------------------------------------------------- objects, for GenEval


class ShapeObject(NamedTuple):
    """One object the judge reads: ``shape`` and ``color`` index ``shapes.SHAPES`` / ``shapes.COLORS``;
    ``box`` (x0, y0, x1, y1) in pixels, ends exclusive; ``centroid`` (x, y); ``area`` in pixels."""

    shape: int
    color: int
    box: tuple[int, int, int, int]
    centroid: tuple[float, float]
    area: int


def classify_shape(mask: np.ndarray) -> int:
    """The shape (index of ``shapes.SHAPES``) of one component's mask, cropped to its box [h, w]:
    a triangle when its centroid sits well below the box centre, else a square when it fills
    its box, else a circle."""
    h = mask.shape[0]
    ys = np.nonzero(mask)[0]
    drop = (ys.mean() + 0.5 - h / 2) / h  # centroid below the box centre, in heights
    if drop > TRIANGLE_DROP:
        return 2
    return 1 if mask.mean() > SQUARE_FILL else 0


def objects(image: np.ndarray) -> list[ShapeObject]:
    """Every object of one uint8 image [H, W, 3]: the components :func:`read` counts, with their shapes."""
    return [o for o, _ in objects_with_masks(image)]


def objects_with_masks(image: np.ndarray) -> list[tuple[ShapeObject, np.ndarray]]:
    """The objects of :func:`objects`, each with its component's pixels (a bool mask [H, W]),
    for judges that match objects by where they lie (the super-resolution world's)."""
    rgb = image.astype(np.float32)
    fg = rgb.max(axis=-1) > FOREGROUND_MIN
    nearest = ((rgb[:, :, None, :] - shapes.COLOR_RGB[None, None]) ** 2).sum(-1).argmin(-1)
    out = []
    for c in range(len(shapes.COLORS)):
        labels, _ = ndimage.label(fg & (nearest == c), structure=_EIGHT)
        for k, (sy, sx) in enumerate(ndimage.find_objects(labels), 1):
            mask = labels[sy, sx] == k
            area = int(mask.sum())
            if area < MIN_PIXELS:
                continue
            ys, xs = np.nonzero(mask)
            centroid = (float(xs.mean()) + sx.start + 0.5, float(ys.mean()) + sy.start + 0.5)
            full = np.zeros(labels.shape, bool)
            full[sy, sx] = mask
            out.append((ShapeObject(classify_shape(mask), c, (sx.start, sy.start, sx.stop, sy.stop), centroid, area), full))
    return out


def detections(image: np.ndarray) -> list[Detection]:
    """The objects of one image as GenEval detections (class and colour names, box); the
    pixel count stands in for a detector's confidence, so larger objects are read first."""
    return [Detection(shapes.SHAPES[o.shape], tuple(float(v) for v in o.box), shapes.COLORS[o.color], float(o.area))  # type: ignore[arg-type]
            for o in objects(image)]


def detect(images: torch.Tensor | np.ndarray) -> list[list[Detection]]:
    """The detector of the ``geneval-shapes`` reward: detections of each image of a batch
    (float [B, 3, H, W] in [-1, 1] or uint8 [B, H, W, 3])."""
    return [detections(im) for im in _as_uint8(images)]


def geneval_judge(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, Any]:
    """GenEval's verdicts on shapes images: ``correct`` bool [B] (GenEval's rules), ``partial``
    float [B] (flow_grpo's partial credit) and ``specs`` (each prompt's spec; counting-world
    prompts read as counting prompts)."""
    specs = [spec_of(p) for p in prompts]
    correct, partial = score(specs, detect(images))
    return {"correct": correct, "partial": partial, "specs": specs}


def geneval_accuracy(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, Any]:
    """GenEval's summary of :func:`geneval_judge` (per task, ``overall`` = mean over tasks;
    see :func:`rewardiff.geneval.summarize`)."""
    v = geneval_judge(images, prompts)
    return summarize(v["specs"], v["correct"], v["partial"])
