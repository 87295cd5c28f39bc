"""The super-resolution world's evaluation hook: hallucinations and fidelity of super-resolved samples."""

from __future__ import annotations

from torch import Tensor

from rewardiff.types import Evaluation
from rewardiff.worlds.superres import data as sr


def is_world_prompt(prompt: str) -> bool:
    """Whether ``prompt`` names a scene of the world (``shapes-sr:KEY``, with or without text)."""
    from rewardiff import conditions

    _, ref = conditions.split(prompt)
    return ref is not None and ref.startswith(sr.SCHEME + ":")


def hallucination_hook(model, outputs: Tensor, prompts: list[str], reward_name: str = "") -> Evaluation | None:
    """For images of the world's prompts: ``hallucination_rate`` (share of samples with at least
    one), ``hallucination_count`` (mean), ``hallucination_<type>`` (mean of each type, see
    :mod:`rewardiff.worlds.superres.judge`) and ``psnr`` (dB, to the ground truth); a label a
    sample (its count, "ok" for none). None for anything else."""
    if getattr(model, "texts", None) is not None or outputs.dim() != 4 or not prompts:
        return None
    if not all(is_world_prompt(p) for p in prompts):
        return None
    from rewardiff import conditions
    from rewardiff.worlds.superres.judge import judge_images, psnr, summary

    truth = conditions.stack([conditions.ground_truth(p) for p in prompts], "the super-resolution evaluation").to(outputs.device)
    if truth.shape != outputs.shape:
        return None
    verdict = judge_images(outputs, truth)
    metrics = {**summary(verdict), "psnr": float(psnr(outputs, truth).mean())}
    return Evaluation(metrics, ["ok" if c == 0 else f"{c} halluc." for c in verdict["count"].tolist()])
