"""``rewardiff sample``: prompts from a file, a grid row per prompt, and nothing written when the reward fails."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from rewardiff.cli import app, main
from rewardiff.errors import UserError
from rewardiff.rewards.guard import RewardFailure
from rewardiff.prompts import read_prompt_file
from rewardiff.report import GUTTER, label_height
from rewardiff.report.grid import BACKGROUND
from rewardiff.sampling import gather_prompts, prompt_grid, sample_to_dir

SCALE = 4  # grid.png's upscaling


def failing_reward(images, prompts):
    """A reward that breaks."""
    raise RuntimeError("the reward server is down")


def refusing_reward(images, prompts):
    """A reward that refuses its input, as a user mistake."""
    raise UserError("this reward reads only molecules")


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["rewardiff", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_a_prompt_file_skips_blank_lines_and_comments(tmp_path):
    (tmp_path / "p.txt").write_text("# shapes to draw\n\none red circle\n   \n  two blue squares  \n#three green triangles\n")
    assert read_prompt_file(tmp_path / "p.txt") == ["one red circle", "two blue squares"]
    (tmp_path / "p.json").write_text(json.dumps(["one red circle", " ", "a # in a prompt"]))
    assert read_prompt_file(tmp_path / "p.json") == ["one red circle", "a # in a prompt"]
    # --prompt ones first, then the file's; the default only when there are none
    assert gather_prompts(["four red squares"], tmp_path / "p.txt") == ["four red squares", "one red circle", "two blue squares"]
    assert gather_prompts(None, None) == ["two red circles"]


@pytest.mark.parametrize(("content", "needle"), [
    (None, "prompt file not found: {path}"),
    ("# only a comment\n\n", "prompt file {path} holds no prompts"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe\x00", "prompt file {path} is not UTF-8 text (a binary file?)"),
])
def test_a_bad_prompt_file_is_one_line_naming_it(tmp_path, monkeypatch, capsys, content, needle):
    path = tmp_path / "prompts.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, err = _main(["sample", "--out", str(tmp_path / "s"), "--prompts-file", str(path)], monkeypatch, capsys)
    assert code == 2 and err.strip().splitlines() == [f"error: {needle.format(path=path)}"]
    assert not (tmp_path / "s").exists()


def test_prompt_grid_gives_each_prompt_its_own_rows():
    """Two prompts, n = 5, at most 3 columns: each prompt takes two rows (3 + 2 and a blank), so the
    second prompt starts the third row; the first cell of each row carries its prompt."""
    images = torch.linspace(-1, 1, 10).view(10, 1, 1, 1).expand(10, 3, 2, 2)  # sample i is gray level i
    cells, labels, cols = prompt_grid(images, ["a", "b"], 5, columns=3)
    assert cols == 3 and len(cells) == 12
    levels = [int(c[0, 0, 0]) for c in cells]
    gray = [int(round((v + 1) * 127.5)) for v in torch.linspace(-1, 1, 10).tolist()]
    blank = BACKGROUND[0]
    assert levels == gray[0:3] + gray[3:5] + [blank] + gray[5:8] + gray[8:10] + [blank]
    assert labels == ["a", None, None, "a", None, None, "b", None, None, "b", None, None]
    # n within the columns: one row a prompt, n wide; unconditional ("") prompts: no labels
    cells, labels, cols = prompt_grid(images, ["", ""], 5)
    assert cols == 5 and len(cells) == 10 and labels is None


def test_sample_writes_a_labelled_row_per_prompt_and_scores_it(tmp_path):
    """Two prompts (one from --prompt, one from a file), n = 2, 2 steps: grid.png is 2 rows of 2
    cells with a label strip, the cell at row 1, column 0 is the third sample, and reward_mean is
    the brightness of the saved samples (read back from their PNGs, to rounding)."""
    (tmp_path / "p.txt").write_text("# one more\none blue square\n")
    out = tmp_path / "s"
    res = CliRunner().invoke(app, ["sample", "--model", "shapes", "--prompt", "two red circles", "--prompts-file",
                                   str(tmp_path / "p.txt"), "-n", "2", "--steps", "2", "--reward", "brightness", "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["prompts"] == ["two red circles", "one blue square"] and summary["n"] == 4
    samples = [np.asarray(Image.open(out / "samples" / f"{i:04d}.png").convert("RGB")) for i in range(4)]
    h, w = samples[0].shape[:2]
    grid = np.asarray(Image.open(out / "grid.png").convert("RGB"))
    strip = label_height()
    assert grid.shape[:2] == (2 * (h * SCALE + strip) + 3 * GUTTER, 2 * w * SCALE + 3 * GUTTER)
    y0 = GUTTER + (h * SCALE + strip + GUTTER)  # row 1, column 0
    cell = grid[y0 : y0 + h * SCALE, GUTTER : GUTTER + w * SCALE]
    np.testing.assert_array_equal(cell, samples[2].repeat(SCALE, 0).repeat(SCALE, 1))
    assert (grid[y0 + h * SCALE : y0 + h * SCALE + strip, GUTTER : GUTTER + w * SCALE] != BACKGROUND).any()  # its label
    luma = np.mean([(s.astype(np.float64) / 255 @ np.array([0.299, 0.587, 0.114])).mean() for s in samples])
    assert summary["reward_mean"] == pytest.approx(luma, abs=2e-3)


def test_a_failing_reward_writes_nothing(tmp_path, monkeypatch, capsys):
    out = tmp_path / "s"
    with pytest.raises(RewardFailure, match="raised RuntimeError: the reward server is down"):
        sample_to_dir(out, "shapes", None, ["two red circles"], 2, 0, "tests.test_sample_cmd:failing_reward", 2, None, None)
    assert not out.exists()
    code, err = _main(["sample", "--out", str(out), "-n", "2", "--steps", "2", "--reward", "tests.test_sample_cmd:refusing_reward"],
                      monkeypatch, capsys)
    assert code == 2 and "reads only molecules" in err and not out.exists()
