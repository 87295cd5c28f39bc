"""Pixel fidelity rewards: PSNR and SSIM against a prompt's ground truth, PSNR against its
low-resolution input; differentiable, written from their definitions.

Pixels in [-1, 1] are read as [0, 1] (data range L = 1).

- PSNR = 10 log10(L^2 / MSE), capped at :data:`PSNR_MAX` dB (MSE floored at 10^-10).
- SSIM (Wang et al. 2004, eqs. 13-14): local statistics under an 11 x 11 Gaussian window of
  standard deviation 1.5 (each channel apart, window positions fully inside the image),
  SSIM = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 + sigma_y^2 + C2)),
  C1 = (0.01 L)^2, C2 = (0.03 L)^2, averaged over positions and channels. An image smaller than
  the window gets the largest odd window that fits.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.features import reference_reward

PSNR_MAX = 100.0  # dB, the value for identical images
MSE_FLOOR = 10 ** (-PSNR_MAX / 10)
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def _unit(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1] (not clamped, so that the gradient survives everywhere)."""
    return (x.float() + 1) / 2


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Peak signal-to-noise ratio in dB, pixels in [-1, 1] read as [0, 1]. [B, C, H, W] x 2 -> [B]"""
    mse = (_unit(x) - _unit(y)).pow(2).mean(dim=(1, 2, 3))
    return 10 * torch.log10(1.0 / mse.clamp(min=MSE_FLOOR))


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """The 1-D Gaussian of ``size`` taps, centred, summing to 1. -> [size]"""
    t = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-t.pow(2) / (2 * sigma**2))
    return g / g.sum()


def _blur(x: Tensor, g: Tensor) -> Tensor:
    """Separable Gaussian filter of each channel, valid positions only. [B, C, H, W] -> [B, C, H-k+1, W-k+1]"""
    c = x.shape[1]
    x = F.conv2d(x, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
    return F.conv2d(x, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)


def ssim(x: Tensor, y: Tensor, window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> Tensor:
    """Structural similarity, pixels in [-1, 1] read as [0, 1]; 1 for identical images. [B, C, H, W] x 2 -> [B]"""
    a, b = _unit(x), _unit(y)
    size = min(window, *a.shape[-2:])
    size -= 1 - size % 2  # odd
    g = gaussian_window(size, sigma).to(a)
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    mx, my = _blur(a, g), _blur(b, g)
    # second moments of each image less its global mean: the same (co)variances, without the
    # float32 cancellation of E[x^2] - mu^2 that would dwarf C2 on flat regions
    da, db = a - a.mean(dim=(2, 3), keepdim=True), b - b.mean(dim=(2, 3), keepdim=True)
    ma, mb = _blur(da, g), _blur(db, g)
    vx = _blur(da * da, g) - ma.pow(2)
    vy = _blur(db * db, g) - mb.pow(2)
    cov = _blur(da * db, g) - ma * mb
    s = (2 * mx * my + c1) * (2 * cov + c2) / ((mx.pow(2) + my.pow(2) + c1) * (vx + vy + c2))
    return s.mean(dim=(1, 2, 3))


# ----------------------------------------------------------------------------- registered rewards


def psnr_reward(against: str = "gt") -> RewardFn:
    """PSNR (dB) against the ground truth (against="lr": the output area-averaged down, against the input)."""
    name = "psnr" if against == "gt" else "psnr-lr"
    what = "the ground truth" if against == "gt" else "the low-resolution input (output area-averaged down to its size)"
    return reference_reward(name, psnr, against, 1.0, (0.0, PSNR_MAX), f"PSNR in dB against {what}")


def psnr_lr() -> RewardFn:
    """PSNR (dB) of the output area-averaged down to the low-resolution input's size, against that input."""
    return psnr_reward("lr")


def ssim_reward(window: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> RewardFn:
    """SSIM (11 x 11 Gaussian window, sigma 1.5) against the ground truth, at most 1."""
    if window < 1 or not math.isfinite(sigma) or sigma <= 0:
        raise UserError(f"ssim needs window >= 1 and sigma > 0, got window={window}, sigma={sigma}")
    return reference_reward("ssim", lambda x, y: ssim(x, y, window, sigma), "gt", 1.0, (-1.0, 1.0),
                            f"SSIM ({window}x{window} Gaussian window, sigma {sigma}) against the ground truth")
