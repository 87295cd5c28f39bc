"""The shapes world's evaluation hook: the classical judge's verdict on samples of its prompts.

The judge never feeds any learned reward, so a rising reward with a flat or falling judge
accuracy is reward hacking, and the report shows it as such.
"""

from __future__ import annotations

from torch import Tensor

from rewardiff.types import Evaluation
from rewardiff.worlds.shapes import compositions, data as shapes


def judge_hook(model, outputs: Tensor, prompts: list[str], reward_name: str = "") -> Evaluation | None:
    """Means over the samples and an ok/x label a sample, for image outputs of the world's prompts:

    - counting prompts only ("two red circles"): ``judge_count``, ``judge_color``, ``judge_both``;
    - prompts of the GenEval grammar (counting prompts may be among them, read as its counting
      task): ``judge_geneval_overall`` (mean over the tasks present), ``judge_geneval_<task>``
      and ``judge_geneval_partial`` (flow_grpo's partial credit, mean over the tasks present);
    - None for anything else (text outputs, other prompts).
    """
    if getattr(model, "texts", None) is not None:
        return None
    if all(shapes.is_prompt(p) for p in prompts):
        from rewardiff.worlds.shapes.judge import judge

        verdict = judge(outputs, prompts)
        return Evaluation({f"judge_{k}": float(v.mean()) for k, v in verdict.items()}, ["ok" if c else "x" for c in verdict["count"]])
    if all(compositions.is_prompt(p) or shapes.is_prompt(p) for p in prompts):
        return _geneval(outputs, prompts)
    return None


def _geneval(outputs: Tensor, prompts: list[str]) -> Evaluation:
    from rewardiff.geneval import summarize
    from rewardiff.worlds.shapes.judge import geneval_judge

    v = geneval_judge(outputs, prompts)
    s = summarize(v["specs"], v["correct"], v["partial"])
    metrics = {"judge_geneval_overall": s["overall"], **{f"judge_geneval_{t}": d["accuracy"] for t, d in s["tasks"].items()},
               "judge_geneval_partial": s["partial"]}
    return Evaluation(metrics, ["ok" if c else "x" for c in v["correct"]])
