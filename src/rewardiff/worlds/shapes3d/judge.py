"""The 3D shapes world's independent judge: a classical reading of one render.

No learned reward calls this module. A pixel belongs to an object when it is saturated (the
ground and the sky are grey and white); its colour is the palette colour of nearest hue (hue
survives the world's shading, which only scales a colour, and blending with the grey ground,
which only desaturates it). Each colour's pixels fall into 8-connected components; a component
too small or too thin (nothing left after a 3x3 erosion: the fringe where two colours blend) is
no object.

Objects of one colour that touch or overlap on screen from some view merge into one component.
The judge reads the image upsampled 4x and splits a component by the peaks of its distance
transform (two overlapping silhouettes leave a neck between two maxima). At 32 px, where an
object is about 5 px wide, that recovers touching and slightly overlapping silhouettes (the
back object about 90 % visible) but reads deeper same-colour occlusions as one object, and an
object mostly hidden behind another of any colour is missed. Such views (low elevations, three
objects) are what keeps calibration below 100 %; the world's tests measure it on random views
and on occluded views apart. The judge reads counts and colours only, not shapes: at this size
a sphere and a cube differ by a pixel or two of silhouette.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from scipy import ndimage

from rewardiff.worlds.shapes import judge as shapes_judge
from rewardiff.worlds.shapes3d import data as world

MIN_SATURATION = 0.4  # (max - min) / max of an object pixel; the ground and sky are near 0
MIN_VALUE = 0.15  # max channel (of 1) of an object pixel
MIN_PIXELS = 4  # a component smaller than this (at 32 px; scaled with the image area) is no object
NECK = 0.5  # px (of the image read): a distance-transform peak counts as a second object when it
# stands this much above the deepest point of the path that joins it to a higher peak
UPSAMPLE = 4  # images are read at this many times their size (bilinear), so that silhouettes a
# few pixels wide have distance transforms fine enough to show a neck
_EIGHT = np.ones((3, 3), bool)


def _hues(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [...] of RGB in [0, 1] [..., 3]."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0


PALETTE_HUES = _hues(world.COLOR_RGB)


# What the judge sees in one image: objects per colour (indices of ``world.COLORS``), the
# shapes judge's reading (per_color, and its count).
Reading = shapes_judge.Reading


def color_map(image: np.ndarray, upsample: int = 1) -> np.ndarray:
    """Palette index of every object pixel and -1 elsewhere [H * upsample, W * upsample], from
    uint8 [H, W, 3] (bilinearly upsampled first)."""
    rgb = image.astype(np.float32) / 255.0
    if upsample > 1:
        t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
        t = torch.nn.functional.interpolate(t, scale_factor=upsample, mode="bilinear", align_corners=False)
        rgb = t[0].permute(1, 2, 0).numpy()
    hi, lo = rgb.max(-1), rgb.min(-1)
    sat = (hi - lo) / np.maximum(hi, 1e-6)
    d = np.abs(_hues(rgb)[..., None] - PALETTE_HUES)
    nearest = np.minimum(d, 360.0 - d).argmin(-1)
    return np.where((sat >= MIN_SATURATION) & (hi >= MIN_VALUE), nearest, -1)


def split_count(mask: np.ndarray, neck: float = NECK) -> int:
    """How many objects one component's mask [h, w] holds: the peaks of its distance transform
    that a neck of at least ``neck`` pixels separates from every higher peak."""
    dist = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
    peaks = (dist == ndimage.maximum_filter(dist, footprint=_EIGHT)) & mask
    labels, n = ndimage.label(peaks, structure=_EIGHT)  # plateaus of equal maxima are one peak
    if n <= 1:
        return 1
    heights = ndimage.maximum(dist, labels, range(1, n + 1))
    kept = 0
    for i in np.argsort(-np.asarray(heights)):
        level = heights[i] - neck  # does the peak reach a higher peak without dropping below this?
        region, _ = ndimage.label(dist > level, structure=_EIGHT)
        mine = region[labels == i + 1][0]
        higher = [j for j in range(n) if heights[j] > heights[i] or (heights[j] == heights[i] and j < i)]
        if not any(region[labels == j + 1][0] == mine for j in higher):
            kept += 1
    return kept


def components(image: np.ndarray) -> list[tuple[int, np.ndarray]]:
    """(colour, mask [H * UPSAMPLE, W * UPSAMPLE]) of every component the judge takes for one or
    more objects."""
    cmap = color_map(image, UPSAMPLE)
    min_px = max(2, round(MIN_PIXELS * cmap.shape[0] * cmap.shape[1] / world.SIZE ** 2))
    out = []
    for c in range(len(world.COLORS)):
        mask = cmap == c
        labels, n = ndimage.label(mask, structure=_EIGHT)
        core = ndimage.binary_erosion(mask, structure=_EIGHT, iterations=UPSAMPLE)
        for k in range(1, n + 1):
            comp = labels == k
            if comp.sum() >= min_px and (core & comp).any():
                out.append((c, comp))
    return out


def read(image: np.ndarray | torch.Tensor) -> Reading:
    """Objects per colour in one image (uint8 [H, W, 3], or float [3, H, W] in [-1, 1])."""
    if isinstance(image, torch.Tensor):
        image = world.to_uint8(image[None])[0]
    counts = [0] * len(world.COLORS)
    for c, mask in components(image):
        counts[c] += split_count(mask, NECK * UPSAMPLE)
    return Reading(tuple(counts))


def _as_uint8(images: torch.Tensor | np.ndarray) -> np.ndarray:
    return world.to_uint8(images) if isinstance(images, torch.Tensor) else images


def expected(prompt: str) -> Reading:
    """The reading a correct render of ``prompt`` gives."""
    counts = [0] * len(world.COLORS)
    for color, _ in world.kinds_of(prompt):
        counts[color] += 1
    return Reading(tuple(counts))


def judge(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-image verdicts against the prompts, boolean arrays [B]: ``count_ok`` (as many objects
    as asked), ``colours_ok`` (as many objects of each colour as asked) and ``correct`` (both;
    the judge reads no shapes, so a right count in the right colours is correct)."""
    readings = [read(im) for im in _as_uint8(images)]
    wants = [expected(p) for p in prompts]
    count_ok = np.array([r.count == w.count for r, w in zip(readings, wants)])
    colours_ok = np.array([r.per_color == w.per_color for r, w in zip(readings, wants)])
    return {"count_ok": count_ok, "colours_ok": colours_ok, "correct": count_ok & colours_ok}


def accuracy(images: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Mean of each verdict of :func:`judge`."""
    return {k: float(v.mean()) for k, v in judge(images, prompts).items()}


def multiview(images: torch.Tensor | np.ndarray, prompt: str) -> dict[str, float]:
    """Readings of V views of one scene [V, 3, H, W]: ``consistency`` (the share of views whose
    reading is the most common one), ``accuracy`` (the share whose reading is the prompt's) and
    ``majority_correct`` (1.0 when the most common reading is the prompt's; ties go to the view
    read first)."""
    readings = [read(im) for im in _as_uint8(images)]
    top, n = Counter(readings).most_common(1)[0]
    want = expected(prompt)
    return {"consistency": n / len(readings), "accuracy": float(np.mean([r == want for r in readings])),
            "majority_correct": float(top == want)}


def multiview_consistency(images: torch.Tensor | np.ndarray, prompt: str | None = None) -> float:
    """The share of views [V, 3, H, W] on which the judge's reading is the majority reading
    (the prompt is not needed for it; :func:`multiview` also scores the views against it)."""
    readings = [read(im) for im in _as_uint8(images)]
    return Counter(readings).most_common(1)[0][1] / len(readings)
