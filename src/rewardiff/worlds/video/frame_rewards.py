"""Image rewards of the shapes world read on video frames: what an ensemble with the video
judge adds (Free2Guide combines its vision-language judge with per-frame image rewards).

``video-frames-count`` is the shapes world's learned count reward (``shapes-count``) on each
frame, with the prompt's motion words dropped ("two red circles moving right" is scored as
"two red circles"); ``keyframes(video-frames-count)`` reads it on a clip's key frames. It
knows nothing of motion, so steering on it alone cannot fix a direction: the judge's
direction reading tells.
"""

from __future__ import annotations

from torch import Tensor

from rewardiff.rewards.base import RewardFn

MOTION_WORD = " moving "


def still_prompt(prompt: str) -> str:
    """"two red circles moving right" -> "two red circles" (a prompt without motion is kept)."""
    return prompt.split(MOTION_WORD, 1)[0] if MOTION_WORD in prompt else prompt


def frames_count(path: str | None = None) -> RewardFn:
    """Video world: the shapes count reward (clamped log p(asked count)) on images or frames, motion words dropped."""
    from rewardiff.worlds.shapes.reward_model import shapes_count

    inner = shapes_count(path)

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        return inner(x, [still_prompt(p) for p in prompts])

    return RewardFn("video-frames-count", True, inner.value_range,
                    "video world: the shapes count reward on each frame image, motion words dropped", fn)
