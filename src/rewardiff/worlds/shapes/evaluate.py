"""The shapes world's evaluation hook: the classical judge's verdict on samples of its prompts.

The judge never feeds any reward, so a rising reward with a flat or falling judge accuracy is
reward hacking, and the report shows it as such.
"""

from __future__ import annotations

from torch import Tensor

from rewardiff.types import Evaluation
from rewardiff.worlds.shapes import data as shapes


def judge_hook(model, outputs: Tensor, prompts: list[str], reward_name: str = "") -> Evaluation | None:
    """``judge_count``, ``judge_color``, ... (means over the samples) and an ok/x label a sample;
    None unless every prompt is a shapes prompt and the outputs are images."""
    from rewardiff.worlds.shapes.judge import judge

    if getattr(model, "texts", None) is not None or not all(shapes.is_prompt(p) for p in prompts):
        return None
    verdict = judge(outputs, prompts)
    return Evaluation({f"judge_{k}": float(v.mean()) for k, v in verdict.items()}, ["ok" if c else "x" for c in verdict["count"]])
