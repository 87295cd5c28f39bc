"""Plain image rewards: brightness, saturation and JPEG size (as in DDPO)."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from rewardiff.rewards.base import RewardFn

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights of R, G, B
SAT_SOFTEN = 0.05  # keeps the saturation gradient bounded on near-black pixels
JPEG_QUALITY = 95  # as in DDPO's compressibility rewards


def _unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped. [B, C, H, W] -> [B, C, H, W]"""
    return ((x + 1) / 2).clamp(0, 1)


def brightness_fn(x: Tensor, prompts: list[str]) -> Tensor:
    """Mean luminance in [0, 1]: 0 for all black, 1 for all white. x [B, 3, H, W] -> [B]"""
    rgb = _unit(x)
    if rgb.shape[1] == 1:
        return rgb.mean(dim=(1, 2, 3))
    w = torch.tensor(LUMA, device=x.device, dtype=rgb.dtype).view(1, 3, 1, 1)
    return (rgb[:, :3] * w).sum(1).mean(dim=(1, 2))  # [B, H, W] -> [B]


def saturation_fn(x: Tensor, prompts: list[str]) -> Tensor:
    """Mean HSV saturation in [0, 1]. x [B, 3, H, W] -> [B]

    Per pixel ``s = (max - min) * (1 + d) / (max + d)`` with d = 0.05: HSV's ``(max - min) / max``
    at full value, softened toward 0 on near-black pixels so that the gradient stays finite.
    """
    rgb = _unit(x)
    hi, lo = rgb.amax(dim=1), rgb.amin(dim=1)  # [B, H, W]
    s = (hi - lo) * (1 + SAT_SOFTEN) / (hi + SAT_SOFTEN)
    return s.mean(dim=(1, 2))


def jpeg_size_kb(x: Tensor) -> Tensor:
    """Size in kB (1000 bytes) of each image encoded by PIL as JPEG at quality 95. x [B, C, H, W] -> [B]"""
    arr = ((_unit(x.detach().float()) * 255).round().to(torch.uint8)).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for im in arr:  # [H, W, C]
        buf = io.BytesIO()
        pil = Image.fromarray(im[:, :, 0] if im.shape[-1] == 1 else np.ascontiguousarray(im[:, :, :3]))
        pil.save(buf, format="JPEG", quality=JPEG_QUALITY)
        sizes.append(buf.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=x.device)


def brightness() -> RewardFn:
    """Mean luminance (ITU-R BT.601) in [0, 1]."""
    return RewardFn("brightness", True, (0.0, 1.0), "mean luminance in [0, 1]", brightness_fn)


def saturation() -> RewardFn:
    """Mean HSV saturation in [0, 1]."""
    return RewardFn("saturation", True, (0.0, 1.0), "mean HSV saturation in [0, 1]", saturation_fn)


def jpeg_compressibility() -> RewardFn:
    """Minus the JPEG size in kB at quality 95, as in DDPO."""
    return RewardFn(
        "jpeg-compressibility", False, None, "minus the JPEG size in kB (quality 95)",
        lambda x, prompts: -jpeg_size_kb(x),
    )


def jpeg_incompressibility() -> RewardFn:
    """The JPEG size in kB at quality 95, as in DDPO."""
    return RewardFn(
        "jpeg-incompressibility", False, None, "the JPEG size in kB (quality 95)",
        lambda x, prompts: jpeg_size_kb(x),
    )
