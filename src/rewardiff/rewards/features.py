"""Feature-distance rewards: LPIPS-style and DISTS-style distances over any feature network,
scored against an image-conditioned prompt's ground truth or against its low-resolution input.

Hallucination Score (arXiv 2507.14367): deep feature distances between a super-resolved image
and its ground truth, or its low-resolution input, track hallucinated detail, and being
differentiable they serve as rewards to fine-tune the super-resolution model. A reward here is
minus the distance (higher is better).

A feature network is any ``net(x) -> list[Tensor]``: images [B, 3, H, W] in [-1, 1] to feature
maps [B, C_l, H_l, W_l], l = 1..L. Two distances over those maps, written from their papers:

- LPIPS (Zhang et al. 2018, eq. 1): each layer's features unit-normalised over channels, the
  squared difference weighted per channel by w_l (ones by default; the published linear heads
  hold the weights applied to the squared difference), averaged over space, summed over layers.
- DISTS (Ding et al. 2020, eqs. 6-8): per layer l and channel j, the texture term
  l = (2 mu_x mu_y + c1) / (mu_x^2 + mu_y^2 + c1) and the structure term
  s = (2 sigma_xy + c2) / (sigma_x^2 + sigma_y^2 + c2) (spatial statistics); the distance is
  1 - sum_{l,j} (alpha_lj l_lj + beta_lj s_lj), with alpha and beta scaled to sum to 1 together.

Against the low-resolution input (``against="lr"``) the output is first area-averaged down to the
input's size, so that only what the downsampling keeps is compared: a super-resolved image is
consistent with its input when it downsamples back to it. Images smaller than a network takes
are then upsampled (bilinear, the same for both) to its input size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff import conditions
from rewardiff.errors import UserError
from rewardiff.rewards.base import RewardFn

FeatureNet = Callable[[Tensor], list[Tensor]]
Metric = Callable[[Tensor, Tensor], Tensor]  # (x [B, 3, H, W], y [B, 3, H, W]) -> [B]
NORM_EPS = 1e-10  # unit_normalize: f / (||f|| + eps), zero features stay zero
DISTS_C1 = DISTS_C2 = 1e-6  # DISTS's stabilising constants
AGAINST = ("gt", "lr")


# ----------------------------------------------------------------------------- the two distances


def unit_normalize(f: Tensor, eps: float = NORM_EPS) -> Tensor:
    """Each position's feature vector scaled to unit length over channels. [B, C, H, W] -> same"""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def lpips_distance(fx: Sequence[Tensor], fy: Sequence[Tensor], weights: Sequence[Tensor] | None = None) -> Tensor:
    """LPIPS: sum_l mean_{h,w} sum_c w_lc (xhat_lchw - yhat_lchw)^2, xhat the unit-normalised features.

    Args:
        fx, fy: feature maps of the two images, layer by layer, [B, C_l, H_l, W_l].
        weights: per-channel weights [C_l] of each layer; ones when None.

    Returns:
        [B] distances, 0 for identical features.
    """
    total = fx[0].new_zeros(fx[0].shape[0])
    for i, (a, b) in enumerate(zip(fx, fy, strict=True)):
        d = (unit_normalize(a) - unit_normalize(b)).pow(2)  # [B, C, H, W]
        if weights is not None:
            d = d * weights[i].to(d).view(1, -1, 1, 1)
        total = total + d.sum(dim=1).mean(dim=(1, 2))
    return total


def split_weights(w: Tensor, channels: Sequence[int]) -> list[Tensor]:
    """A flat per-channel weight vector [sum C_l] (DISTS's file) -> one [C_l] per layer."""
    w = w.reshape(-1)
    if w.numel() != sum(channels):
        raise UserError(f"{w.numel()} weights for feature layers of {list(channels)} channels ({sum(channels)} in all)")
    return list(torch.split(w, list(channels)))


