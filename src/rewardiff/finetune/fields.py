"""The fields of :class:`~rewardiff.finetune.config.FinetuneConfig` as a table, read from its source.

Every field carries a one-line ``# comment``; this module reads them with ``ast`` (the fields)
and ``tokenize`` (the comments), so the README's table of fields is generated, never typed:

    python -m rewardiff.finetune.fields            # print the markdown table
    python -m rewardiff.finetune.fields --write    # rewrite it in README.md, between the markers
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import json
import sys
import textwrap
import tokenize
from pathlib import Path
from typing import Any, NamedTuple

from rewardiff.finetune.config import FinetuneConfig

START, END = "<!-- config-fields:start -->", "<!-- config-fields:end -->"


class ConfigField(NamedTuple):
    """One field of the config, as its source writes it."""

    name: str
    type: str  # the annotation's source, e.g. "int"
    default: Any  # the default value
    comment: str  # the text of the field's comment (the last on its lines), "" when it has none


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line (without ``#``)."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {t.start[0]: t.string.lstrip("#").strip() for t in tokens if t.type == tokenize.COMMENT}


def config_fields(cls: type = FinetuneConfig) -> list[ConfigField]:
    """Every field of the dataclass ``cls`` in order: name, type, default and the comment on its
    line (the last one, for a field written over several lines)."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = _comments(source)
    body = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)).body
    defaults = {f.name: _default(f) for f in dataclasses.fields(cls)}
    out = []
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id in defaults:
            name = node.target.id
            lines = [comments[i] for i in range(node.lineno, node.end_lineno + 1) if i in comments]
            out.append(ConfigField(name, ast.unparse(node.annotation), defaults[name], lines[-1] if lines else ""))
    return out


def _default(f: dataclasses.Field) -> Any:
    """A field's default, built when it has a factory (None when it has neither)."""
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else None


def _literal(v: Any) -> str:
    """A default as a YAML preset writes it: true / false, null, numbers, strings in quotes."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return json.dumps(v)
    return repr(v)


def _cell(text: str, code: bool = False) -> str:
    """``text`` safe in a markdown table cell: pipes escaped, and asterisks outside code."""
    text = text.replace("|", "\\|")
    return f"`{text}`" if code else text.replace("*", "\\*")


def config_table(cls: type = FinetuneConfig) -> str:
    """A markdown table of :func:`config_fields`, one row a field."""
    rows = ["| field | type | default | what |", "|---|---|---|---|"]
    rows += [f"| `{f.name}` | {_cell(f.type)} | {_cell(_literal(f.default), code=True)} | {_cell(f.comment)} |" for f in config_fields(cls)]
    return "\n".join(rows) + "\n"


def replace_table(text: str, table: str) -> str:
    """``text`` with what lies between the markers replaced by ``table``.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    head, sep, rest = text.partition(START)
    middle, sep2, tail = rest.partition(END)
    if not sep or not sep2:
        raise ValueError(f"no {START} ... {END} markers")
    return f"{head}{START}\n{table}{END}{tail}"


def main(argv: list[str] | None = None) -> None:
    """Print the table, or with ``--write [README]`` rewrite it in place (default ``README.md``)."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        sys.stdout.write(config_table())
        return
    if args[0] != "--write" or len(args) > 2:
        sys.exit("usage: python -m rewardiff.finetune.fields [--write [README.md]]")
    path = Path(args[1] if len(args) == 2 else "README.md")
    try:
        path.write_text(replace_table(path.read_text(), config_table()))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path}: {e}")
    print(f"wrote the config fields table into {path}")


if __name__ == "__main__":
    main()
