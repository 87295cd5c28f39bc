"""GenEval's rules (Ghosh et al. 2023) over any detector's objects, its metadata files, and a reward.

A GenEval prompt comes with a structured spec (one JSON object a line in GenEval's and
flow_grpo's ``*_metadata.jsonl``): its ``tag`` (the task), the objects it ``include``\\ s
(``class``, ``count``, optional ``color``, optional ``position``: [relation, index of the
other include item]) and those it ``exclude``\\ s (``class``, ``count``: fewer than ``count``
of the class may appear; counting prompts exclude N + 1, so counting is exact). A detector
reads an image into :class:`Detection` s (class, box, colour, confidence); the rules below
decide from those alone, so any detector plugs in: the shapes world's classical judge, or a
real object detector given as ``package.module:function`` (:func:`geneval_reward`).

Two scores an image:
- :func:`check`, GenEval's verdict (its ``evaluation/evaluate_images.py``): every include item
  holds (AND), no exclude item is violated (OR of violations).
- :func:`partial_credit`, flow_grpo's GenEval reward (the ``score`` of ``evaluate_reward`` in
  its reward server): the mean of one term a requirement.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rewardiff.errors import UserError

TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's default: a share of the two boxes' sizes that an offset must exceed


class Detection(NamedTuple):
    """One object a detector read in an image.

    Fields:
        cls: its class name ("circle", "dog").
        box: (x0, y0, x1, y1) in pixels, x to the right and y down (image coordinates).
        color: its colour name, or None where the detector gives none (colour checks then fail).
        score: the detector's confidence; the rules read a class's objects most confident first.
    """

    cls: str
    box: tuple[float, float, float, float]
    color: str | None = None
    score: float = 1.0


@dataclass(frozen=True)
class Item:
    """An include clause: at least ``count`` objects of ``cls`` (in ``color``; placed
    ``position[0]`` of the objects of include item ``position[1]``)."""

    cls: str
    count: int = 1
    color: str | None = None
    position: tuple[str, int] | None = None


@dataclass(frozen=True)
class Exclude:
    """An exclude clause: fewer than ``count`` objects of ``cls``."""

    cls: str
    count: int


@dataclass(frozen=True)
class GenEvalSpec:
    """A prompt and what it asks, as a line of GenEval's metadata."""

    tag: str
    prompt: str
    include: tuple[Item, ...]
    exclude: tuple[Exclude, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The line of a metadata file for this spec (GenEval's keys and order)."""
        inc = []
        for it in self.include:
            d: dict[str, Any] = {"class": it.cls, "count": it.count}
            if it.color is not None:
                d["color"] = it.color
            if it.position is not None:
                d["position"] = list(it.position)
            inc.append(d)
        out: dict[str, Any] = {"tag": self.tag, "include": inc}
        if self.exclude:
            out["exclude"] = [{"class": e.cls, "count": e.count} for e in self.exclude]
        return {**out, "prompt": self.prompt}


# ----------------------------------------------------------------------------- metadata files


def parse_spec(obj: Any) -> GenEvalSpec:
    """One metadata object -> its spec; ``ValueError`` with a short reason for a bad one."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    tag, prompt = obj.get("tag"), obj.get("prompt")
    if not isinstance(tag, str) or not tag:
        raise ValueError("'tag' must be a non-empty string")
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError("'prompt' must be a non-empty string")
    include = obj.get("include")
    if not isinstance(include, list) or not include:
        raise ValueError("'include' must be a non-empty list of objects")
    items = tuple(_item(x, i) for i, x in enumerate(include))
    exclude = obj.get("exclude", [])
    if not isinstance(exclude, list):
        raise ValueError("'exclude' must be a list of objects")
    excl = tuple(Exclude(_cls(x, "exclude"), _count(x, "exclude")) for x in exclude)
    return GenEvalSpec(tag, prompt.strip(), items, excl)


def _cls(x: Any, where: str) -> str:
    if not isinstance(x, dict) or not isinstance(x.get("class"), str) or not x["class"]:
        raise ValueError(f"each {where} entry must be an object with a 'class' string")
    return x["class"]


def _count(x: dict, where: str) -> int:
    c = x.get("count", 1 if where == "include" else None)
    if isinstance(c, str) and c.isdigit():  # some files write counts as strings
        c = int(c)
    if isinstance(c, bool) or not isinstance(c, int) or c < 1:
        raise ValueError(f"{where} 'count' of {x.get('class')!r} must be an integer >= 1, got {c!r}")
    return c


def _item(x: Any, index: int) -> Item:
    cls = _cls(x, "include")
    color = x.get("color")
    if color is not None and not isinstance(color, str):
        raise ValueError(f"'color' of {cls!r} must be a string, got {color!r}")
    pos = x.get("position")
    if pos is not None:
        if isinstance(pos, list) and len(pos) == 2 and isinstance(pos[1], str) and pos[1].isdigit():
            pos = [pos[0], int(pos[1])]  # some files write the index as a string
        ok = isinstance(pos, list) and len(pos) == 2 and pos[0] in RELATIONS and isinstance(pos[1], int)
        if not ok or not 0 <= pos[1] < index:
            raise ValueError(f"'position' of {cls!r} must be [relation, index of an earlier include item] with a "
                             f"relation of {', '.join(RELATIONS)}, got {pos!r}")
        pos = (pos[0], pos[1])
    return Item(cls, _count(x, "include"), color, pos)


def read_metadata(path: str | Path) -> list[GenEvalSpec]:
    """The specs of a GenEval metadata file (one JSON object a line; blank lines skipped).

    Raises:
        UserError: one line naming the file and the line, for a missing file, a line that is
            not JSON or not a valid spec, or a file with no specs.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"GenEval metadata file not found: {p}")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"GenEval metadata file {p} is not UTF-8 text") from None
    specs = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            specs.append(parse_spec(json.loads(line)))
        except json.JSONDecodeError as e:
            raise UserError(f"{p} line {n}: not valid JSON ({e.msg})") from None
        except ValueError as e:
            raise UserError(f"{p} line {n}: {e}") from None
    if not specs:
        raise UserError(f"GenEval metadata file {p} holds no prompts")
    return specs


