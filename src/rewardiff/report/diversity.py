"""Sample diversity: a guard against reward hacking.

A fine-tuned generator that hacks its reward usually finds one output the reward model
likes and produces it for every prompt and every seed: the reward climbs while the samples
collapse onto a few near-identical images. Measuring how different samples are from each
other (above all, samples of the *same* prompt under different seeds) shows that collapse
early, independently of any reward model. A diversity that falls far below the base model's
while the reward rises is a strong sign of reward hacking or mode collapse.

Distances are per-pixel RMS in the images' own value space, so for images in [-1, 1] a
distance of 0.1 is a typical difference of 0.1 per channel value (5 % of the range).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

_BLOCK = 256
"""Rows of the distance matrix computed at once: memory is O(_BLOCK * N + N * D)."""


def pairwise_diversity(images: torch.Tensor) -> float:
    """Mean distance between all pairs of images, each distance a per-pixel RMS.

    For images ``x_i`` with ``D`` values each (``D = C * H * W``), this is the mean over pairs
    ``i < j`` of ``sqrt(mean((x_i - x_j) ** 2))``. It is 0 when all images are identical.
    A collapse of this number during fine-tuning, while the reward rises, is a sign of
    reward hacking (see the module docstring).

    The distances come from inner products (``|a - b|^2 = |a|^2 + |b|^2 - 2 a.b``) on
    mean-centred float64 data, a block of rows at a time, so memory grows as ``N * D`` and
    never as ``N^2 * D``: N = 512 images of 3x32x32 need a few MB.

    Args:
        images: ``[N, ...]`` (e.g. ``[N, 3, H, W]``) with ``N >= 2``.

    Returns:
        The mean pairwise RMS distance.

    Raises:
        ValueError: With fewer than two images.
    """
    if images.ndim < 2 or images.shape[0] < 2:
        raise ValueError(f"pairwise diversity needs at least two images, got shape {tuple(images.shape)}")
    x = images.detach().reshape(images.shape[0], -1).to(device="cpu", dtype=torch.float64)
    x = x - x.mean(dim=0, keepdim=True)  # centring changes no distance and cuts rounding error
    n, d = x.shape
    sq = (x * x).sum(dim=1)
    total = 0.0
    for start in range(0, n, _BLOCK):
        block = x[start : start + _BLOCK]
        d2 = sq[start : start + len(block), None] + sq[None, :] - 2.0 * (block @ x.T)
        dist = (d2.clamp_min(0.0) / d).sqrt()
        total += float(dist.triu(diagonal=start + 1).sum())  # pairs i < j only
    return total / (n * (n - 1) / 2)


def diversity_by_prompt(images: torch.Tensor, prompts: Sequence[str]) -> float:
    """Mean over prompts of the pairwise diversity among samples of that prompt.

    This is the diversity that matters for reward hacking: different prompts are meant to
    look different, but samples of one prompt under different seeds collapsing onto one
    image means the model has stopped following its noise, typically because it found an
    output the reward over-rates. Prompts with a single sample are skipped; each remaining
    prompt counts once, however many samples it has.

    Args:
        images: ``[N, 3, H, W]`` samples.
        prompts: The prompt of each sample (``N`` strings).

    Returns:
        The mean of ``pairwise_diversity`` over prompts with at least two samples, or NaN
        when no prompt has two.

    Raises:
        ValueError: When ``prompts`` is not one per image.
    """
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {len(prompts)} prompts for {images.shape[0]} images")
    groups: dict[str, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(p, []).append(i)
    values = [pairwise_diversity(images[idx]) for idx in groups.values() if len(idx) >= 2]
    return sum(values) / len(values) if values else float("nan")