def dists_distance(
    fx: Sequence[Tensor], fy: Sequence[Tensor], alpha: Sequence[Tensor] | None = None, beta: Sequence[Tensor] | None = None,
    c1: float = DISTS_C1, c2: float = DISTS_C2,
) -> Tensor:
    """DISTS: 1 - sum_{l,j} (alpha_lj texture_lj + beta_lj structure_lj), alpha + beta scaled to sum 1.

    Args:
        fx, fy: feature maps of the two images, layer by layer, [B, C_l, H_l, W_l].
        alpha, beta: non-negative weights [C_l] per layer; all equal when None.
        c1, c2: the constants of the texture and structure terms.

    Returns:
        [B] distances, 0 for identical features.
    """
    alpha = alpha if alpha is not None else [a.new_ones(a.shape[1]) for a in fx]
    beta = beta if beta is not None else [a.new_ones(a.shape[1]) for a in fx]
    norm = sum(a.sum() for a in alpha) + sum(b.sum() for b in beta)
    sim = fx[0].new_zeros(fx[0].shape[0])
    for a, b, wa, wb in zip(fx, fy, alpha, beta, strict=True):
        mx, my = a.mean(dim=(2, 3)), b.mean(dim=(2, 3))  # [B, C]
        vx, vy = a.var(dim=(2, 3), unbiased=False), b.var(dim=(2, 3), unbiased=False)
        cov = (a * b).mean(dim=(2, 3)) - mx * my
        texture = (2 * mx * my + c1) / (mx.pow(2) + my.pow(2) + c1)
        structure = (2 * cov + c2) / (vx + vy + c2)
        sim = sim + (texture * wa.to(a)).sum(1) + (structure * wb.to(a)).sum(1)
    return 1 - sim / norm


# ----------------------------------------------------------------------------- over a network


def fit_size(x: Tensor, size: int | None, min_size: int = 0) -> Tensor:
    """``x`` resized to ``size`` x ``size`` (bilinear, antialiased when shrinking) when given, else
    upsampled so that its short side is at least ``min_size``. [B, C, H, W] -> [B, C, H', W']"""
    h, w = x.shape[-2:]
    if size is not None:
        target = (size, size)
    elif min(h, w) < min_size:
        s = min_size / min(h, w)
        target = (max(min_size, round(h * s)), max(min_size, round(w * s)))
    else:
        return x
    if target == (h, w):
        return x
    return F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=target[0] < h)