def write_metadata(path: str | Path, specs: Sequence[GenEvalSpec]) -> Path:
    """Write ``specs`` as a GenEval metadata file (one JSON object a line), atomically."""
    from rewardiff.io import atomic_write_text

    return atomic_write_text(path, "".join(json.dumps(s.to_json()) + "\n" for s in specs))


# ----------------------------------------------------------------------------- the rules


def relative_position(box_a: Sequence[float], box_b: Sequence[float], threshold: float = POSITION_THRESHOLD) -> set[str]:
    """The relations of A to B ("left of", "right of", "above", "below"), by GenEval's rule.

    1. offset = centre(A) - centre(B), the centres of the boxes (pixels, y down);
    2. each axis's offset shrinks toward 0 by ``threshold`` x (size of A + size of B) on that axis;
    3. none when both shrunk offsets vanish; else, with (u, v) = shrunk offset / |offset|,
       "left of" when u < -0.5, "right of" when u > 0.5, "above" when v < -0.5, "below" when v > 0.5.
    """
    a, b = np.asarray(box_a, float)[:4].reshape(2, 2), np.asarray(box_b, float)[:4].reshape(2, 2)
    offset = a.mean(0) - b.mean(0)  # (dx, dy)
    slack = threshold * ((a[1] - a[0]) + (b[1] - b[0]))
    shrunk = np.sign(offset) * np.maximum(np.abs(offset) - slack, 0.0)
    if np.all(np.abs(shrunk) < 1e-3):
        return set()
    u, v = shrunk / np.linalg.norm(offset)
    rel = {"left of": u < -0.5, "right of": u > 0.5, "above": v < -0.5, "below": v > 0.5}
    return {k for k, holds in rel.items() if holds}


Relation = Callable[[Sequence[float], Sequence[float]], set[str]]


