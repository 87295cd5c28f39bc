"""The video world's independent judge: the shapes world's classical reading, frame by frame.

Each frame is read by :func:`rewardiff.worlds.shapes.judge.objects` (colour segmentation and
connected components, each component's shape). A clip's verdicts:

- ``count_ok``: the count read in most frames is the asked count;
- ``color_ok``: in most frames there is an object and every object has the asked colour;
- ``direction_ok``: the centroid of the foreground, tracked over the frames, moves the stated
  way: along the stated axis it travels farther than across it, and more than half of its
  per-frame steps go the stated way (so one bounce late in the clip does not reverse the verdict,
  and a clip that stands still fails);
- ``consistency``: the share of frames whose reading (objects per colour and per shape) is the
  clip's most common reading;
- ``all_ok``: the three verdicts hold and every frame agrees; ``partial``: the mean of the four.

No learned reward calls this module, so its figures are independent of learned rewards (the
black-box ``video-judge`` reward reads clips with it, so a run trained on that reward has no
independent check here).
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from rewardiff.worlds.shapes import judge as still
from rewardiff.worlds.video import data as video

STILL_STEP = 0.25  # a per-frame centroid step shorter than this (pixels) goes nowhere


def _frame(image: np.ndarray) -> tuple[tuple[int, ...], tuple[int, ...], tuple[float, float] | None]:
    """One frame: (objects per colour, objects per shape, mean centroid (x, y) of the objects or None)."""
    objs = still.objects(image)
    per_color = tuple(sum(o.color == c for o in objs) for c in range(len(video.COLORS)))
    per_shape = tuple(sum(o.shape == s for o in objs) for s in range(len(video.SHAPES)))
    # the mean of the objects' centroids, unweighted: a shape's pixel count changes with its
    # sub-pixel position, and weighting by it would move the centroid when nothing moved
    centroid = tuple(np.mean([o.centroid for o in objs], axis=0).tolist()) if objs else None
    return per_color, per_shape, centroid  # type: ignore[return-value]


def direction_of(centroids: list[tuple[float, float] | None]) -> tuple[int, int] | None:
    """(axis, sign) the tracked centroids move (axis 0: x, 1: y; sign +1 right/down), or None.

    The axis is the one along which the steps travel farther; the sign is the one more than half
    of all frame-to-frame steps take along it (steps shorter than :data:`STILL_STEP` take
    neither). A frame with no object is bridged: the step across it counts once for each frame
    step it spans, at its mean length."""
    present = [i for i, c in enumerate(centroids) if c is not None]
    if len(present) < 2:
        return None
    pts = np.array([centroids[i] for i in present], dtype=np.float64)
    span = np.diff(present).astype(np.float64)  # frame steps each step spans
    steps = np.diff(pts, axis=0)  # [S, 2] (dx, dy)
    axis = int(np.abs(steps[:, 1]).sum() > np.abs(steps[:, 0]).sum())
    along = steps[:, axis] / span
    for sign in (1, -1):
        if span[along * sign >= STILL_STEP].sum() * 2 > len(centroids) - 1:
            return axis, sign
    return None


def read_clip(clip: np.ndarray) -> dict:
    """What the judge sees in one uint8 clip [F, H, W, 3]: per frame readings, the majority
    reading, its share of the frames and the motion (``direction_of``)."""
    frames = [_frame(f) for f in clip]
    keys = [(pc, ps) for pc, ps, _ in frames]
    majority, agree = Counter(keys).most_common(1)[0]
    return {"frames": frames, "majority": majority, "consistency": agree / len(frames),
            "motion": direction_of([c for _, _, c in frames])}


def _as_uint8(clips: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(clips, torch.Tensor):
        return video.to_uint8(clips)
    return clips


def judge(clips: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, np.ndarray]:
    """Per-clip verdicts against the prompts, for clips float [B, 3, F, H, W] in [-1, 1] or uint8 [B, F, H, W, 3].

    Returns arrays [B]: booleans ``count_ok``, ``color_ok``, ``direction_ok``, ``all_ok`` and
    floats ``consistency`` and ``partial`` (mean of the three verdicts and the consistency) in [0, 1].
    """
    arr = _as_uint8(clips)
    if len(arr) != len(prompts):
        raise ValueError(f"{len(arr)} clips but {len(prompts)} prompts")
    specs = [video.parse_prompt(p) for p in prompts]
    out: dict[str, list] = {k: [] for k in ("count_ok", "color_ok", "direction_ok", "consistency")}
    for clip, spec in zip(arr, specs):
        r = read_clip(clip)
        counts = [sum(pc) for pc, _, _ in r["frames"]]
        n = len(counts)
        out["count_ok"].append(Counter(counts).most_common(1)[0][0] == spec.count)
        out["color_ok"].append(sum(sum(pc) > 0 and pc[spec.color] == sum(pc) for pc, _, _ in r["frames"]) * 2 > n)
        out["direction_ok"].append(r["motion"] == video.MOTION[video.DIRECTIONS[spec.direction]])
        out["consistency"].append(r["consistency"])
    res = {k: np.array(v, dtype=np.float64 if k == "consistency" else bool) for k, v in out.items()}
    res["all_ok"] = res["count_ok"] & res["color_ok"] & res["direction_ok"] & (res["consistency"] == 1.0)
    res["partial"] = (res["count_ok"].astype(float) + res["color_ok"] + res["direction_ok"] + res["consistency"]) / 4.0
    return res


def accuracy(clips: torch.Tensor | np.ndarray, prompts: list[str]) -> dict[str, float]:
    """Mean of each verdict of :func:`judge`."""
    return {k: float(np.mean(v)) for k, v in judge(clips, prompts).items()}