class FeatureDistance(nn.Module):
    """An LPIPS-style or DISTS-style distance over a feature network. (x, y) -> [B]

    Args:
        net: the feature network, images [B, 3, H, W] in [-1, 1] -> list of [B, C_l, H_l, W_l].
        kind: "lpips" or "dists".
        weights: LPIPS per-channel weights, one [C_l] per layer (ones when None).
        alpha, beta: DISTS weights, one [C_l] per layer (all equal when None).
        size: the network's fixed input size (both images resized to it), or None.
        min_size: the smallest input side the network takes (smaller images are upsampled).
    """

    def __init__(
        self, net: FeatureNet, kind: str = "lpips", weights: Sequence[Tensor] | None = None,
        alpha: Sequence[Tensor] | None = None, beta: Sequence[Tensor] | None = None, size: int | None = None, min_size: int = 0,
    ):
        super().__init__()
        if kind not in ("lpips", "dists"):
            raise UserError(f"feature distance kind must be 'lpips' or 'dists', got {kind!r}")
        self.net, self.kind, self.size, self.min_size = net, kind, size, min_size
        self.weights, self.alpha, self.beta = weights, alpha, beta
        self.eval().requires_grad_(False)  # a fixed function: batch norms read their running statistics

    def features(self, x: Tensor) -> list[Tensor]:
        """The network's feature maps of ``x`` fitted to its input size."""
        return list(self.net(fit_size(x.float(), self.size, self.min_size)))

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Distance between images of one size. x, y [B, 3, H, W] in [-1, 1] -> [B]"""
        if x.shape != y.shape:
            raise UserError(f"feature distance: images of shapes {tuple(x.shape)} and {tuple(y.shape)} differ")
        feats = self.features(torch.cat([x, y.to(x)]))
        fx, fy = [f[: x.shape[0]] for f in feats], [f[x.shape[0]:] for f in feats]
        if self.kind == "lpips":
            return lpips_distance(fx, fy, self.weights)
        return dists_distance(fx, fy, self.alpha, self.beta)


def lazy_metric(build: Callable[[], Metric]) -> Metric:
    """``metric(x, y)`` with ``metric = build()`` run once, at the first call (weights load then)."""
    cache: dict[str, Any] = {}

    def metric(x: Tensor, y: Tensor) -> Tensor:
        if "metric" not in cache:
            cache["metric"] = build()
        m = cache["metric"]
        if isinstance(m, nn.Module):
            p = next(m.parameters(), None)
            if p is not None and p.device != x.device:
                m.to(x.device)
        return m(x, y)

    return metric


# ----------------------------------------------------------------------------- references


def check_against(against: str) -> str:
    """``against`` checked: "gt" (the ground truth) or "lr" (the low-resolution input)."""
    if against not in AGAINST:
        raise UserError(f"against must be 'gt' (the ground truth) or 'lr' (the low-resolution input), got {against!r}")
    return against


def references(prompts: Sequence[str], against: str, like: Tensor) -> Tensor:
    """The prompts' reference images [B, 3, h, w] on ``like``'s device, as float; UserError
    naming the first prompt without one (or with a size unlike the others)."""
    images = []
    for p in prompts:
        im = conditions.ground_truth(p) if against == "gt" else conditions.low_res(p)
        if im is None:
            raise UserError(f"prompt {p!r} has no ground truth image to compare with; name one (file:LOW.png;gt=HIGH.png) "
                            "or use the reward's low-resolution variant")
        if images and im.shape != images[0].shape:
            raise UserError(f"prompt {p!r}: its image is {tuple(im.shape)}, the batch's first is {tuple(images[0].shape)}")
        images.append(im)
    return torch.stack(images).to(device=like.device, dtype=torch.float32)


def area_downsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """``x`` averaged down to ``size`` (each output pixel the mean of its input area; exact block
    means when the sides divide). [B, C, H, W] -> [B, C, h, w]"""
    h, w = size
    if h > x.shape[-2] or w > x.shape[-1]:
        raise UserError(f"the low-resolution input ({h}x{w}) is larger than the output ({x.shape[-2]}x{x.shape[-1]})")
    return F.adaptive_avg_pool2d(x, (h, w))


def compare(metric: Metric, x: Tensor, ref: Tensor, against: str) -> Tensor:
    """``metric`` of ``x`` against ``ref`` (detached: no gradient reaches a reference).

    Against "lr" the output is area-averaged down to the input's size first; against "gt" the
    two must have one size. x [B, 3, H, W], ref [B, 3, h, w] -> [B]
    """
    ref = ref.detach().to(x.device, torch.float32)
    x = x.float()
    if against == "lr":
        x = area_downsample(x, (ref.shape[-2], ref.shape[-1]))
    elif x.shape[-2:] != ref.shape[-2:]:
        raise UserError(f"output {tuple(x.shape[-2:])} and ground truth {tuple(ref.shape[-2:])} differ in size")
    return metric(x, ref)


def reference_reward(
    name: str, metric: Metric, against: str, sign: float, value_range: tuple[float, float] | None, description: str
) -> RewardFn:
    """A differentiable reward ``sign * metric(x, reference(prompt))`` (sign -1 for a distance).

    Args:
        name: the reward's name.
        metric: ``(x, ref) -> [B]``, both [B, 3, h, w] in [-1, 1].
        against: "gt" or "lr".
        sign: -1 for distances (the reward is minus the distance), +1 for similarities.
        value_range: (low, high) of the reward when known.
        description: one line.
    """
    check_against(against)

    def fn(x: Tensor, prompts: list[str]) -> Tensor:
        if x.dim() != 4 or x.shape[1] != 3:
            raise UserError(f"reward {name!r} takes RGB images [B, 3, H, W]; got shape {tuple(x.shape)}")
        return sign * compare(metric, x, references(prompts, against, x), against)

    return RewardFn(name, True, value_range, description, fn)
