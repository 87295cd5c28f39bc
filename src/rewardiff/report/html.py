"""A run's ``report.html``: one self-contained file, images embedded, no external assets."""

from __future__ import annotations

import base64
import json
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from rewardiff.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"
REPORT_FILE = "report.html"

_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
         ".svg": "image/svg+xml", ".webp": "image/webp"}

_CSS = """
body { font: 15px/1.5 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1100px; margin: 2em auto; padding: 0 1.2em; background: #fafafa; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; }
h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.8em 0; background: #fff; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.7em; text-align: left; }
th { background: #f0f0f0; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
table.meta th { width: 10em; }
figure { margin: 0.8em 0; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; background: #fff; }
figcaption { color: #666; font-size: 0.85em; }
.missing { color: #a33; font-style: italic; }
"""


@dataclass
class Section:
    """One section of a report.

    Attributes:
        heading: The section title.
        text: Optional paragraph under the heading (plain text; blank lines start new paragraphs).
        images: Paths of images to embed, in order; a missing file is shown as a note.
        table: Optional rows of cells; the first row is the header.
    """

    heading: str
    text: str | None = None
    images: Sequence[str | os.PathLike] = field(default_factory=list)
    table: Sequence[Sequence[Any]] | None = None


def format_value(v: Any) -> str:
    """A cell value as text: floats with four significant digits, everything else ``str``."""
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4g}"
    return str(v)


def _is_number(v: Any) -> bool:
    """True for numbers and for strings that read as one (such cells are right-aligned)."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return False
        return True
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _cell(tag: str, v: Any) -> str:
    cls = ' class="num"' if tag == "td" and _is_number(v) else ""
    return f"<{tag}{cls}>{escape(format_value(v))}</{tag}>"


def table_html(rows: Sequence[Sequence[Any]], css_class: str | None = None) -> str:
    """An HTML table whose first row is the header; empty when ``rows`` is empty."""
    if not rows:
        return ""
    cls = f' class="{escape(css_class)}"' if css_class else ""
    head = "<tr>" + "".join(_cell("th", v) for v in rows[0]) + "</tr>"
    body = "".join("<tr>" + "".join(_cell("td", v) for v in row) + "</tr>" for row in rows[1:])
    return f"<table{cls}><thead>{head}</thead><tbody>{body}</tbody></table>"


def _meta_html(meta: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><th>{escape(str(k))}</th>{_cell('td', v)}</tr>" for k, v in meta.items())
    return f'<table class="meta"><tbody>{rows}</tbody></table>' if rows else ""


def data_uri(path: str | os.PathLike) -> str:
    """The file at ``path`` as a base64 ``data:`` URI (PNG unless the suffix says otherwise)."""
    path = Path(path)
    mime = _MIME.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _image_html(path: str | os.PathLike) -> str:
    name = escape(Path(path).name)
    if not Path(path).is_file():
        return f'<p class="missing">missing image: {name}</p>'
    return f'<figure><img src="{data_uri(path)}" alt="{name}"><figcaption>{name}</figcaption></figure>'


def _text_html(text: str) -> str:
    paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
    return "".join(f"<p>{escape(p)}</p>" for p in paragraphs)


def section_html(section: Section) -> str:
    """The HTML of one section: heading, text, table, then images."""
    parts = [f"<section><h2>{escape(section.heading)}</h2>"]
    if section.text:
        parts.append(_text_html(section.text))
    if section.table:
        parts.append(table_html(section.table))
    parts.extend(_image_html(p) for p in section.images)
    parts.append("</section>")
    return "\n".join(parts)


def render_report(title: str, sections: Sequence[Section], meta: Mapping[str, Any] | None = None) -> str:
    """The whole report as an HTML string (see ``write_report``)."""
    body = "\n".join(section_html(s) for s in sections)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        f"<title>{escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{escape(title)}</h1>\n{_meta_html(meta or {})}</header>\n"
        f"{body}\n</body>\n</html>\n"
    )


def write_report(run_dir: str | os.PathLike, title: str, sections: Sequence[Section],
                 meta: Mapping[str, Any] | None = None) -> Path:
    """Write ``run_dir/report.html``: a single self-contained HTML file.

    Images are embedded as base64 data URIs, so the file can be moved or mailed on its own.
    The header shows ``title`` and a key-value table of ``meta`` (method, steps, reward,
    seed, ...); the sections follow in order. The file is written atomically.

    Args:
        run_dir: The run folder; created when missing.
        title: Page title and top heading.
        sections: The report's sections.
        meta: Optional key-value pairs for the header table.

    Returns:
        The path of ``report.html``.
    """
    return atomic_write_text(Path(run_dir) / REPORT_FILE, render_report(title, sections, meta))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    """Read a run's ``metrics.jsonl`` (one JSON object a line).

    A run killed mid-write can leave a truncated last line: it is skipped silently. A bad
    line elsewhere is skipped with a warning. Blank lines and lines that are not JSON objects
    are skipped.

    Args:
        run_dir: The run folder (or the ``.jsonl`` file itself).

    Returns:
        The rows in file order; an empty list when the file does not exist.
    """
    path = Path(run_dir)
    if path.is_dir():
        path = path / METRICS_FILE
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows = []
    for i, line in enumerate(lines):
        row = _parse_line(line, is_last=i == last, where=f"{path}:{i + 1}")
        if row is not None:
            rows.append(row)
    return rows


def step_rows(run_dir: str | os.PathLike) -> list[dict]:
    """A run's metrics, one row a step in step order: the last row of a step wins, as a resumed
    run logs again the steps after its checkpoint."""
    by_step = {row["step"]: row for row in read_metrics(run_dir) if "step" in row}
    return [by_step[k] for k in sorted(by_step)]


def training_tail(run_dir: str | os.PathLike, means: tuple[str, ...] = ("loss",), last: int = 200,
                  rows: list[dict] | None = None) -> dict:
    """What a pretraining card says of its run: ``steps_done`` (the last step logged), and the
    mean of each metric in ``means`` over the last ``last`` steps as ``final_{key}_mean_last_{last}``
    (nan when the run logged nothing). ``rows``: the run's :func:`step_rows`, when read already."""
    rows = step_rows(run_dir) if rows is None else rows
    tail = rows[-last:]
    return {"steps_done": rows[-1]["step"] if rows else 0,
            **{f"final_{k}_mean_last_{last}": sum(r[k] for r in tail) / len(tail) if tail else float("nan") for k in means}}


def _parse_line(line: str, is_last: bool, where: str) -> dict | None:
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        if not is_last:
            warnings.warn(f"skipping a malformed metrics line at {where}", stacklevel=3)
        return None
    return row if isinstance(row, dict) else None
