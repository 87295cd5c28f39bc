"""The table of config fields: read from FinetuneConfig's source, and the README's copy of it current."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import pytest

from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.fields import END, START, config_fields, config_table, main, replace_table

README = Path(__file__).resolve().parent.parent / "README.md"
REGENERATE = "python -m rewardiff.finetune.fields --write"


@dataclass
class Example:
    name: str = "a*b # c"  # the name; a '#' inside the string is not the comment
    size: int | None = None  # how *many* | or none
    flag: bool = True
    ratio: float = (
        0.5  # a field written over three lines
    )


def test_fields_are_read_with_their_types_defaults_and_comments():
    assert config_fields(Example) == [
        ("name", "str", "a*b # c", "the name; a '#' inside the string is not the comment"),
        ("size", "int | None", None, "how *many* | or none"),
        ("flag", "bool", True, ""),
        ("ratio", "float", 0.5, "a field written over three lines"),
    ]


def test_the_table_escapes_pipes_and_writes_defaults_as_yaml_does():
    lines = config_table(Example).splitlines()
    assert lines[0] == "| field | type | default | what |"
    # asterisks are escaped in text (0.7*a+0.3*b is no emphasis) and kept in code
    assert lines[2] == "| `name` | str | `\"a*b # c\"` | the name; a '#' inside the string is not the comment |"
    assert lines[3] == "| `size` | int \\| None | `null` | how \\*many\\* \\| or none |"
    assert lines[4] == "| `flag` | bool | `true` |  |"
    assert len(lines) == 2 + 4


def test_every_config_field_is_read_and_has_a_comment():
    fields = config_fields()
    assert [f.name for f in fields] == [f.name for f in dataclasses.fields(FinetuneConfig)]
    assert [f.default for f in fields] == [f.default for f in dataclasses.fields(FinetuneConfig)]
    bare = [f.name for f in fields if not f.comment]
    assert not bare, f"config fields without a '# comment' on their line: {bare}"
    assert dict((f.name, f.type) for f in fields)["checkpointing"] == "bool"


def test_the_readme_holds_the_current_table():
    text = README.read_text()
    assert text.count(START) == 1 and text.count(END) == 1, "README.md must hold the config-fields markers once"
    current = text.split(START, 1)[1].split(END, 1)[0].strip("\n")
    assert current == config_table().strip("\n"), f"README.md's config fields table is stale: run `{REGENERATE}`"


def test_write_rewrites_only_between_the_markers(tmp_path, monkeypatch, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n{START}\nold table\n{END}\nafter\n")
    monkeypatch.chdir(tmp_path)
    main(["--write"])
    assert readme.read_text() == f"# title\n\nbefore\n{START}\n{config_table()}{END}\nafter\n"
    main([])
    assert capsys.readouterr().out.endswith(config_table())
    with pytest.raises(ValueError, match="markers"):
        replace_table("no markers here", "x")
    (tmp_path / "other.md").write_text("no markers\n")
    with pytest.raises(SystemExit, match="markers"):
        main(["--write", str(tmp_path / "other.md")])
