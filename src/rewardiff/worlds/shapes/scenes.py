"""Images of any GenEval spec of the shapes world: several shapes and colours, never touching.

Like :func:`rewardiff.worlds.shapes.data.render`, deterministic from an rng: the same seed
gives the same images. Shapes keep at least 2 px apart (not even corners touch), so the
judge's connected components read each one; an object asked ``position[0]`` of another
stands there with a clear margin (its box lies wholly on that side, and the relation holds
with GenEval's rule at threshold :data:`MARGIN_THRESHOLD`, not just at its 0.1); everything else is placed at random, and an
object of no asked colour takes a random colour.
"""

from __future__ import annotations

import numpy as np
import torch

from rewardiff.geneval import GenEvalSpec, relative_position
from rewardiff.worlds.shapes import compositions, data as shapes

MARGIN_THRESHOLD = 0.25  # a position holds with this threshold of GenEval's rule (the judge's is 0.1)
RADIUS = (3.2, 5.0)  # the shapes' radii in pixels, as in the counting world
JITTER = 12.0  # each object's colour varies by up to this much a channel (of 255)


def _objects(spec: GenEvalSpec, rng: np.random.Generator) -> list[tuple[int, int, int]]:
    """(shape, colour, include item) of every object to draw; a colourless item's objects share a random colour."""
    out = []
    for k, item in enumerate(spec.include):
        color = shapes.COLORS.index(item.color) if item.color else int(rng.integers(len(shapes.COLORS)))
        out += [(shapes.SHAPES.index(item.cls), color, k)] * item.count
    return out


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of a mask's pixels, edges exclusive at the end."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _positions_hold(spec: GenEvalSpec, objects: list[tuple[int, int, int]], masks: list[np.ndarray]) -> bool:
    """Every asked relation holds between the objects' boxes with the clear margin."""
    for k, item in enumerate(spec.include):
        if item.position is None:
            continue
        rel, target = item.position
        mine = [_box(m) for (_, _, j), m in zip(objects, masks) if j == k]
        theirs = [_box(m) for (_, _, j), m in zip(objects, masks) if j == target]
        if not all(_apart(rel, a, b) and rel in relative_position(a, b, MARGIN_THRESHOLD) for a in mine for b in theirs):
            return False
    return True


def _apart(rel: str, a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    """Box ``a`` lies wholly on the ``rel`` side of box ``b`` (x0, y0, x1, y1; y down): the
    renderer's own reading of a relation, apart from GenEval's rule that the judge applies."""
    sides = {"left of": a[2] <= b[0], "right of": a[0] >= b[2], "above": a[3] <= b[1], "below": a[1] >= b[3]}
    return sides[rel]


def _place(objects: list[tuple[int, int, int]], rng: np.random.Generator, tries: int) -> list[np.ndarray] | None:
    """A mask an object, at least 2 px from every other, or None when they did not fit."""
    occupied = np.zeros((shapes.SIZE, shapes.SIZE), bool)
    masks: list[np.ndarray] = []
    for _ in range(tries):
        shape = objects[len(masks)][0]
        r = rng.uniform(*RADIUS)
        cy, cx = rng.uniform(r + 1, shapes.SIZE - r - 1, size=2)
        mask = shapes._shape_mask(shape, cy, cx, r)
        if mask.sum() < 12 or (shapes._dilate(mask, 2) & occupied).any():
            continue
        occupied |= mask
        masks.append(mask)
        if len(masks) == len(objects):
            return masks
    return None


def render(spec: GenEvalSpec, rng: np.random.Generator) -> np.ndarray:
    """One uint8 image [SIZE, SIZE, 3] that meets ``spec`` (its exclude clauses too: no more
    objects than asked); see :func:`scene`."""
    return scene(spec, rng)[0]


def scene(spec: GenEvalSpec, rng: np.random.Generator, tries: int = 200,
          restarts: int = 200) -> tuple[np.ndarray, list[tuple[int, int, tuple[int, int, int, int]]]]:
    """The image of :func:`render` and what it holds: (shape, colour, box) of each object drawn.
    Placement starts over while the shapes do not fit or an asked relation fails."""
    objects = _objects(spec, rng)
    for _ in range(restarts):
        masks = _place(objects, rng, tries)
        if masks is not None and _positions_hold(spec, objects, masks):
            truth = [(shape, color, _box(m)) for (shape, color, _), m in zip(objects, masks)]
            return _paint(objects, masks, rng), truth
    raise RuntimeError(f"could not place the objects of {spec.prompt!r}")


def _paint(objects: list[tuple[int, int, int]], masks: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    img = np.zeros((shapes.SIZE, shapes.SIZE, 3), np.uint8)
    for (_, color, _), mask in zip(objects, masks):
        img[mask] = np.clip(shapes.COLOR_RGB[color] + rng.uniform(-JITTER, JITTER, 3), 0, 255).astype(np.uint8)
    return img


def _draw_prompts(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` training prompts: a task by :data:`~compositions.TASK_WEIGHTS`, then one of its prompts."""
    tasks = list(compositions.TASK_WEIGHTS)
    weights = np.array([compositions.TASK_WEIGHTS[t] for t in tasks])
    pools = {t: compositions.train_prompts(t) for t in tasks}
    chosen = rng.choice(len(tasks), size=n, p=weights / weights.sum())
    return [pools[tasks[k]][int(rng.integers(len(pools[tasks[k]])))] for k in chosen]


def make_batch(n: int, seed: int, prompts: list[str] | None = None) -> tuple[torch.Tensor, list[str], list[GenEvalSpec]]:
    """``n`` images in [-1, 1] [n, 3, 32, 32], their prompts and specs: drawn uniformly from
    ``prompts`` when given, else training prompts by task weight (:func:`_draw_prompts`)."""
    rng = np.random.default_rng(seed)
    chosen = [prompts[i] for i in rng.integers(0, len(prompts), size=n)] if prompts else _draw_prompts(n, rng)
    specs = [compositions.spec_of(p) for p in chosen]
    images = np.stack([render(s, rng) for s in specs])
    return shapes.to_tensor(images), chosen, specs
