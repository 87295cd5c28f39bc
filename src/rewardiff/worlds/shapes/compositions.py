"""GenEval in miniature: the shapes world's second grammar, with GenEval's six tasks.

Beside the counting prompts of :mod:`~rewardiff.worlds.shapes.data` ("three green squares"),
this grammar writes GenEval's tasks over the world's 3 shapes and 4 colours (GenEval's
prompts drop their "a photo of"):

    single_object  "a circle"                          3 prompts, any colour
    two_object     "a circle and a square"             6 (two different shapes, any colours)
    counting       "three green squares"               36 (2 to 4, as GenEval; exact: exclude N + 1)
    colors         "a red circle"                      12
    position       "a circle left of a square"         24 (left of, right of, above, below)
    color_attr     "a red square and a blue triangle"  72 (two different shapes, two different colours)

Each prompt has a :class:`~rewardiff.geneval.GenEvalSpec` as a line of GenEval's metadata
would hold it (position: include the second-named object first, then the first with
[relation, 0], as GenEval writes "a photo of a cow right of a laptop").

The held-out split is by composition, like GenEval's unseen split: every atom of a held-out
prompt (a coloured shape, a colourless shape, a count, a relation) appears in training
prompts; only the combination is new (:data:`HELD_OUT`, 26 of 153 prompts):
- single_object: "a triangle" (1 of 3; triangles are trained with colours and in pairs);
- two_object: "a triangle and a circle" (1 of 6; "a circle and a triangle" is trained);
- counting: the counting world's held-out prompts (6 of 36: four triangles of every colour,
  three green squares, two blue circles);
- colors: "a yellow square", "a blue triangle" (2 of 12);
- position: one (shape, relation, shape) of four ordered pairs (4 of 24);
- color_attr: six pairings of two coloured shapes, in both orders (12 of 72), each with its
  colours swapped in training ("a blue circle and a red square" for "a red circle and a
  blue square").

Words: :data:`GENEVAL_VOCAB` is the counting world's vocabulary followed by the new words, so
counting prompts keep their token ids; :func:`tokenize` pads to :data:`GENEVAL_MAX_TOKENS`.
"""

from __future__ import annotations

from functools import cache

import torch

from rewardiff.geneval import RELATIONS, TASKS, Exclude, GenEvalSpec, Item
from rewardiff.worlds.shapes import data as shapes

NEW_WORDS = ("a", "and", "left", "right", "of", "above", "below")
GENEVAL_VOCAB = shapes.VOCAB + NEW_WORDS
GENEVAL_MAX_TOKENS = 8  # the longest prompt, "a red square and a blue triangle", has 7 words
# The batch maker draws a task with these weights, then one of its training prompts uniformly.
TASK_WEIGHTS = {"single_object": 0.10, "two_object": 0.15, "counting": 0.20, "colors": 0.15, "position": 0.20,
                "color_attr": 0.20}
_COLOR_ATTR_HELD_OUT = (  # unordered pairs of (colour, shape); both word orders are held out
    (("red", "circle"), ("blue", "square")), (("green", "circle"), ("yellow", "square")),
    (("blue", "circle"), ("green", "triangle")), (("yellow", "circle"), ("red", "triangle")),
    (("red", "square"), ("yellow", "triangle")), (("green", "square"), ("blue", "triangle")),
)
HELD_OUT: dict[str, tuple[str, ...]] = {
    "single_object": ("a triangle",),
    "two_object": ("a triangle and a circle",),
    "counting": shapes.HELD_OUT,
    "colors": ("a yellow square", "a blue triangle"),
    "position": ("a circle above a square", "a square left of a triangle", "a triangle below a circle",
                 "a triangle right of a square"),
    "color_attr": tuple(f"a {a[0]} {a[1]} and a {b[0]} {b[1]}" for p in _COLOR_ATTR_HELD_OUT for a, b in (p, p[::-1])),
}


# ----------------------------------------------------------------------------- the prompts


def _pairs() -> list[tuple[str, str]]:
    """Ordered pairs of two different shapes."""
    return [(a, b) for a in shapes.SHAPES for b in shapes.SHAPES if a != b]


