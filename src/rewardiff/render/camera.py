"""Cameras that orbit the origin: the views a 3D scene is rendered and distilled from.

World frame: z is up and the ground is the plane z = 0. A :class:`Camera` sits on a sphere of
radius ``distance`` around the origin, at ``azimuth`` degrees about +z (0 on +x, 90 on +y) and
``elevation`` degrees above the ground, and looks at the origin. Its own frame follows the
OpenCV / 3DGS convention: x to the right of the image, y down the image, z forward (depth).
Pixel (row i, column j) has its centre at (u, v) = (j + 0.5, i + 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rewardiff.errors import UserError

NEAR = 0.1  # points closer to a perspective camera than this (along its axis) are not drawn


@dataclass(frozen=True)
class Camera:
    """A camera on an orbit around the origin, looking at it, with +z up.

    Attributes:
        azimuth: degrees about +z, measured from +x towards +y.
        elevation: degrees above the ground plane; within (-90, 90).
        distance: from the origin.
        fov: full field of view in degrees (the same horizontally and vertically: images are
            square); ``None`` for an orthographic camera.
        ortho_scale: an orthographic camera's half-width in world units (unused in perspective).
    """

    azimuth: float
    elevation: float
    distance: float = 4.0
    fov: float | None = 40.0
    ortho_scale: float = 1.6

    def __post_init__(self) -> None:
        if not -90.0 < self.elevation < 90.0:
            raise UserError(f"camera elevation must lie strictly between -90 and 90 degrees, got {self.elevation}")
        if self.distance <= 0:
            raise UserError(f"camera distance must be positive, got {self.distance}")
        if self.fov is not None and not 0.0 < self.fov < 180.0:
            raise UserError(f"camera fov must lie strictly between 0 and 180 degrees (or None), got {self.fov}")
        if self.ortho_scale <= 0:
            raise UserError(f"camera ortho_scale must be positive, got {self.ortho_scale}")

    @property
    def orthographic(self) -> bool:
        return self.fov is None

    def position(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The camera centre in world coordinates [3]."""
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        d = self.distance
        return torch.tensor([d * math.cos(el) * math.cos(az), d * math.cos(el) * math.sin(az), d * math.sin(el)], dtype=dtype)

    def rotation(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """World-to-camera rotation W [3, 3]; its rows are the camera's right, down and forward
        axes in world coordinates, so that camera = W (world - position)."""
        az, el = math.radians(self.azimuth), math.radians(self.elevation)
        forward = [-math.cos(el) * math.cos(az), -math.cos(el) * math.sin(az), -math.sin(el)]
        right = [-math.sin(az), math.cos(az), 0.0]  # forward x (+z), normalised; never degenerate for |el| < 90
        down = [  # forward x right: image rows grow towards -z
            forward[1] * right[2] - forward[2] * right[1],
            forward[2] * right[0] - forward[0] * right[2],
            forward[0] * right[1] - forward[1] * right[0],
        ]
        return torch.tensor([right, down, forward], dtype=dtype)

    def focal(self, size: int) -> float:
        """Pixels per unit of x/z (perspective) or per world unit (orthographic) at ``size`` pixels."""
        if self.fov is None:
            return size / (2.0 * self.ortho_scale)
        return size / (2.0 * math.tan(math.radians(self.fov) / 2.0))

    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Points [N, 3] in the camera frame (x right, y down, z forward) [N, 3]."""
        w = self.rotation(points.dtype).to(points.device)
        return (points - self.position(points.dtype).to(points.device)) @ w.T

    def project(self, points: torch.Tensor, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel coordinates of world points in a ``size`` x ``size`` image.

        Returns:
            uv [N, 2] (column, row) in pixels, pixel centres at half-integers; depth [N] (the
            camera-frame z: distance along the viewing axis).
        """
        cam = self.world_to_camera(points)
        z = cam[:, 2]
        scale = cam.new_ones(()) if self.orthographic else z.clamp_min(NEAR)
        uv = self.focal(size) * cam[:, :2] / scale[..., None] + size / 2.0
        return uv, z

    def ray_directions(self, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """World-space directions [size*size, 3] of the rays through each pixel centre (row-major),
        not normalised; for an orthographic camera every ray has the viewing direction."""
        w = self.rotation(dtype)
        c = (torch.arange(size, dtype=dtype) + 0.5 - size / 2.0) / self.focal(size)
        y, x = torch.meshgrid(c, c, indexing="ij")
        if self.orthographic:
            return w[2].expand(size * size, 3).clone()
        cam = torch.stack([x.reshape(-1), y.reshape(-1), torch.ones(size * size, dtype=dtype)], -1)
        return cam @ w

    def ray_origins(self, size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """World-space origins [size*size, 3] of the rays through each pixel centre (the camera
        centre in perspective; points on the image plane through it for an orthographic camera)."""
        pos = self.position(dtype)
        if not self.orthographic:
            return pos.expand(size * size, 3).clone()
        w = self.rotation(dtype)
        c = (torch.arange(size, dtype=dtype) + 0.5 - size / 2.0) / self.focal(size)
        y, x = torch.meshgrid(c, c, indexing="ij")
        return pos + x.reshape(-1, 1) * w[0] + y.reshape(-1, 1) * w[1]
