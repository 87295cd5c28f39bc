"""Prompt sets by name (``rewardiff.plugins.PROMPT_SETS``) or from a file, and the fixed evaluation set."""

from __future__ import annotations

import json
from pathlib import Path

from rewardiff import plugins
from rewardiff.errors import UserError

EVAL_SEED = 10_000  # evaluation seeds are EVAL_SEED + i: never used by training (seeds < EVAL_SEED)

# Simple animals, as DDPO and AlignProp train on; the held-out ones are for evaluation only.
ANIMALS = ["cat", "dog", "horse", "monkey", "rabbit", "zebra", "spider", "bird", "sheep", "deer", "cow", "goat", "lion",
           "tiger", "bear", "frog", "chicken", "duck", "goose", "bee", "pig", "turkey", "fly", "llama", "camel", "bat",
           "gorilla", "hedgehog", "kangaroo", "owl", "fox", "wolf", "squirrel", "mouse", "elephant", "giraffe"]
ANIMALS_HELD_OUT = ["panda", "koala", "penguin", "otter", "raccoon", "dolphin", "cheetah", "flamingo", "beaver"]


def animals() -> list[str]:
    """Simple animals (training prompts)."""
    return list(ANIMALS)


def animals_held_out() -> list[str]:
    """Simple animals kept for evaluation."""
    return list(ANIMALS_HELD_OUT)


def prompt_set(spec: str) -> list[str]:
    """Prompts by name or from a file.

    Names: those of ``plugins.PROMPT_SETS`` (``train``, ``held-out``, ``all``: the shapes world's
    counting prompts; ``geneval-train``, ``geneval-held-out``, ``geneval-all``: its GenEval
    grammar; ``animals``, ``animals-held-out``: simple animals). Files: see :func:`read_prompt_file`.
    """
    if spec in plugins.PROMPT_SETS:
        return list(plugins.load(plugins.PROMPT_SETS[spec])())
    if not Path(spec).is_file():
        raise UserError(f"prompt set {spec!r} is neither {', '.join(plugins.PROMPT_SETS)} nor a file")
    return read_prompt_file(spec)


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a file: a text file with one prompt a line (blank lines and lines that
    start with ``#`` skipped), a ``.json`` file holding a list of strings or ``{"prompts": [...]}``,
    or a ``.jsonl`` file in GenEval's metadata format (:func:`rewardiff.geneval.read_metadata`).

    Raises:
        UserError: naming the file, when it is missing, not UTF-8 text, not valid JSON, or holds
            no prompts; for a ``.jsonl`` file, naming the line that is not a GenEval spec.
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"prompt file not found: {p}")
    if p.suffix == ".jsonl":
        from rewardiff.geneval import read_metadata

        return [spec.prompt for spec in read_metadata(p)]
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"prompt file {p} is not UTF-8 text (a binary file?)") from None
    if p.suffix == ".json":
        prompts = _json_prompts(p, text)
    else:
        prompts = [s for s in (line.strip() for line in text.splitlines()) if s and not s.startswith("#")]
    if not prompts:
        raise UserError(f"prompt file {p} holds no prompts")
    return prompts


def _json_prompts(p: Path, text: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"prompt file {p} is not valid JSON: {e}") from None
    data = data.get("prompts") if isinstance(data, dict) else data
    if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
        raise UserError(f"prompt file {p} must hold a list of strings or {{\"prompts\": [...]}}")
    return [x.strip() for x in data if x.strip()]


def eval_set(prompts: list[str], n: int) -> tuple[list[str], list[int]]:
    """``n`` (prompt, seed) pairs cycling through ``prompts``; the same for every run."""
    return [prompts[i % len(prompts)] for i in range(n)], [EVAL_SEED + i for i in range(n)]
