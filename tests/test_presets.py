"""The presets under configs/: one for every fine-tuning method, each a config the trainer accepts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from rewardiff.cli import app
from rewardiff.finetune.config import load_config
from rewardiff.finetune.methods import METHODS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
PRESETS = sorted(CONFIGS.glob("*.yaml"))
# presets named after a variant rather than after their method
VARIANTS = {"draft-plus": "draft-k", "grpo-fast": "grpo", "mixgrpo": "grpo",  # DRaFT+ is DRaFT-K with a penalty; the SDE windows are grpo options
            "sr-draft-k": "draft-k", "sr-alignprop": "alignprop"}  # DRaFT-K and AlignProp against hallucination on the super-resolution world


def test_every_method_has_a_preset():
    names = {p.stem for p in PRESETS}
    assert set(METHODS) <= names, f"methods without a preset in configs/: {sorted(set(METHODS) - names)}"


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_a_preset_starts_with_a_comment_and_names_its_method(path):
    text = path.read_text()
    assert text.startswith("# ") and len(text.splitlines()[0]) > 20, "a preset opens with a line saying what it runs"
    cfg = load_config(path)
    assert cfg.method == VARIANTS.get(path.stem, path.stem)
    assert set(yaml.safe_load(text)) <= set(vars(cfg)), "every key is a config field"  # load_config refuses others too


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.name)
def test_a_preset_passes_the_trainers_checks(path, tmp_path):
    """Everything a run checks before its first step: the method, the reward (and its gradient
    where the method backpropagates through it), the model's capabilities and the method's own
    settings (DDPO's eta and minibatches, VARD's eta), by building the run itself."""
    from rewardiff.finetune.trainer import Run

    cfg = load_config(path)
    if cfg.model == "molecules-ar":
        from tests.helpers import needs_shipped_molecules_ar

        needs_shipped_molecules_ar()
    assert math.isfinite(cfg.lr) and cfg.lr > 0  # finetune() refuses any other
    run = Run(cfg, tmp_path / "run", progress=False)
    assert run.cfg is cfg and not (tmp_path / "run").exists()  # nothing written before training


def test_draft_plus_carries_its_penalty_and_ddpo_samples_stochastically():
    assert load_config(CONFIGS / "draft-plus.yaml").kl_weight > 0
    ddpo = load_config(CONFIGS / "ddpo.yaml")
    assert ddpo.eta > 0 and ddpo.batch_size % ddpo.ppo_minibatches == 0
    assert load_config(CONFIGS / "vard.yaml").eta > 0


def test_the_ddpo_preset_runs_one_step(tmp_path):
    """One step of the ddpo preset from the command (about 8 s): its eta of 1 makes a stochastic
    sampler whose LoRA moves, so the model's paths leave the base model's (KL > 0 after, 0 before),
    and the step queried the reward once per sample of its batch of 2."""
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["finetune", str(CONFIGS / "ddpo.yaml"), "--set", "steps=1", "--set", "batch_size=2",
                                   "--set", "eval_samples=2", "--set", "num_inference_steps=3", "--set", "checkpoint_every=0",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] and rows[0]["reward_queries"] == 2 and rows[0]["updates"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "ddpo" and summary["reward"] == "jpeg-compressibility"
    assert summary["before"]["eval_kl_to_base"] == 0.0 and summary["after"]["eval_kl_to_base"] > 0.0
    assert yaml.safe_load((out / "config.yaml").read_text())["eta"] == 1.0
