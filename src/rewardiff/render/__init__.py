"""A small differentiable renderer: 3D Gaussians splatted onto orbiting cameras, pure torch.

The target of score distillation: ``render_views(gaussians, cameras, size)`` gives images
[V, 3, H, W] in [-1, 1] (the project's image convention) that are differentiable in every
Gaussian's position, scale, colour and opacity.
"""

from rewardiff.render.camera import Camera
from rewardiff.render.gaussians import Gaussians
from rewardiff.render.splat import project_gaussians, rasterize, render, render_views

__all__ = ["Camera", "Gaussians", "project_gaussians", "rasterize", "render", "render_views"]
