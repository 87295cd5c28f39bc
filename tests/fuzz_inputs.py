"""Bad input for the command line, generated: the strategies of the fuzz test and its long form.

Every example is a mistake by construction (a field given a value of the wrong type or out of
its range, an unknown field, an empty, binary or missing file, a directory where a file is
expected, an option that is not a number), so the property is the same for all of them:
``rewardiff`` prints one line on stderr, exits with status 2, shows no traceback, and writes
nothing. ``tests/test_fuzz.py`` runs a few dozen examples; ``benchmarks/fuzz_inputs.py`` runs
thousands and keeps the tally.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import sys
import tempfile
import typing
from pathlib import Path

from hypothesis import strategies as st

from rewardiff.finetune.config import MAX_INT, FinetuneConfig

FIELDS = {f.name: typing.get_type_hints(FinetuneConfig)[f.name] for f in dataclasses.fields(FinetuneConfig)}
NAMED = ("model", "reward", "method", "prompts", "eval_prompts", "truncation", "gumbel_estimator", "mixed_precision", "tracker",
         "reward_errors")  # text fields with a closed set of valid values (names, files)

_words = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_not_number = _words.filter(lambda s: not _parses(s))
_junk = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.none())


def _parses(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return text.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0")


def bad_value(kind) -> st.SearchStrategy:
    """Values no field of type ``kind`` takes."""
    if kind is bool:
        return st.one_of(st.integers(min_value=2), st.floats(allow_nan=True), _not_number, _junk)
    if kind is int:
        return st.one_of(st.integers(max_value=-1), st.integers(min_value=2**32), st.booleans(), _not_number, _junk,
                         st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not f.is_integer()))
    if kind is float:
        return st.one_of(st.floats(max_value=-1e-9), st.sampled_from([float("nan"), float("inf"), -float("inf")]), st.booleans(),
                         _not_number, _junk)
    return st.one_of(st.integers(), st.floats(allow_nan=False), st.booleans(), st.lists(_words, max_size=2), st.none())


@st.composite
def bad_config(draw) -> tuple[str, object]:
    """(field, value): one field of an otherwise valid config given a value it does not take."""
    field = draw(st.sampled_from(sorted(FIELDS)))
    kind = FIELDS[field]
    if field in NAMED and draw(st.booleans()):
        return field, draw(_words.map(lambda w: "zz-" + w))  # no valid name or file starts so
    return field, draw(bad_value(kind))


def _yaml(values: dict) -> str:
    import yaml

    return yaml.safe_dump(values, allow_unicode=True)


@st.composite
def bad_finetune(draw) -> tuple[list[str], dict[str, bytes | None]]:
    """(arguments, files): a ``rewardiff finetune`` command line that is a mistake, and the files
    (relative path -> bytes; None for a directory) to create in an empty folder before it runs."""
    kind = draw(st.sampled_from(["field", "unknown-field", "empty", "binary", "directory", "set", "missing", "prompt-file"]))
    out = ["--out", "run"]
    if kind == "field":
        field, value = draw(bad_config())
        return ["c.yaml", *out], {"c.yaml": _yaml({"steps": 1, field: value}).encode()}
    if kind == "unknown-field":
        key = draw(st.from_regex(r"[a-z_]{1,12}", fullmatch=True).filter(lambda k: k not in FIELDS))
        return ["c.yaml", *out], {"c.yaml": _yaml({key: 1}).encode()}
    if kind == "empty":
        return ["c.yaml", *out], {"c.yaml": draw(st.sampled_from([b"", b"\n", b"# nothing\n", b"null\n", b"~\n"]))}
    if kind == "binary":
        data = draw(st.binary(min_size=1, max_size=64).filter(lambda b: not _decodes(b)))
        return ["c.yaml", *out], {"c.yaml": data}
    if kind == "directory":
        return ["c.yaml", *out], {"c.yaml": None}
    if kind == "missing":
        return [draw(_words.map(lambda w: "zz-" + w.replace("/", "") + ".yaml")), *out], {}
    if kind == "prompt-file":
        data = draw(st.sampled_from([b"", b"\n\n", b"\xff\xfe\x80"]))
        return ["--set", "prompts=p.txt", "--set", "steps=1", *out], {"p.txt": data}
    field, value = draw(bad_config().filter(lambda fv: isinstance(fv[1], (str, int, float)) and not isinstance(fv[1], bool)
                                            and FIELDS[fv[0]] is not str))
    return ["--set", f"{field}={value}", *out], {}


def _decodes(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


SAMPLE_OPTIONS = {"-n": (1, MAX_INT), "--steps": (1, 1000), "--width": (1, 4096), "--nfe-budget": (1, None), "--seed": (0, None)}


@st.composite
def bad_sample(draw) -> tuple[list[str], dict[str, bytes | None]]:
    """A ``rewardiff sample`` command line that is a mistake: a numeric option out of range or
    not a number, a non-finite float option, or an unknown method, model or reward."""
    kind = draw(st.sampled_from(["int", "float", "name"]))
    base = ["sample", "--out", "s"]
    if kind == "int":
        flag = draw(st.sampled_from(sorted(SAMPLE_OPTIONS)))
        low, _ = SAMPLE_OPTIONS[flag]
        value = draw(st.one_of(st.integers(max_value=low - 1).map(str), _not_number.filter(lambda s: not s.startswith("-"))))
        extra = ["--method", "best-of-n", "--reward", "brightness"] if flag in ("--width", "--nfe-budget") else []
        return [*base, *extra, flag, value], {}
    if kind == "float":
        flag = draw(st.sampled_from(["--eta", "--guidance-scale"]))
        value = draw(st.one_of(st.sampled_from(["nan", "inf", "-inf", "-1", "1e400"]), st.floats(min_value=1.01, max_value=1e9).map(str)
                               if flag == "--eta" else st.floats(max_value=-1e-6).map(str)))
        return [*base, flag, value], {}
    flag = draw(st.sampled_from(["--method", "--model", "--reward"]))
    return [*base, flag, draw(_words.map(lambda w: "zz-" + w.replace("/", "")))], {}


def run_cli(args: list[str], files: dict[str, bytes | None]) -> tuple[int, str, list[str]]:
    """Run ``rewardiff args`` in-process in a fresh empty folder holding ``files``:
    (exit status, stderr, what the folder holds afterwards beyond ``files``)."""
    from rewardiff.cli import main

    here = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            if data is None:
                (Path(tmp) / name).mkdir()
            else:
                (Path(tmp) / name).write_bytes(data)
        err, argv = io.StringIO(), sys.argv
        os.chdir(tmp)
        code: object = 0
        try:
            sys.argv = ["rewardiff", *args]
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    main()
                except SystemExit as e:
                    code = e.code
        finally:
            sys.argv = argv
            os.chdir(here)
        written = sorted(str(p.relative_to(tmp)) for p in Path(tmp).rglob("*") if p.name not in files)
    return int(code or 0), err.getvalue(), written


def check(args: list[str], files: dict[str, bytes | None]) -> str | None:
    """None when ``rewardiff args`` behaved (one line, status 2, no traceback, nothing written);
    otherwise what went wrong."""
    code, err, written = run_cli(args, files)
    lines = err.strip().splitlines()
    if code != 2:
        return f"exit status {code}: {err.strip()[-300:]}"
    if "Traceback" in err or len(lines) != 1:
        return f"{len(lines)} lines on stderr: {err.strip()[-300:]}"
    if written:
        return f"wrote {written[:3]}"
    return None
