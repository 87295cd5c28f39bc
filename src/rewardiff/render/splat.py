"""Differentiable splatting of 3D Gaussians (EWA splatting, as 3D Gaussian splatting does it).

Notation (Zwicker et al. 2002, "EWA splatting"; Kerbl et al. 2023, "3D Gaussian Splatting"):
Sigma is a Gaussian's world covariance, W the camera's world-to-camera rotation, t = W (mu - p)
its centre in the camera frame, f the focal length in pixels and c = size / 2 the principal point.

1. Project the centre:       m = f t_xy / t_z + c          (orthographic: m = f t_xy + c)
2. Linearise the projection: J = [[f/t_z, 0, -f t_x/t_z^2], [0, f/t_z, -f t_y/t_z^2]]
                                                            (orthographic: J = [[f, 0, 0], [0, f, 0]])
3. 2D covariance:            Sigma' = J W Sigma W^T J^T + 0.3 I   (the 0.3 px^2 dilation keeps
                                                            every splat at least about a pixel wide)
4. Per pixel x:              alpha_i = min(0.99, o_i exp(-1/2 (x - m_i)^T Sigma'^-1 (x - m_i)))
5. Sorted by depth t_z, front to back:
                             T_i = prod_{j<i} (1 - alpha_j),  C = sum_i T_i alpha_i c_i + T_N bg

Everything is dense over [views, Gaussians, pixels] tensors, so autograd differentiates every
parameter (no tiles, no culling, unlike 3DGS's CUDA rasterizer); that is fast on a CPU at a
few hundred Gaussians and 32x32 or 64x64 images. ``backend="gsplat"`` hands the same scene to
gsplat's CUDA rasterizer where gsplat and a GPU are present (it culls splats beyond 3 sigma and
below alpha 1/255, so it agrees with this one within a tolerance, not exactly).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from rewardiff.errors import UserError
from rewardiff.render.camera import NEAR, Camera
from rewardiff.render.gaussians import Gaussians

DILATION = 0.3  # px^2 added to every 2D covariance (3DGS's low-pass filter)
MAX_ALPHA = 0.99  # alpha is clamped here so that transmittance never reaches zero
MIN_POWER = -40.0  # exponents are floored here: exp(-40) ~ 4e-18 is nothing, and exp of far lower
# values underflows to subnormal floats, which CPUs compute tens of times slower
CHUNK_ELEMENTS = 1 << 23  # views are rendered in chunks of at most this many (view, Gaussian, pixel) entries

Background = Union[Sequence[float], torch.Tensor, Callable[[Camera, int], torch.Tensor]]
BACKENDS = ("torch", "gsplat")


def render(gaussians: Gaussians, camera: Camera, size: int = 32, background: Background = (1.0, 1.0, 1.0),
           backend: str = "torch") -> torch.Tensor:
    """One view of ``gaussians``: an image [3, size, size] in [-1, 1].

    Args:
        gaussians: the scene.
        camera: the view.
        size: image height and width in pixels.
        background: RGB in [0, 1] behind the scene: a colour (3 numbers or a tensor [3]), an
            image [3, size, size], or a function ``(camera, size) -> tensor`` giving either.
        backend: ``"torch"`` (dense, differentiable, any device) or ``"gsplat"`` (CUDA).
    """
    if callable(background) or not torch.is_tensor(background) or background.dim() == 1:
        bg = background
    else:
        bg = background[None]
    return render_views(gaussians, [camera], size, bg, backend)[0]


def render_views(gaussians: Gaussians, cameras: Sequence[Camera], size: int = 32,
                 background: Background = (1.0, 1.0, 1.0), backend: str = "torch") -> torch.Tensor:
    """Several views of ``gaussians`` at once: images [V, 3, size, size] in [-1, 1].

    ``background`` is as for :func:`render`, or images [V, 3, size, size] (one a view).
    """
    rgb, _ = rasterize(gaussians, cameras, size, background, backend)
    return rgb * 2.0 - 1.0


def rasterize(gaussians: Gaussians, cameras: Sequence[Camera], size: int = 32,
              background: Background = (1.0, 1.0, 1.0), backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """The composite in [0, 1] and the scene's coverage.

    Returns:
        rgb [V, 3, size, size] in [0, 1]; alpha [V, 1, size, size] = 1 - T_N, the share of each
        pixel the Gaussians cover (for opacity or mask losses).
    """
    if not cameras:
        raise UserError("render_views needs at least one camera")
    if size < 1:
        raise UserError(f"render size must be a positive number of pixels, got {size}")
    if backend not in BACKENDS:
        raise UserError(f"unknown render backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    means = gaussians.means
    bg = _backgrounds(background, cameras, size, means.dtype, means.device)  # [V, 3, P]
    if backend == "gsplat":
        from rewardiff.render.gsplat_backend import rasterize_gsplat

        rgb, alpha = rasterize_gsplat(gaussians, cameras, size)
        return rgb + (1.0 - alpha) * bg.reshape(len(cameras), 3, size, size), alpha
    per_chunk = max(1, CHUNK_ELEMENTS // max(1, len(gaussians) * size * size))
    outs = [_splat(gaussians, cameras[i:i + per_chunk], size, bg[i:i + per_chunk]) for i in range(0, len(cameras), per_chunk)]
    rgb = torch.cat([o[0] for o in outs]).reshape(len(cameras), 3, size, size)
    alpha = torch.cat([o[1] for o in outs]).reshape(len(cameras), 1, size, size)
    return rgb, alpha


def _backgrounds(background: Background, cameras: Sequence[Camera], size: int, dtype: torch.dtype,
                 device: torch.device) -> torch.Tensor:
    """The backgrounds of every view as [V, 3, size*size] in ``dtype`` on ``device``."""
    v, p = len(cameras), size * size
    if callable(background):
        return torch.stack([_one_background(background(c, size), size, dtype, device) for c in cameras])
    bg = torch.as_tensor(background, dtype=dtype, device=device)
    if bg.dim() == 4:
        if tuple(bg.shape) != (v, 3, size, size):
            raise UserError(f"background images must have shape [{v}, 3, {size}, {size}], got {list(bg.shape)}")
        return bg.reshape(v, 3, p)
    return _one_background(bg, size, dtype, device).expand(v, 3, p)


def _one_background(bg: torch.Tensor, size: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    bg = torch.as_tensor(bg, dtype=dtype, device=device)
    if tuple(bg.shape) == (3,):
        return bg[:, None].expand(3, size * size)
    if tuple(bg.shape) == (3, size, size):
        return bg.reshape(3, size * size)
    raise UserError(f"background must be a colour [3] or an image [3, {size}, {size}], got shape {list(bg.shape)}")


def _camera_tensors(cameras: Sequence[Camera], size: int, dtype: torch.dtype, device: torch.device):
    """Stacked camera data: rotations W [V, 3, 3], centres [V, 3], focal lengths [V], and a
    perspective flag [V] (1 perspective, 0 orthographic)."""
    rot = torch.stack([c.rotation(torch.float64) for c in cameras]).to(dtype=dtype, device=device)
    pos = torch.stack([c.position(torch.float64) for c in cameras]).to(dtype=dtype, device=device)
    focal = torch.tensor([c.focal(size) for c in cameras], dtype=dtype, device=device)
    persp = torch.tensor([0.0 if c.orthographic else 1.0 for c in cameras], dtype=dtype, device=device)
    return rot, pos, focal, persp


def project_gaussians(gaussians: Gaussians, cameras: Sequence[Camera], size: int):
    """Steps 1-3 for every view: centres m [V, N, 2] in pixels, conics (the inverse 2D
    covariance's entries a, b, c of [[a, b], [b, c]]) [V, N, 3], depths t_z [V, N]."""
    rot, pos, focal, persp = _camera_tensors(cameras, size, gaussians.means.dtype, gaussians.means.device)
    t = torch.einsum("vij,vnj->vni", rot, gaussians.means[None] - pos[:, None])  # [V, N, 3]
    z = t[..., 2]
    p = persp[:, None]
    zd = p * z.clamp_min(NEAR) + (1.0 - p)  # divide by depth only in perspective
    f = (focal[:, None] / zd)  # [V, N]
    mean2d = f[..., None] * t[..., :2] + size / 2.0  # 1.
    zero = torch.zeros_like(f)
    jac = torch.stack([  # 2. [V, N, 2, 3]
        torch.stack([f, zero, -p * f * t[..., 0] / zd], -1),
        torch.stack([zero, f, -p * f * t[..., 1] / zd], -1),
    ], -2)
    m = jac @ rot[:, None]  # J W [V, N, 2, 3]
    cov2 = m @ gaussians.covariances()[None] @ m.transpose(-1, -2)  # 3. [V, N, 2, 2]
    a, b, c = cov2[..., 0, 0] + DILATION, cov2[..., 0, 1], cov2[..., 1, 1] + DILATION
    det = a * c - b * b
    conic = torch.stack([c / det, -b / det, a / det], -1)
    return mean2d, conic, z


def _splat(gaussians: Gaussians, cameras: Sequence[Camera], size: int, bg: torch.Tensor):
    """Steps 1-5 for a chunk of views: rgb [V, 3, P] in [0, 1] and coverage [V, P].

    Step 4's exponent is a quadratic in the pixel coordinates (x, y), so it is one matrix
    product of pixel features [P, 6] = (x^2, xy, y^2, x, y, 1) with per-Gaussian coefficients
    [V, 6, N] (log-opacity folded into the constant); the dense tensors are laid out
    [V, P, N] so that the front-to-back product runs along the contiguous axis.
    """
    mean2d, conic, z = project_gaussians(gaussians, cameras, size)
    order = z.argsort(dim=1)  # front to back [V, N]
    m = (mean2d - size / 2.0).gather(1, order[..., None].expand(-1, -1, 2))  # centred pixel coordinates
    a, b, c = conic.gather(1, order[..., None].expand(-1, -1, 3)).unbind(-1)
    log_o = torch.nn.functional.logsigmoid(gaussians.opacity_logits)[order]
    log_o = torch.where(z.gather(1, order) > NEAR, log_o, torch.full_like(log_o, -1e4))  # behind the camera
    mx, my = m[..., 0], m[..., 1]
    coeffs = torch.stack([  # -1/2 (a dx^2 + 2 b dx dy + c dy^2) + log o, expanded in x and y [V, N, 6]
        -0.5 * a, -b, -0.5 * c, a * mx + b * my, b * mx + c * my,
        -0.5 * (a * mx * mx + 2.0 * b * mx * my + c * my * my) + log_o], -1)
    pix = torch.arange(size, dtype=z.dtype, device=z.device) + 0.5 - size / 2.0
    y, x = (t.reshape(-1) for t in torch.meshgrid(pix, pix, indexing="ij"))
    feats = torch.stack([x * x, x * y, y * y, x, y, torch.ones_like(x)], -1)  # [P, 6]
    power = (feats @ coeffs.transpose(1, 2)).clamp(min=MIN_POWER)  # [V, P, N]
    alpha = power.exp().clamp(max=MAX_ALPHA)  # 4.
    log_keep = torch.log(1.0 - alpha)
    log_t = log_keep.cumsum(dim=-1)  # log T_{i+1}
    weights = alpha * (log_t - log_keep).exp()  # T_i alpha_i
    rgb = weights @ gaussians.colors[order]  # 5. [V, P, 3]
    t_final = log_t[..., -1].exp()  # [V, P]
    return rgb.transpose(1, 2) + t_final[:, None] * bg, 1.0 - t_final
