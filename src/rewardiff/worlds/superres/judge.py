"""The super-resolution world's judge of hallucination: objects that the truth does not hold.

It reads the objects of a super-resolved image and of its reference with the shapes world's
classical detection (:func:`rewardiff.worlds.shapes.judge.objects_with_masks`: colour
segmentation, connected components, shape by geometry; nothing learned) and matches them by
where they lie. Two objects correspond when their pixels overlap by at least
:data:`OVERLAP` of the smaller one, or their centroids lie within :data:`NEAR` px. A one-to-one
assignment of corresponding objects (largest overlap first) is then read as:

- ``recoloured``: an assigned pair of different colours;
- ``wrong_kind``: an assigned pair of the same colour but different shapes, both at least
  :data:`KIND_MIN_AREA` px (below that the shape cannot be read);
- ``merged``: a reference object left over that corresponds to an assigned output object
  (one output object covers k reference objects: k - 1 merges);
- ``split``: an output object left over that corresponds to an assigned reference object;
- ``missing``: a reference object that corresponds to nothing;
- ``extra``: an output object that corresponds to nothing (an invented object).

The hallucination count of an image is the sum of the six. :func:`judge` reads against the
ground truth; :func:`judge_low_res` needs no truth: it degrades the output as the inputs were
made (:func:`rewardiff.worlds.superres.data.degrade`) and counts the regions where that
differs from the input by more than its noise (:func:`compare_low_res`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rewardiff.worlds.shapes import data as shapes
from rewardiff.worlds.shapes.judge import ShapeObject, objects_with_masks
from rewardiff.worlds.superres import data as sr

TYPES = ("extra", "missing", "merged", "split", "recoloured", "wrong_kind")
OVERLAP = 0.2  # share of the smaller object's pixels two objects share to correspond
NEAR = 2.0  # or centroids at most this far apart (px)
KIND_MIN_AREA = 20  # objects smaller than this are not judged on their shape
LR_TOL = 0.15  # low-resolution judge: a pixel differs when a channel is off by more (5x the inputs' noise)


Detected = list[tuple[ShapeObject, np.ndarray]]


def _correspond(ref: Detected, out: Detected) -> np.ndarray:
    """Score [R, O] of each (reference, output) pair: the overlap share (at least a small
    positive number for centroids within NEAR px), 0 where they do not correspond."""
    score = np.zeros((len(ref), len(out)))
    for i, (g, gm) in enumerate(ref):
        for j, (s, sm) in enumerate(out):
            share = (gm & sm).sum() / min(g.area, s.area)
            near = np.hypot(g.centroid[0] - s.centroid[0], g.centroid[1] - s.centroid[1]) <= NEAR
            if share >= OVERLAP or near:
                score[i, j] = max(share, 1e-3)
    return score


def compare(ref: Detected, out: Detected) -> dict[str, int]:
    """Hallucinations of ``out`` against ``ref`` (objects with masks): a count of each of :data:`TYPES`."""
    counts = dict.fromkeys(TYPES, 0)
    score = _correspond(ref, out)
    rows, cols = linear_sum_assignment(-score) if score.size else (np.array([], int), np.array([], int))
    pairs = [(i, j) for i, j in zip(rows, cols) if score[i, j] > 0]
    ref_used, out_used = {i for i, _ in pairs}, {j for _, j in pairs}
    for i, j in pairs:
        g, s = ref[i][0], out[j][0]
        if g.color != s.color:
            counts["recoloured"] += 1
        elif g.shape != s.shape and min(g.area, s.area) >= KIND_MIN_AREA:
            counts["wrong_kind"] += 1
    for i in set(range(len(ref))) - ref_used:
        counts["merged" if any(score[i, j] > 0 for j in out_used) else "missing"] += 1
    for j in set(range(len(out))) - out_used:
        counts["split" if any(score[i, j] > 0 for i in ref_used) else "extra"] += 1
    return counts


def _uint8(images: Tensor | np.ndarray) -> np.ndarray:
    return shapes.to_uint8(images) if isinstance(images, Tensor) else images


def judge_images(outputs: Tensor | np.ndarray, references: Tensor | np.ndarray) -> dict[str, np.ndarray]:
    """Hallucinations of each output image against its reference image (both [B, 3, H, W] in
    [-1, 1], or uint8 [B, H, W, 3]): int arrays [B] of each of :data:`TYPES` and ``count`` (their sum)."""
    outs, refs = _uint8(outputs), _uint8(references)
    if len(outs) != len(refs):
        raise ValueError(f"{len(outs)} outputs but {len(refs)} references")
    rows = [compare(objects_with_masks(r), objects_with_masks(o)) for o, r in zip(outs, refs)]
    res = {k: np.array([row[k] for row in rows], dtype=np.int64) for k in TYPES}
    res["count"] = sum(res[k] for k in TYPES)
    return res


def judge(outputs: Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
    """Hallucinations of super-resolved images [B, 3, 32, 32] against their prompts' ground truth
    (:func:`rewardiff.conditions.ground_truth`); see :func:`judge_images`."""
    from rewardiff import conditions

    truth = conditions.stack([conditions.ground_truth(p) for p in prompts], "the super-resolution judge")
    return judge_images(outputs, truth)


def judge_low_res(outputs: Tensor, prompts: list[str]) -> dict[str, np.ndarray]:
    """Hallucinations that the low-resolution input alone shows: each output degraded as the
    inputs were (:func:`rewardiff.worlds.superres.data.degrade`: blur, 4x down) and compared
    with its input; see :func:`compare_low_res`. Needs no ground truth (a ``file:`` input is
    judged too)."""
    from rewardiff import conditions

    lr = conditions.stack([conditions.low_res(p) for p in prompts], "the low-resolution judge").to(outputs.device)
    redone = sr.degrade(outputs.detach().float().clamp(-1, 1))
    if redone.shape != lr.shape:
        raise ValueError(f"outputs degrade to {tuple(redone.shape[1:])} but the inputs are {tuple(lr.shape[1:])}")
    rows = [compare_low_res(a, b) for a, b in zip(redone.cpu().numpy(), lr.float().cpu().numpy())]
    res = {k: np.array([row[k] for row in rows], dtype=np.int64) for k in TYPES}
    res["count"] = sum(res[k] for k in TYPES)
    return res


def compare_low_res(redone: np.ndarray, low: np.ndarray) -> dict[str, int]:
    """Hallucinations of a degraded output [3, h, w] against the input [3, h, w] (both in [-1, 1]):
    each 8-connected region of pixels where some channel differs by more than :data:`LR_TOL`
    counts once, as ``extra`` where the output is brighter there in every channel (something
    the input lacks), ``missing`` where it is darker in every channel, else ``recoloured``."""
    from scipy import ndimage

    counts = dict.fromkeys(TYPES, 0)
    diff = redone - low
    labels, n = ndimage.label(np.abs(diff).max(0) > LR_TOL, structure=np.ones((3, 3), bool))
    for k in range(1, n + 1):
        total = diff[:, labels == k].sum(1)  # per channel
        if (total >= -LR_TOL).all():
            counts["extra"] += 1
        elif (total <= LR_TOL).all():
            counts["missing"] += 1
        else:
            counts["recoloured"] += 1
    return counts


def psnr(outputs: Tensor, references: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB of images in [-1, 1] (peak-to-peak 2), per image [B]."""
    mse = (outputs.float().clamp(-1, 1) - references.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


def summary(verdict: dict[str, np.ndarray]) -> dict[str, float]:
    """``hallucination_rate`` (share of images with at least one), ``hallucination_count``
    (mean count) and the mean of each type, from a verdict of :func:`judge`."""
    count = verdict["count"]
    return {"hallucination_rate": float((count > 0).mean()), "hallucination_count": float(count.mean()),
            **{f"hallucination_{k}": float(verdict[k].mean()) for k in TYPES}}
