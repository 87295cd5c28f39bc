"""Strict JSON for a run's files: ``null`` where a measure is NaN or infinite.

Python's ``json`` writes ``NaN`` and ``Infinity``, which no JSON parser outside Python need
accept. A measure can be undefined, e.g. the diversity of an evaluation where no prompt has two
samples (:func:`~rewardiff.report.diversity.diversity_by_prompt`), so every JSON file a run
writes goes through :func:`strict_json` first, and reports show such a value as "n/a".
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rewardiff.io import atomic_write_text


def strict_json(obj: Any) -> Any:
    """``obj`` with every non-finite float, at any depth of dicts, lists and tuples, replaced by None.

    >>> strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": "x"})
    {'a': None, 'b': [1.0, None], 'c': 'x'}
    """
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def strict_dumps(obj: Any, indent: int | None = None) -> str:
    """``json.dumps`` of :func:`strict_json` (obj), refusing anything that is still not strict JSON."""
    return json.dumps(strict_json(obj), indent=indent, allow_nan=False)


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON to ``path``, atomically; returns the path."""
    return atomic_write_text(path, strict_dumps(obj, indent))
