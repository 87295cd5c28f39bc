"""The video world's evaluation hook and rewards: the classical judge's verdict on clips of its prompts."""

from __future__ import annotations

from torch import Tensor

from rewardiff.types import Evaluation
from rewardiff.worlds.video import data as video


def judge_hook(model, outputs: Tensor, prompts: list[str], reward_name: str = "") -> Evaluation | None:
    """Means over the clips (``judge_count``, ``judge_color``, ``judge_direction``,
    ``judge_consistency``, ``judge_all``, ``judge_partial``) and an ok/x label a clip, for clips
    [B, 3, F, H, W] of the world's prompts; None for anything else."""
    if getattr(model, "texts", None) is not None or outputs.dim() != 5 or not all(video.is_prompt(p) for p in prompts):
        return None
    from rewardiff.worlds.video.judge import judge

    v = judge(outputs, prompts)
    metrics = {f"judge_{k.removesuffix('_ok')}": float(a.mean()) for k, a in v.items()}
    return Evaluation(metrics, ["ok" if c else "x" for c in v["all_ok"]])


def _reward(strict: bool):
    import torch

    from rewardiff.errors import UserError
    from rewardiff.rewards.base import RewardFn

    name = "video-judge-strict" if strict else "video-judge"

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        from rewardiff.worlds.video.judge import judge

        if x.dim() != 5:
            raise UserError(f"reward {name!r} reads clips [B, 3, F, H, W]; got shape {tuple(x.shape)}")
        bad = next((p for p in prompts if not video.is_prompt(p)), None)
        if bad is not None:
            raise UserError(f"reward {name!r}: not a video-world prompt: {bad!r} (e.g. 'two red circles moving right')")
        v = judge(x, prompts)
        return torch.as_tensor(v["all_ok"] if strict else v["partial"], dtype=torch.float32, device=x.device)

    kind = "1 when every verdict holds, else 0" if strict else "mean of count, colour, direction and consistency in [0, 1]"
    return RewardFn(name, False, (0.0, 1.0), f"Video world: the classical judge's reading, {kind}", fn)


def video_judge():
    """Video world: the classical judge's partial credit (count, colour, direction, consistency) in [0, 1]."""
    return _reward(strict=False)


def video_judge_strict():
    """Video world: 1 when the classical judge reads count, colour, direction and every frame right, else 0."""
    return _reward(strict=True)
