"""A fine-tuning run's files: strict JSON where a measure is undefined, and sample grids that say
which prompt each column is and how many of the evaluation's samples they show."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from PIL import Image

from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.evaluate import IMAGE_GRID, evaluate, grid_columns
from rewardiff.finetune.run_report import comparison_table, write_run_report, write_summary
from rewardiff.models.registry import base_model
from rewardiff.prompts import eval_set
from rewardiff.report import GUTTER, diversity_by_prompt, label_height
from rewardiff.report.strict import strict_dumps, strict_json

PROMPTS = ["one red circle", "two blue squares", "three green triangles"]


def _strict_loads(text: str):
    """json.loads that refuses NaN and Infinity, which Python's own parser accepts by default."""

    def refuse(name: str):
        raise ValueError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=refuse)


def test_strict_json_maps_every_non_finite_float_to_null():
    obj = {"a": float("nan"), "b": [1.5, float("inf"), (float("-inf"), 2)], "c": {"d": "nan", "e": 0}, "f": True}
    assert strict_json(obj) == {"a": None, "b": [1.5, None, [None, 2]], "c": {"d": "nan", "e": 0}, "f": True}
    assert _strict_loads(strict_dumps(obj)) == strict_json(obj)
    with pytest.raises(ValueError, match="NaN"):
        _strict_loads(json.dumps(obj))  # the default writer is not strict: the check can fail


def test_an_undefined_diversity_is_null_in_the_json_and_n_a_in_the_report(tmp_path):
    """One sample a prompt: diversity_by_prompt is NaN; summary.json and eval_after.json hold
    null and parse strictly, the report shows n/a, and a report from the JSON read back (as a
    resumed run reads eval_before.json) shows the same."""
    nan = diversity_by_prompt(torch.zeros(2, 3, 4, 4), ["a", "b"])
    assert math.isnan(nan)
    before = {"eval_reward_mean": -0.5, "eval_diversity": nan, "eval_kl_to_base": 0.0}
    after = {"eval_reward_mean": -0.25, "eval_diversity": nan, "eval_kl_to_base": float("inf")}
    summary = {"method": "draft-k", "reward": "brightness", "steps": 1, "before": before, "after": after}
    write_summary(tmp_path, FinetuneConfig(), summary)
    saved = _strict_loads((tmp_path / "summary.json").read_text())
    assert saved["before"]["eval_diversity"] is None and saved["after"]["eval_kl_to_base"] is None
    assert saved["after"]["eval_reward_mean"] == -0.25 and saved["method"] == "draft-k"
    assert _strict_loads((tmp_path / "eval_after.json").read_text()) == saved["after"]
    html = (tmp_path / "report.html").read_text()
    assert re.search(r"<td>diversity \(pairwise RMS within a prompt\)</td><td>n/a</td><td>n/a</td>", html)
    assert re.search(r"<td>KL to the base model[^<]*</td><td class=\"num\">0.000</td><td>n/a</td>", html)
    assert "NaN" not in html and ">nan<" not in html and ">inf<" not in html
    write_run_report(tmp_path, FinetuneConfig(), saved["before"], saved["after"])  # null values, as read back
    assert re.search(r"diversity \(pairwise RMS within a prompt\)</td><td>n/a</td><td>n/a</td>", (tmp_path / "report.html").read_text())
    assert comparison_table({"eval_reward_mean": None}, {"eval_reward_mean": 1.0})[1][1:] == ["n/a", "1.000"]


def test_grid_columns_hold_one_prompt_each():
    """Six prompts cycling over 96 samples: the first 48 samples in 6 columns, 8 deep (as the
    plain first 48 would be). Ten prompts: the first 8 of them, 6 deep (48 // 8), each column
    one prompt's samples in seed order; one prompt: 8 columns of it."""
    prompts, _ = eval_set([f"p{i}" for i in range(6)], 96)
    columns, shown = grid_columns(prompts)
    assert columns == [f"p{i}" for i in range(6)] and shown == list(range(48))
    prompts, _ = eval_set([f"p{i}" for i in range(10)], 96)
    columns, shown = grid_columns(prompts)
    assert columns == [f"p{i}" for i in range(8)] and len(shown) == IMAGE_GRID
    assert [prompts[i] for i in shown] == columns * 6  # row by row: cell (r, c) is prompt c
    assert shown[0::8] == [0, 10, 20, 30, 40, 50]  # p0's first six samples, down column 0
    assert grid_columns([""] * 20) == ([""] * 8, list(range(20)))