def _task_specs(tag: str) -> list[GenEvalSpec]:
    """Every spec of one task, in a fixed order."""
    S, C = shapes.SHAPES, shapes.COLORS
    if tag == "single_object":
        return [GenEvalSpec(tag, f"a {s}", (Item(s),)) for s in S]
    if tag == "two_object":
        return [GenEvalSpec(tag, f"a {a} and a {b}", (Item(a), Item(b))) for a, b in _pairs()]
    if tag == "counting":
        return [GenEvalSpec(tag, f"{shapes.COUNT_WORDS[n - 1]} {c} {s}s", (Item(s, n, c),), (Exclude(s, n + 1),))
                for n in (2, 3, 4) for c in C for s in S]
    if tag == "colors":
        return [GenEvalSpec(tag, f"a {c} {s}", (Item(s, 1, c),)) for c in C for s in S]
    if tag == "position":
        return [GenEvalSpec(tag, f"a {a} {r} a {b}", (Item(b), Item(a, position=(r, 0)))) for a, b in _pairs() for r in RELATIONS]
    return [GenEvalSpec(tag, f"a {ca} {a} and a {cb} {b}", (Item(a, 1, ca), Item(b, 1, cb)))
            for a, b in _pairs() for ca in C for cb in C if ca != cb]


@cache
def _table() -> dict[str, GenEvalSpec]:
    return {s.prompt: s for t in TASKS for s in _task_specs(t)}


def all_specs(task: str | None = None) -> list[GenEvalSpec]:
    """Every spec of the grammar (of one ``task``), held-out ones included."""
    return [s for s in _table().values() if task is None or s.tag == task]


def _held_out() -> set[str]:
    return {p for ps in HELD_OUT.values() for p in ps}


def train_prompts(task: str | None = None) -> list[str]:
    """The grammar's training prompts (of one ``task``)."""
    return [s.prompt for s in all_specs(task) if s.prompt not in _held_out()]


def held_out_prompts(task: str | None = None) -> list[str]:
    """The held-out prompts (of one ``task``): new combinations of trained atoms."""
    return [s.prompt for s in all_specs(task) if s.prompt in _held_out()]


def all_prompts() -> list[str]:
    """Every prompt of the grammar."""
    return [s.prompt for s in all_specs()]


def _normal(prompt: str) -> str:
    return " ".join(prompt.lower().split())


def is_prompt(prompt: str) -> bool:
    """Whether ``prompt`` belongs to the GenEval grammar."""
    return _normal(prompt) in _table()


def spec_of(prompt: str) -> GenEvalSpec:
    """The spec of a GenEval-grammar prompt, or of a counting-world prompt as a counting task
    ("one red circle": one red circle and no second circle); ``ValueError`` for any other."""
    key = _normal(prompt)
    if key in _table():
        return _table()[key]
    try:
        s = shapes.parse_prompt(prompt)
    except ValueError:
        raise ValueError(f"not a GenEval shapes prompt: {prompt!r} (e.g. 'a red circle left of a blue square' is not; "
                         "'a circle left of a square' is)") from None
    shape = shapes.SHAPES[s.shape]
    return GenEvalSpec("counting", key, (Item(shape, s.count, shapes.COLORS[s.color]),), (Exclude(shape, s.count + 1),))


def atoms(spec: GenEvalSpec) -> set[str]:
    """What a prompt is composed of: each object as coloured shape ("red circle") or plain shape
    ("circle"), its count word when above one ("three"), its relation ("left of")."""
    out = set()
    for it in spec.include:
        out.add(f"{it.color} {it.cls}" if it.color else it.cls)
        if it.count > 1:
            out.add(shapes.COUNT_WORDS[it.count - 1])
        if it.position is not None:
            out.add(it.position[0])
    return out


def tokenize(prompts: list[str]) -> torch.Tensor:
    """Token ids [B, GENEVAL_MAX_TOKENS] over :data:`GENEVAL_VOCAB`; "" is the ``<null>`` prompt.
    A counting-world prompt keeps the ids :func:`~rewardiff.worlds.shapes.data.tokenize` gives it."""
    return shapes.tokenize_with(prompts, GENEVAL_VOCAB, GENEVAL_MAX_TOKENS,
                                f"the shapes world's GenEval grammar ({GENEVAL_MAX_TOKENS} words)")