def by_class(detections: Sequence[Detection]) -> dict[str, list[Detection]]:
    """Detections grouped by class, most confident first (ties keep the detector's order)."""
    out: dict[str, list[Detection]] = {}
    for d in sorted(detections, key=lambda d: -d.score):
        out.setdefault(d.cls, []).append(d)
    return out


def _placed(found: list[Detection], rel: str, targets: list[Detection] | None, relation: Relation) -> bool:
    """Every object of ``found`` stands ``rel`` of every object of ``targets`` (None: no target)."""
    return targets is not None and all(rel in relation(d.box, t.box) for d in found for t in targets)


def check(spec: GenEvalSpec, detections: Sequence[Detection], relation: Relation = relative_position) -> bool:
    """GenEval's verdict on one image.

    For each include item in turn: its ``count`` most confident objects of the class must exist,
    all be of its colour (when it names one) and all stand in its relation to every object
    matched by the item it points at (which must have matched). No exclude item may reach its
    count among all objects of its class.
    """
    objects = by_class(detections)
    groups: list[list[Detection] | None] = []
    correct = True
    for item in spec.include:
        found = objects.get(item.cls, [])[: item.count]
        ok = len(found) >= item.count
        if ok and item.color is not None:
            ok = sum(d.color == item.color for d in found) >= item.count
        if ok and item.position is not None:
            ok = _placed(found, item.position[0], groups[item.position[1]], relation)
        groups.append(found if ok else None)
        correct &= ok
    return correct and all(len(objects.get(e.cls, [])) < e.count for e in spec.exclude)


def partial_credit(spec: GenEvalSpec, detections: Sequence[Detection], relation: Relation = relative_position) -> float:
    """flow_grpo's GenEval reward: the mean of one term a requirement, in [0, 1].

    For each include item, with n all the objects of its class:
    1. count: 1 - |count - n| / count (clamped at 0);
    2. when n != count the item fails, and an item that names a colour or a position adds a 0;
    3. else colour: the share of the n objects in the colour (the item fails unless all are);
       then, if it still holds, position: 1 when every object stands in the relation to every
       object of the item it points at (which must have held), else 0.
    Exclude clauses add no term (the exact count of step 1 covers counting).

    Two departures from flow_grpo's code: a count term there goes below 0 for more than twice
    the count (clamped here, so the reward stays in [0, 1]), and a failed position adds a 0
    and then a 1 there (a single 0 here).
    """
    objects = by_class(detections)
    groups: list[list[Detection] | None] = []
    terms: list[float] = []
    for item in spec.include:
        found = objects.get(item.cls, [])
        terms.append(max(0.0, 1.0 - abs(item.count - len(found)) / item.count))
        ok = len(found) == item.count
        if not ok and (item.color is not None or item.position is not None):
            terms.append(0.0)
        if ok and item.color is not None:
            hits = sum(d.color == item.color for d in found)
            terms.append(hits / item.count)
            ok = hits == item.count
        if ok and item.position is not None:
            ok = _placed(found, item.position[0], groups[item.position[1]], relation)
            terms.append(float(ok))
        groups.append(found if ok else None)
    return float(np.mean(terms))


def score(specs: Sequence[GenEvalSpec], detections: Sequence[Sequence[Detection]],
          relation: Relation = relative_position) -> tuple[np.ndarray, np.ndarray]:
    """(GenEval's verdicts bool [B], flow_grpo's partial credits float [B]) of B images."""
    if len(specs) != len(detections):
        raise ValueError(f"{len(specs)} specs but {len(detections)} images")
    correct = np.array([check(s, d, relation) for s, d in zip(specs, detections)], bool)
    partial = np.array([partial_credit(s, d, relation) for s, d in zip(specs, detections)], float)
    return correct, partial


