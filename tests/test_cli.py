"""The rewardiff command: user mistakes are one line and exit 2; the main commands run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rewardiff.cli import app, main

SRC = Path(__file__).resolve().parent.parent / "src"


def _main(args: list[str], monkeypatch, capsys) -> tuple[int, str, str]:
    """Run the console script's entry point ``main()`` in this process: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["rewardiff", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def _invoke(*args: str):
    res = CliRunner().invoke(app, list(args))
    assert res.exit_code == 0, res.output
    return res


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
def test_user_errors_are_one_line_with_status_2(tmp_path, monkeypatch, capsys, args, needle):
    monkeypatch.chdir(tmp_path)
    code, _, err = _main(args, monkeypatch, capsys)
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], err
    assert "Traceback" not in err


def test_bad_config_field_type_in_yaml(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("lr: fast\n")
    code, _, err = _main(["finetune", "c.yaml"], monkeypatch, capsys)
    assert code == 2 and "'lr' expects float" in err


def test_installed_console_script_prints_one_line_and_exits_2(tmp_path):
    """The ``rewardiff`` script pip installed next to this Python, in a fresh process (of this
    tree's code): a user mistake is one line on stderr, status 2, no traceback."""
    script = Path(sys.executable).with_name("rewardiff")
    if not script.is_file():
        pytest.skip("the rewardiff console script is not installed next to this Python")
    path = os.pathsep.join(p for p in (str(SRC), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    res = subprocess.run([str(script), "pretrain", "faces"], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown world 'faces'" in lines[0], res.stderr
    assert "Traceback" not in res.stderr


def test_rewards_lists_every_registered_reward():
    res = _invoke("rewards")
    for name in ("shapes-count", "shapes-color", "brightness", "saturation", "jpeg-compressibility", "jpeg-incompressibility"):
        assert name in res.stdout


@pytest.mark.slow
def test_sample_writes_grid_and_summary(tmp_path):
    _invoke("sample", "--model", "shapes", "--prompt", "two red circles", "-n", "3", "--reward", "shapes-count",
            "--steps", "4", "--out", str(tmp_path / "s"))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    assert summary["nfe"] == 3 * 4 * 2  # 3 samples, 4 steps, classifier-free guidance counts 2
    assert {"reward_mean", "reward_std", "nfe_per_sample"} <= set(summary)
    assert (tmp_path / "s" / "grid.png").is_file() and len(list((tmp_path / "s" / "samples").glob("*.png"))) == 3


@pytest.mark.slow
def test_sample_with_a_method_and_a_budget(tmp_path):
    _invoke("sample", "--method", "svdd-pm", "--nfe-budget", "40", "--reward", "jpeg-compressibility", "-n", "2",
            "--steps", "4", "--out", str(tmp_path / "s"))
    summary = json.loads((tmp_path / "s" / "summary.json").read_text())
    # M = 6 is the widest with 2 * (1 + 3 M) <= 40: 38 NFE per sample
    assert summary["options"]["m"] == 6 and summary["nfe_per_sample"] == 38 and summary["nfe"] == 2 * 38
    assert summary["method"] == "svdd-pm" and {"reward_mean", "reward_std"} <= set(summary)


@pytest.mark.slow
def test_demo_runs_two_steps(tmp_path, monkeypatch):
    """The demo's own preset, for 2 steps, evaluated on 8 held-out samples instead of its 96
    (nothing here reads the evaluation's size; it is most of the demo's time)."""
    from rewardiff.finetune import presets

    preset = presets.demo_config

    def smaller_eval(steps=None):
        cfg = preset(steps)
        assert cfg.eval_samples >= 8
        cfg.eval_samples = 8
        return cfg

    monkeypatch.setattr(presets, "demo_config", smaller_eval)
    res = _invoke("demo", "--steps", "2", "--out", str(tmp_path / "demo"))
    assert "judge counting accuracy" in res.stdout
    assert (tmp_path / "demo" / "report.html").is_file()
    rows = (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["step"] for r in rows] == [1, 2]
    demo = json.loads((tmp_path / "demo" / "demo.json").read_text())  # the summary the README quotes from
    before = json.loads((tmp_path / "demo" / "eval_before.json").read_text())
    after = json.loads((tmp_path / "demo" / "eval_after.json").read_text())
    assert demo["judge_count_before"] == before["eval_judge_count"] and demo["judge_count_after"] == after["eval_judge_count"]
    assert demo["reward_before"] == before["eval_reward_mean"] and demo["reward_after"] == after["eval_reward_mean"]
    assert demo["steps"] == 2 and demo["eval_samples"] == 8 and demo["seconds"] > 0 and demo["seconds_per_step"] > 0
    assert demo["machine"]["cpus"] >= 1 and demo["date"] and "commit" in demo
    # a second `make demo` re-reads the finished run: same figures, its own time kept, nothing retrained
    again = _invoke("demo", "--steps", "2", "--out", str(tmp_path / "demo"))
    assert "continuing the run there" in again.stdout
    assert json.loads((tmp_path / "demo" / "demo.json").read_text()) == demo
    assert (tmp_path / "demo" / "metrics.jsonl").read_text().splitlines() == rows
