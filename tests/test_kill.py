"""The kill campaign's short form (``benchmarks/kill_campaign.py`` runs the long one): a run
SIGKILLed at random moments and between a checkpoint's files, resumed each time, ends bit for
bit where the uninterrupted run ends, and no checkpoint is ever unloadable."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _campaign_module():
    spec = importlib.util.spec_from_file_location("kill_campaign", ROOT / "benchmarks" / "kill_campaign.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow
def test_killed_and_resumed_runs_end_bit_identical(tiny_model_dir, tmp_path):
    kc = _campaign_module()
    res = kc.campaign("draft-k", 4, tmp_path, random.Random(3), overrides=(f"model={tiny_model_dir}", "reward=brightness", "steps=4",
                                                                            "eval_every=2", "guidance_scale=1", "k=1"),
                      points=["before-state", "before-latest"])
    assert res["kills"] == 4 and res["cycles"], res["log"]
    assert res["unloadable"] == [] and res["strays"] == [], res
    assert res["all_identical"], res["identical"]
    named = [r for r in res["log"] if r["kind"].startswith(("before-state", "before-latest"))]
    assert named and all(r["exit"] in (0, -9) for r in named)


def test_the_campaign_sees_a_broken_checkpoint(tmp_path):
    """Its loader is not blind: a truncated weights file is reported."""
    kc = _campaign_module()
    d = tmp_path / "checkpoints" / "step-000002"
    d.mkdir(parents=True)
    (d / "trainable.safetensors").write_bytes(b"\x00" * 10)
    (tmp_path / "checkpoints" / "latest").write_text("step-000009")
    problems = kc.checkpoint_problems(tmp_path, "draft-k")
    assert any(p.startswith("step-000002:") for p in problems) and any("latest names" in p for p in problems)