def summarize(specs: Sequence[GenEvalSpec], correct: np.ndarray, partial: np.ndarray) -> dict[str, Any]:
    """GenEval's summary: per task the share of images correct (``accuracy``), ``n`` images,
    the share of prompts with at least one correct image and the mean partial credit;
    ``overall`` is the mean of the tasks' accuracies (as GenEval reports), ``partial`` the mean
    of their partial credits, ``images_correct`` and ``prompts_correct`` over every image."""
    tags = [s.tag for s in specs]
    order = [t for t in TASKS if t in tags] + [t for t in dict.fromkeys(tags) if t not in TASKS]
    tasks = {}
    for t in order:
        idx = [i for i, tag in enumerate(tags) if tag == t]
        tasks[t] = {"accuracy": float(correct[idx].mean()), "n": len(idx), "partial": float(partial[idx].mean()),
                    "prompts_correct": _prompts_correct([specs[i] for i in idx], correct[idx])}
    return {"tasks": tasks, "overall": float(np.mean([v["accuracy"] for v in tasks.values()])),
            "partial": float(np.mean([v["partial"] for v in tasks.values()])), "images": len(specs),
            "images_correct": float(correct.mean()), "prompts_correct": _prompts_correct(specs, correct)}


def _prompts_correct(specs: Sequence[GenEvalSpec], correct: np.ndarray) -> float:
    """The share of distinct prompts with at least one correct image (GenEval's "% correct prompts")."""
    best: dict[GenEvalSpec, bool] = {}
    for s, c in zip(specs, correct):
        best[s] = best.get(s, False) or bool(c)
    return float(np.mean(list(best.values())))


# ----------------------------------------------------------------------------- a reward


Detector = Callable[[Any], Sequence[Sequence[Any]]]


def as_detection(obj: Any) -> Detection:
    """A :class:`Detection`, or a dict with ``class`` and ``box`` (and optional ``color``, ``score``)."""
    if isinstance(obj, Detection):
        return obj
    if isinstance(obj, dict) and "class" in obj and "box" in obj:
        return Detection(str(obj["class"]), tuple(float(v) for v in obj["box"][:4]), obj.get("color"),  # type: ignore[arg-type]
                         float(obj.get("score", 1.0)))
    raise UserError(f"a detector must return Detection objects or dicts with 'class' and 'box', got {obj!r:.80}")


def geneval_reward(detector: str | Detector, metadata: str | Path | Sequence[GenEvalSpec] | Callable[[str], GenEvalSpec],
                   strict: bool = False, name: str = "geneval"):
    """A black-box reward in [0, 1] by GenEval's rules over any detector.

    Args:
        detector: ``detect(images [B, 3, H, W] in [-1, 1]) -> B lists of detections``
            (:class:`Detection` or dicts, see :func:`as_detection`), or its ``package.module:function``.
        metadata: what each prompt asks: a metadata file, its specs, or ``spec_for(prompt)``.
        strict: 1/0 by :func:`check` (GenEval's verdict) instead of :func:`partial_credit`.
        name: the reward's name.
    """
    from rewardiff import plugins
    from rewardiff.rewards.base import RewardFn

    detect = plugins.load(detector) if isinstance(detector, str) else detector
    spec_for = metadata if callable(metadata) else _spec_table(metadata)

    def fn(x, prompts: list[str]):
        import torch

        specs = [spec_for(p) for p in prompts]
        found = [[as_detection(d) for d in image] for image in detect(x)]
        correct, partial = score(specs, found)
        return torch.as_tensor(correct if strict else partial, dtype=torch.float32, device=x.device)

    kind = "1 if GenEval's rules hold, else 0" if strict else "flow_grpo's partial credit in [0, 1]"
    return RewardFn(name, False, (0.0, 1.0), f"GenEval over a detector: {kind}", fn)


def _spec_table(metadata: str | Path | Sequence[GenEvalSpec]) -> Callable[[str], GenEvalSpec]:
    """``spec_for(prompt)`` over a metadata file or a list of specs (UserError for other prompts)."""
    specs = read_metadata(metadata) if isinstance(metadata, (str, Path)) else list(metadata)
    table = {s.prompt: s for s in specs}

    def spec_for(prompt: str) -> GenEvalSpec:
        if prompt.strip() not in table:
            raise UserError(f"prompt {prompt!r} is not in the GenEval metadata ({len(table)} prompts)")
        return table[prompt.strip()]

    return spec_for
