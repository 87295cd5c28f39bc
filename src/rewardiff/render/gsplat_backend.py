"""The optional CUDA fast path: the same splatting through gsplat's rasterizer.

Used only with ``backend="gsplat"``, where ``import gsplat`` works and the scene lives on a
CUDA device. gsplat culls each splat beyond three standard deviations and skips alphas below
1/255, so its images agree with the dense torch renderer within a small tolerance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rewardiff.errors import UserError
from rewardiff.render.camera import NEAR, Camera
from rewardiff.render.gaussians import Gaussians


def available() -> bool:
    """Whether gsplat imports and a CUDA device is present."""
    try:
        import gsplat  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def rasterize_gsplat(gaussians: Gaussians, cameras: Sequence[Camera], size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Premultiplied colour [V, 3, size, size] (no background) and coverage [V, 1, size, size]."""
    if not available():
        raise UserError("render backend 'gsplat' needs the gsplat package and a CUDA device; use backend='torch'")
    import gsplat

    if gaussians.means.device.type != "cuda":
        raise UserError("render backend 'gsplat' needs the Gaussians on a CUDA device (gaussians.cuda())")
    kinds = {c.orthographic for c in cameras}
    if len(kinds) > 1:
        raise UserError("render backend 'gsplat' renders perspective and orthographic cameras in separate calls")
    dev, dtype = gaussians.means.device, torch.float32
    view = torch.zeros(len(cameras), 4, 4, dtype=dtype, device=dev)
    ks = torch.zeros(len(cameras), 3, 3, dtype=dtype, device=dev)
    for i, c in enumerate(cameras):
        w = c.rotation(dtype).to(dev)
        view[i, :3, :3], view[i, :3, 3], view[i, 3, 3] = w, -w @ c.position(dtype).to(dev), 1.0
        f = c.focal(size)
        ks[i] = torch.tensor([[f, 0.0, size / 2.0], [0.0, f, size / 2.0], [0.0, 0.0, 1.0]], dtype=dtype)
    quats = gaussians.quats if gaussians.quats is not None else \
        gaussians.means.new_tensor([1.0, 0.0, 0.0, 0.0]).expand(len(gaussians), 4)
    colors, alphas, _ = gsplat.rasterization(
        gaussians.means.to(dtype), (quats / quats.norm(dim=-1, keepdim=True)).to(dtype), gaussians.scales.to(dtype),
        gaussians.opacities.to(dtype), gaussians.colors.to(dtype), view, ks, size, size, near_plane=NEAR,
        eps2d=0.3, packed=False, camera_model="ortho" if kinds == {True} else "pinhole")
    return colors.permute(0, 3, 1, 2).to(gaussians.means.dtype), alphas.permute(0, 3, 1, 2).to(gaussians.means.dtype)
