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


def sharpness(x: Tensor) -> Tensor:
    """Mean gradient magnitude of images [B, C, H, W] (forward differences of the pixels), one a sample [B]."""
    dx = x[..., :, 1:] - x[..., :, :-1]
    dy = x[..., 1:, :] - x[..., :-1, :]
    return (dx[..., :-1, :].pow(2) + dy[..., :, :-1].pow(2)).sqrt().flatten(1).mean(1)


def hallucination_hook(model, outputs: Tensor, prompts: list[str], reward_name: str = "") -> Evaluation | None:
    """For images of the world's prompts: ``hallucination_rate`` (share of samples with at least
    one), ``hallucination_count`` (mean), ``hallucination_<type>`` (mean of each type, see
    :mod:`rewardiff.worlds.superres.judge`), ``psnr`` (dB) and ``ssim`` to the ground truth, and
    ``sharpness`` (the outputs' mean gradient magnitude over the truths': below 1 is blurrier than
    the truth, so that "hallucinates less by blurring" shows); a label a sample (its count, "ok"
    for none). None for anything else."""
    if getattr(model, "texts", None) is not None or outputs.dim() != 4 or not prompts:
        return None
    if not all(is_world_prompt(p) for p in prompts):
        return None
    from rewardiff import conditions
    from rewardiff.worlds.superres.judge import judge_images, psnr, summary

    truth = conditions.stack([conditions.ground_truth(p) for p in prompts], "the super-resolution evaluation").to(outputs.device)
    if truth.shape != outputs.shape:
        return None
    from rewardiff.rewards.fidelity import ssim

    verdict = judge_images(outputs, truth)
    metrics = {**summary(verdict), "psnr": float(psnr(outputs, truth).mean()), "ssim": float(ssim(outputs, truth).mean()),
               "sharpness": float(sharpness(outputs).mean() / sharpness(truth).mean())}
    return Evaluation(metrics, ["ok" if c == 0 else f"{c} halluc." for c in verdict["count"].tolist()])
