"""The rewardiff command: user mistakes are one line and exit 2; the main commands run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rewardiff", *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=600)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["finetune", "--set", "method=nope"], "unknown method 'nope'"),
        (["finetune", "--set", "reward=nope"], "unknown reward 'nope'"),
        (["finetune", "--set", "steps=many"], "'steps' expects int"),
        (["finetune", "missing.yaml"], "config file not found: missing.yaml"),
        (["finetune", "--set", "reward=no_such_module_xyz:f"], "cannot import module 'no_such_module_xyz'"),
        (["sample", "--out", "x", "--prompt", "five purple hexagons"], "unknown word 'five'"),
        (["pretrain", "faces"], "unknown world 'faces'"),
        (["sample", "--out", "x", "--method", "best-of-n", "--width", "-1", "--reward", "brightness"], "at least 1, got -1"),
        (["sample", "--out", "x", "--method", "gradient", "--reward", "jpeg-compressibility"], "needs a differentiable reward"),
        (["sample", "--out", "x", "--method", "dsearch", "--nfe-budget", "20", "--reward", "brightness"], "cannot meet --nfe-budget 20"),
        (["sample", "--out", "x", "--method", "svdd-pm", "--eta", "0", "--reward", "brightness"], "needs --eta > 0"),
        (["sample", "--out", "x", "--method", "smc", "--option", "beta=2", "--reward", "brightness"], "has no option 'beta'"),
        (["sample", "--out", "x", "--method", "svdd-mc", "--reward", "brightness"], "needs a value model"),
    ],
)
def test_user_errors_are_one_line_with_status_2(tmp_path, args, needle):
    res = _run(*args, cwd=tmp_path)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_bad_config_field_type_in_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: fast\n")
    res = _run("finetune", "c.yaml", cwd=tmp_path)
    assert res.returncode == 2 and "'lr' expects float" in res.stderr


def test_rewards_lists_every_registered_reward():
    res = _run("rewards")
    assert res.returncode == 0
    for name in ("shapes-count", "shapes-color", "brightness", "saturation", "jpeg-compressibility", "jpeg-incompressibility"):
        assert name in res.stdout


@pytest.mark.slow
def test_sample_writes_grid_and_summary(tmp_path):
    res = _run("sample", "--model", "shapes", "--prompt", "two red circles", "-n", "3", "--reward", "shapes-count",
               "--steps", "4", "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["nfe"] == 3 * 4 * 2  # 3 samples, 4 steps, classifier-free guidance counts 2
    assert {"reward_mean", "reward_std", "nfe_per_sample"} <= set(summary)
    assert (tmp_path / "s" / "grid.png").is_file() and len(list((tmp_path / "s" / "samples").glob("*.png"))) == 3


@pytest.mark.slow
def test_sample_with_a_method_and_a_budget(tmp_path):
    res = _run("sample", "--method", "svdd-pm", "--nfe-budget", "40", "--reward", "jpeg-compressibility", "-n", "2",
               "--steps", "4", "--out", str(tmp_path / "s"))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    # M = 6 is the widest with 2 * (1 + 3 M) <= 40: 38 NFE per sample
    assert summary["options"]["m"] == 6 and summary["nfe_per_sample"] == 38 and summary["nfe"] == 2 * 38
    assert summary["method"] == "svdd-pm" and {"reward_mean", "reward_std"} <= set(summary)


@pytest.mark.slow
def test_demo_runs_two_steps(tmp_path):
    res = _run("demo", "--steps", "2", "--out", str(tmp_path / "demo"))
    assert res.returncode == 0, res.stderr
    assert "judge counting accuracy" in res.stdout
    assert (tmp_path / "demo" / "report.html").is_file()
    rows = (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