def test_an_evaluation_grid_says_which_prompt_each_column_is(tiny_model_dir, tmp_path):
    """An evaluation of 7 samples over 3 prompts (the first has 3, the others 2) shows 6 of them,
    2 rows of 3 columns; its legend, and the report, name the prompt of each column."""
    model = base_model(str(tiny_model_dir))
    prompts, seeds = eval_set(PROMPTS, 7)
    grid = tmp_path / "samples_before.png"
    evaluate(model, None, prompts, seeds, num_inference_steps=2, guidance_scale=1.0, grid_path=grid)
    legend = json.loads((tmp_path / "samples_before.json").read_text())
    assert legend == {"samples": 7, "shown": 6, "columns": PROMPTS}
    cell = 32 * 4  # the shapes world's 32 x 32 images, upscaled 4x
    width, height = Image.open(grid).size
    assert width == 3 * cell + 4 * GUTTER and height == 2 * (cell + label_height()) + 3 * GUTTER  # judge labels below
    (tmp_path / "samples_after.json").write_text(json.dumps(legend))
    before = {"eval_reward_mean": 0.0}
    html = write_run_report(tmp_path, FinetuneConfig(), before, before).read_text()
    assert html.count("6 of the evaluation&#x27;s 7 samples: one column per prompt, its first 2 samples down the column") == 2
    for i, p in enumerate(PROMPTS, 1):
        assert f'<td class="num">{i}</td><td>{p}</td>' in html


def test_a_molecules_grid_says_how_many_samples_it_draws(ar_dir, tmp_path):
    """Text outputs are drawn 24 at most (TEXT_GRID): 30 samples -> "24 of 30", no column table."""
    from rewardiff.finetune.evaluate import TEXT_GRID

    model = base_model(str(ar_dir))
    prompts, seeds = eval_set([""], 30)
    evaluate(model, None, prompts, seeds, num_inference_steps=1, guidance_scale=1.0, grid_path=tmp_path / "samples_before.png")
    assert json.loads((tmp_path / "samples_before.json").read_text()) == {"samples": 30, "shown": TEXT_GRID}
    assert (tmp_path / "samples_before.png").is_file()
    before = {"eval_validity": 1.0}
    html = write_run_report(tmp_path, FinetuneConfig(method="gumbel"), before, before).read_text()
    assert f"{TEXT_GRID} of the evaluation&#x27;s 30 samples. The first samples of the fixed seeds" in html
    assert "<th>column</th>" not in html


def test_training_tail_counts_a_re_logged_step_once(tmp_path):
    """A resumed pretraining run logs step 3 again: the card's means take its last row once."""
    from rewardiff.report import training_tail

    rows = [{"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 3, "loss": 9.0}, {"step": 3, "loss": 2.0},
            {"step": 4, "loss": 1.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert training_tail(tmp_path, last=3) == {"steps_done": 4, "final_loss_mean_last_3": 2.0}
    assert training_tail(tmp_path) == {"steps_done": 4, "final_loss_mean_last_200": 2.5}
    empty = training_tail(tmp_path / "none")
    assert empty["steps_done"] == 0 and math.isnan(empty["final_loss_mean_last_200"])


def test_a_worlds_own_judge_measures_reach_the_report_and_its_curve(tmp_path):
    """A super-resolution run reports no count judge or diversity but hallucination rates, PSNR
    and SSIM: the table shows each under its label (an unknown measure under its own name), the
    held-out curve plots the 0-1 measures that move, and leaves PSNR (dB), the reward's spread and
    a measure stuck at zero to the table; the report names the hallucination judge."""
    from rewardiff.finetune.run_report import eval_series

    before = {"eval_reward_mean": -0.08, "eval_reward_std": 0.04, "eval_diversity": None, "eval_hallucination_rate": 0.38,
              "eval_psnr": 25.8, "eval_ssim": 0.85, "eval_hallucination_split": 0.0, "eval_new_measure": 0.5,
              "eval_kl_to_base": 0.0}
    mid = {**before, "step": 50, "eval_hallucination_rate": 0.30, "eval_psnr": 27.0, "eval_kl_to_base": 30.0}
    after = {**before, "eval_hallucination_rate": 0.20, "eval_psnr": 29.0, "eval_kl_to_base": 160.0}
    metrics = [{"step": 10, "loss": 1.0}, mid, {"step": 100, "loss": 0.5}]
    rows = {r[0]: r[1:] for r in comparison_table(before, after)[1:]}
    assert rows["judge: share of images with a hallucination"] == ["0.380", "0.200"]
    assert rows["PSNR to the ground truth (dB)"] == ["25.800", "29.000"] and rows["new measure"] == ["0.500", "0.500"]
    assert list(rows)[-1].startswith("KL to the base model")
    series = eval_series(metrics, before, after)
    assert series["judge: share of images with a hallucination"] == [(0, 0.38), (50, 0.30), (100, 0.20)]
    assert set(series) == {"judge: share of images with a hallucination", "SSIM to the ground truth", "new measure"}
    html = write_run_report(tmp_path, FinetuneConfig(), before, after).read_text()
    assert "The judge counts the objects of each super-resolved image" in html and "connected components" not in html
    shapes = write_run_report(tmp_path, FinetuneConfig(), {"eval_judge_count": 0.5}, {"eval_judge_count": 0.6}).read_text()
    assert "connected components" in shapes
