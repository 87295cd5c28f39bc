"""Feature-distance rewards over the shapes world's own feature network: the backbone of the
learned reward model (:class:`~rewardiff.worlds.shapes.reward_model.ShapesRM`), read at each scale.

``lpips-shapes`` / ``dists-shapes`` compare an output with its prompt's ground truth,
``lpips-shapes-lr`` / ``dists-shapes-lr`` with its low-resolution input (the output area-averaged
down to the input's size, both then resized to the network's 32 x 32); see
:mod:`rewardiff.rewards.features`. The LPIPS-style weights are ones (nothing calibrates them on
human judgements here), the DISTS-style alpha and beta all equal.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.features import FeatureDistance, check_against, lazy_metric, reference_reward
from rewardiff.worlds.shapes.reward_model import SIZE, ShapesRM, _check_exists, _weights_file, load_reward_model

WHAT = {"gt": "the ground truth", "lr": "the low-resolution input"}
N_SCALES = 3  # feature maps at 32x32, 16x16, 8x8


class ShapesFeatures(nn.Module):
    """The reward model's backbone as a feature network. x [B, 3, 32, 32] in [-1, 1] ->
    [B, C1, 32, 32], [B, C2, 16, 16], [B, C3, 8, 8]: each scale's output before its pooling."""

    def __init__(self, net: ShapesRM):
        super().__init__()
        stages: list[list[nn.Module]] = [[]]
        for layer in net.features:
            if isinstance(layer, nn.AvgPool2d):
                stages.append([])
            stages[-1].append(layer)
        self.stages = nn.ModuleList(nn.Sequential(*s) for s in stages)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


def shapes_distance(kind: str, path: str | Path | None = None) -> FeatureDistance:
    """The LPIPS-style (``kind="lpips"``) or DISTS-style (``"dists"``) distance over the reward
    model at ``path`` (the shipped ``shapes-rm`` weights by default). (x, y) -> [B]"""
    return FeatureDistance(ShapesFeatures(load_reward_model(path)), kind, size=SIZE)


def lpips_shapes_distance() -> FeatureDistance:
    """The LPIPS-style distance over the shipped reward model's features. (x, y) -> [B]"""
    return shapes_distance("lpips")


def dists_shapes_distance() -> FeatureDistance:
    """The DISTS-style distance over the shipped reward model's features. (x, y) -> [B]"""
    return shapes_distance("dists")


def _reward(kind: str, against: str, path: str | Path | None) -> RewardFn:
    check_against(against)
    _check_exists(_weights_file(path))
    name = f"{kind}-shapes" + ("-lr" if against == "lr" else "")
    value_range = (-4.0 * N_SCALES, 0.0) if kind == "lpips" else (-2.0, 0.0)
    style = "LPIPS" if kind == "lpips" else "DISTS"
    return reference_reward(name, lazy_metric(lambda: shapes_distance(kind, path)), against, -1.0, value_range,
                            f"shapes world: minus the {style}-style distance over the reward model's features, against {WHAT[against]}")


def lpips_shapes(path: str | Path | None = None, against: str = "gt") -> RewardFn:
    """Shapes world: minus the LPIPS-style distance over the reward model's features, against the ground truth."""
    return _reward("lpips", against, path)


def lpips_shapes_lr(path: str | Path | None = None) -> RewardFn:
    """Shapes world: minus the LPIPS-style distance over the reward model's features, against the low-resolution input."""
    return _reward("lpips", "lr", path)


def dists_shapes(path: str | Path | None = None, against: str = "gt") -> RewardFn:
    """Shapes world: minus the DISTS-style distance over the reward model's features, against the ground truth."""
    return _reward("dists", against, path)


def dists_shapes_lr(path: str | Path | None = None) -> RewardFn:
    """Shapes world: minus the DISTS-style distance over the reward model's features, against the low-resolution input."""
    return _reward("dists", "lr", path)
