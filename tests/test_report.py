"""Tests of the report package: grids, plots, the HTML report, metrics reading, diversity."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from rewardiff.report import (
    GUTTER,
    Section,
    diversity_by_prompt,
    grid_image,
    label_height,
    pairwise_diversity,
    plot_curves,
    plot_reward_curve,
    read_metrics,
    save_grid,
    write_report,
)


def _random_uint8(n: int, h: int = 5, w: int = 7, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)


# ---------------------------------------------------------------- grid


def test_grid_size_without_labels():
    # 10 images of 5x7, 4 a row, scale 3 -> 3 rows, 4 columns of 15x21 cells
    img = grid_image(_random_uint8(10), nrow=4, scale=3)
    assert GUTTER == 2
    assert img.size == (4 * 21 + 5 * 2, 3 * 15 + 4 * 2)  # PIL size is (width, height)
    assert img.mode == "RGB"


def test_grid_size_with_labels_and_fewer_images_than_nrow():
    img = grid_image(_random_uint8(3), nrow=8, scale=2, labels=["ok", "x", None])
    assert img.size == (3 * 14 + 4 * 2, 10 + label_height() + 2 * 2)


def test_grid_cell_equals_upscaled_input():
    images = _random_uint8(5)
    scale, nrow = 3, 2
    grid = np.asarray(grid_image(images, nrow=nrow, scale=scale))
    h, w = 5 * scale, 7 * scale
    i = 3  # row 1, column 1
    y, x = GUTTER + 1 * (h + GUTTER), GUTTER + 1 * (w + GUTTER)
    expected = np.kron(images[i], np.ones((scale, scale, 1), dtype=np.uint8))
    np.testing.assert_array_equal(grid[y : y + h, x : x + w], expected)
    assert tuple(grid[0, 0]) == (48, 48, 48)  # gutter


def test_grid_from_tensor_matches_uint8_conversion():
    x = torch.tensor([-1.0, 0.0, 1.0]).view(1, 3, 1, 1).expand(2, 3, 2, 2)
    grid = np.asarray(grid_image(x, nrow=2, scale=1))
    assert tuple(grid[GUTTER, GUTTER]) == (0, 128, 255)


def test_grid_labels_are_drawn_under_the_cell_only():
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    plain = np.asarray(grid_image(images, nrow=2, scale=2, labels=[None, None]))
    labelled = np.asarray(grid_image(images, nrow=2, scale=2, labels=["ok", None]))
    diff = np.argwhere((plain != labelled).any(axis=-1))
    assert len(diff) > 0
    assert diff[:, 0].min() >= GUTTER + 16  # below the first image
    assert diff[:, 1].max() < GUTTER + 16  # within the first column


def test_grid_rejects_wrong_label_count():
    with pytest.raises(ValueError):
        grid_image(_random_uint8(3), labels=["a"])


def test_save_grid_writes_png(tmp_path):
    path = save_grid(_random_uint8(4), tmp_path / "sub" / "grid.png", nrow=2, scale=1)
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (2 * 7 + 3 * GUTTER, 2 * 5 + 3 * GUTTER)
    assert [p.name for p in path.parent.iterdir()] == ["grid.png"]  # no temp file left


# ---------------------------------------------------------------- plots


def test_plots_write_pngs(tmp_path):
    metrics = [{"step": i, "reward_mean": math.sin(i / 5)} for i in range(40)]
    metrics[19].update(eval_reward_mean=0.3, eval_judge_count=0.5)
    metrics.append({"step": 40, "eval_judge_count": 0.7})
    for path in (plot_reward_curve(metrics, tmp_path / "r.png"), plot_reward_curve([], tmp_path / "empty.png"),
                 plot_curves({"a": [(0, 1), (1, 2)], "b": [(0.5, 0.0)]}, tmp_path / "c.png", "x", "y", "t")):
        with Image.open(path) as im:
            assert im.format == "PNG"


# ---------------------------------------------------------------- html


def test_write_report_is_self_contained(tmp_path):
    png = save_grid(_random_uint8(2), tmp_path / "g.png", nrow=2, scale=1)
    sections = [
        Section("Results <table>", "Reward went up.", images=[png],
                table=[["measure", "before", "after"], ["judge count", 0.25, 0.5]]),
        Section("Missing", images=[tmp_path / "nope.png"]),
    ]
    path = write_report(tmp_path, "My run & title", sections, meta={"method": "draft", "seed": 7})
    assert path == tmp_path / "report.html"
    html = path.read_text()
    assert "My run &amp; title" in html
    assert "Results &lt;table&gt;" in html
    assert "<th>measure</th><th>before</th><th>after</th>" in html
    assert "<td>judge count</td>" in html and ">0.25</td>" in html
    assert "<th>method</th><td>draft</td>" in html
    assert "data:image/png;base64," in html
    assert "missing image: nope.png" in html
    assert 'src="g.png"' not in html


def test_read_metrics_skips_truncated_last_line(tmp_path):
    rows = [{"step": 0, "reward_mean": 0.1}, {"step": 1, "reward_mean": 0.2}]
    text = "".join(json.dumps(r) + "\n" for r in rows) + '{"step": 2, "rew'
    (tmp_path / "metrics.jsonl").write_text(text)
    assert read_metrics(tmp_path) == rows
    assert read_metrics(tmp_path / "metrics.jsonl") == rows
    assert read_metrics(tmp_path / "absent") == []


def test_read_metrics_warns_on_a_bad_middle_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 0}\nnot json\n\n{"step": 1}\n')
    with pytest.warns(UserWarning):
        assert read_metrics(tmp_path) == [{"step": 0}, {"step": 1}]


# ---------------------------------------------------------------- diversity


def test_pairwise_diversity_of_identical_images_is_zero():
    x = torch.rand(1, 3, 8, 8).repeat(6, 1, 1, 1) * 2 - 1
    assert pairwise_diversity(x) == pytest.approx(0.0, abs=1e-6)


def test_pairwise_diversity_constant_shift_equals_shift():
    a = torch.rand(1, 3, 8, 8, dtype=torch.float64) * 2 - 1  # float64: a + c exact enough
    for c in (0.5, -0.3):
        assert pairwise_diversity(torch.cat([a, a + c])) == pytest.approx(abs(c), rel=1e-9)


def test_pairwise_diversity_hand_computed():
    # three images, values 0, 0.3, 0.6 everywhere: distances 0.3, 0.6, 0.3 -> mean 0.4
    x = torch.tensor([0.0, 0.3, 0.6], dtype=torch.float64).view(3, 1, 1, 1).expand(3, 3, 2, 2)
    assert pairwise_diversity(x) == pytest.approx(0.4)
    # half the values differ by 1, the rest agree: RMS = sqrt(1/2)
    a, b = torch.zeros(1, 1, 2, 2), torch.tensor([1.0, 1.0, 0.0, 0.0]).view(1, 1, 2, 2)
    assert pairwise_diversity(torch.cat([a, b])) == pytest.approx(math.sqrt(0.5))


def test_pairwise_diversity_matches_direct_computation_across_blocks():
    x = torch.randn(300, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    flat = x.reshape(300, -1).double()
    d = ((flat[:, None] - flat[None]) ** 2).mean(-1).sqrt()
    expected = float(d.triu(diagonal=1).sum()) / (300 * 299 / 2)
    assert pairwise_diversity(x) == pytest.approx(expected, rel=1e-9)


def test_pairwise_diversity_needs_two_images():
    with pytest.raises(ValueError):
        pairwise_diversity(torch.zeros(1, 3, 4, 4))


def test_diversity_by_prompt_hand_computed():
    values = [0.0, 0.5,  # "a": one pair, 0.5
              0.0, 0.3, 0.6,  # "b": pairs 0.3, 0.6, 0.3 -> 0.4
              0.9]  # "c": a single sample, skipped
    prompts = ["a", "a", "b", "b", "b", "c"]
    x = torch.tensor(values).view(6, 1, 1, 1).expand(6, 3, 4, 4)
    order = [2, 0, 5, 3, 1, 4]  # the grouping does not depend on the order of samples
    assert diversity_by_prompt(x[order], [prompts[i] for i in order]) == pytest.approx((0.5 + 0.4) / 2)
    assert math.isnan(diversity_by_prompt(x[:1], ["a"]))
    with pytest.raises(ValueError):
        diversity_by_prompt(x, ["a"])
