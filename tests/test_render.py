"""The Gaussian splatting renderer: closed forms, a naive reference, finite differences.

The independent checks: a single Gaussian under an orthographic camera has the closed form
alpha = o exp(-r^2 / 2 s^2) blended over the background; the 2D covariance is the 3D one pushed
through the autograd Jacobian of ``Camera.project``; a plain per-pixel loop over the depth-sorted
Gaussians (numpy, float64) gives the same image; gradients match finite differences
(``torch.autograd.gradcheck``) in every parameter group.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from torch.func import functional_call

from rewardiff.errors import UserError
from rewardiff.render import Camera, Gaussians, project_gaussians, rasterize, render, render_views
from rewardiff.render import splat
from rewardiff.render.gsplat_backend import available as gsplat_available


def _scene(n: int = 5, seed: int = 0, dtype=torch.float32, rotations: bool = False) -> Gaussians:
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 1.2
    scales = 0.08 + 0.15 * torch.rand(n, 3, generator=g)
    colors = 0.1 + 0.8 * torch.rand(n, 3, generator=g)
    opac = 0.3 + 0.6 * torch.rand(n, generator=g)
    quats = torch.randn(n, 4, generator=g) if rotations else None
    return Gaussians.from_tensors(means.to(dtype), scales.to(dtype), colors.to(dtype), opac.to(dtype),
                                  None if quats is None else quats.to(dtype))


# ----------------------------------------------------------------------------- cameras


def test_camera_frame_and_pinhole_projection():
    cam = Camera(azimuth=0.0, elevation=0.0, distance=4.0, fov=90.0)  # on +x, looking down -x
    # the origin is 4 ahead; +y is to the right of the image, +z up (towards row 0)
    pts = torch.tensor([[0.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])
    cam_pts = cam.world_to_camera(pts)
    assert torch.allclose(cam_pts, torch.tensor([[0.0, 0, 4], [1, 0, 4], [0, -1, 4], [0, 0, 3]]), atol=1e-6)
    uv, depth = cam.project(pts, size=32)
    f = 16.0 / math.tan(math.radians(45.0))  # = 16 px
    assert torch.allclose(uv, torch.tensor([[16.0, 16], [16 + f / 4, 16], [16, 16 - f / 4], [16, 16]]), atol=1e-5)
    assert torch.allclose(depth, torch.tensor([4.0, 4, 4, 3]))
    # an orbit: the camera centre is at distance 4, elevation 30 above the ground, azimuth 90 on +y
    c = Camera(90.0, 30.0).position()
    assert torch.allclose(c, torch.tensor([0.0, 4 * math.cos(math.pi / 6), 2.0]), atol=1e-6)
    assert torch.allclose(Camera(90.0, 30.0).world_to_camera(torch.zeros(1, 3)), torch.tensor([[0.0, 0.0, 4.0]]), atol=1e-6)


def test_orthographic_projection_ignores_depth():
    cam = Camera(0.0, 0.0, fov=None, ortho_scale=2.0)
    uv, _ = cam.project(torch.tensor([[1.0, 1.0, 0.5], [-1.0, 1.0, 0.5]]), size=32)
    assert torch.allclose(uv, torch.tensor([[24.0, 12.0], [24.0, 12.0]]))  # 8 px per unit


def test_bad_cameras_are_user_errors():
    for kwargs in ({"elevation": 90.0}, {"distance": 0.0}, {"fov": 0.0}, {"ortho_scale": -1.0}):
        with pytest.raises(UserError):
            Camera(**{"azimuth": 0.0, "elevation": 10.0, **kwargs})


# ----------------------------------------------------------------------------- closed forms


def test_one_gaussian_matches_the_closed_form():
    # Orthographic, 32 px over half-width 1.6: f = 10 px per unit. An isotropic Gaussian of
    # std s = 0.15 (1.5 px) at the world point that lands on pixel centre (row 15, col 17):
    # camera right is +y, down is -z, so u = 10 y + 16 = 17.5 and v = -10 z + 16 = 15.5.
    size, f, s, o = 32, 10.0, 0.15, 0.8
    color, bg = torch.tensor([0.9, 0.2, 0.1]), torch.tensor([1.0, 1.0, 1.0])
    g = Gaussians.from_tensors(torch.tensor([[0.3, 0.15, 0.05]]), torch.tensor([s]), color[None], torch.tensor([o]))
    img = render(g, Camera(0.0, 0.0, fov=None), size=size, background=bg)
    var = (s * f) ** 2 + 0.3  # the projected variance plus the dilation, px^2
    for dr, dc in ((0, 0), (0, 2), (1, -1), (-3, 2)):
        alpha = o * math.exp(-0.5 * (dr * dr + dc * dc) / var)
        want = 2 * (alpha * color + (1 - alpha) * bg) - 1
        assert torch.allclose(img[:, 15 + dr, 17 + dc], want, atol=1e-5), (dr, dc)


def test_alpha_is_clamped_at_0_99():
    g = Gaussians.from_tensors(torch.zeros(1, 3), torch.tensor([3.0]), torch.zeros(1, 3), torch.tensor([0.9999]))
    _, cover = rasterize(g, [Camera(0.0, 0.0, fov=None)], size=8, background=(1, 1, 1))
    assert cover.max().item() == pytest.approx(0.99, abs=1e-6)


def test_2d_covariance_is_the_jacobian_pushforward():
    g = _scene(4, seed=1, dtype=torch.float64, rotations=True)
    cam = Camera(37.0, 23.0, distance=3.0, fov=50.0)
    _, conic, _ = project_gaussians(g, [cam], 32)
    for i in range(len(g)):
        jac = torch.autograd.functional.jacobian(lambda p: cam.project(p[None], 32)[0][0], g.means[i].detach())
        want = jac @ g.covariances()[i].detach() @ jac.T + 0.3 * torch.eye(2, dtype=torch.float64)
        a, b, c = conic[0, i].detach()
        assert torch.allclose(torch.linalg.inv(want), torch.tensor([[a, b], [b, c]]), rtol=1e-8)


def _reference(g: Gaussians, cam: Camera, size: int, bg: np.ndarray) -> np.ndarray:
    """Front-to-back compositing by plain loops (float64), 2D covariances from autograd's Jacobian."""
    means = g.means.detach().double()
    uv, depth = cam.project(means, size)
    covs, out = [], np.zeros((3, size, size))
    for i in range(len(g)):
        jac = torch.autograd.functional.jacobian(lambda p: cam.project(p[None], size)[0][0], means[i])
        covs.append(np.linalg.inv((jac @ g.covariances()[i].detach().double() @ jac.T).numpy() + 0.3 * np.eye(2)))
    order = np.argsort(depth.numpy())
    for r in range(size):
        for c in range(size):
            x, trans, col = np.array([c + 0.5, r + 0.5]), 1.0, np.zeros(3)
            for i in order:
                d = x - uv[i].numpy()
                a = min(0.99, float(g.opacities[i].detach()) * math.exp(-0.5 * d @ covs[i] @ d))
                col += trans * a * g.colors[i].detach().double().numpy()
                trans *= 1 - a
            out[:, r, c] = col + trans * bg
    return 2 * out - 1


@pytest.mark.parametrize("fov", [40.0, None])
def test_matches_a_naive_per_pixel_loop(fov):
    g = _scene(6, seed=2, rotations=True)
    cam = Camera(200.0, 15.0, distance=3.0, fov=fov, ortho_scale=1.0)
    bg = np.array([0.2, 0.5, 0.9])
    img = render(g, cam, size=12, background=tuple(bg)).detach().double().numpy()
    np.testing.assert_allclose(img, _reference(g, cam, 12, bg), atol=2e-5)


# ----------------------------------------------------------------------------- occlusion, batching, state


def test_occlusion_follows_depth():
    # red at +x, blue at -x: both project onto the image centre from azimuth 0 and 180
    g = Gaussians.from_tensors(torch.tensor([[0.6, 0, 0], [-0.6, 0, 0]]), torch.tensor([0.3, 0.3]),
                               torch.tensor([[0.95, 0.05, 0.05], [0.05, 0.05, 0.95]]), torch.tensor([0.95, 0.95]))
    for azimuth, front in ((0.0, 0), (180.0, 2), (10.0, 0), (170.0, 2)):  # 0: red, 2: blue channel
        img = render(g, Camera(azimuth, 0.0), size=16)
        assert int(img[:, 7:9, 7:9].mean((1, 2)).argmax()) == front, azimuth
    # the depth sort is per view: one batch with both cameras gives both answers
    both = render_views(g, [Camera(0.0, 0.0), Camera(180.0, 0.0)], size=16)
    assert both[0, 0, 8, 8] > both[0, 2, 8, 8] and both[1, 2, 8, 8] > both[1, 0, 8, 8]


def test_batched_views_equal_single_renders(monkeypatch):
    g = _scene(7, seed=3)
    cams = [Camera(a, e, fov=fv) for a, e, fv in ((0, 10, 40.0), (95, 35, 60.0), (250, 20, None))]
    single = torch.stack([render(g, c, 16, background=(0.3, 0.6, 0.1)) for c in cams])
    assert torch.allclose(render_views(g, cams, 16, background=(0.3, 0.6, 0.1)), single, atol=1e-6)
    monkeypatch.setattr(splat, "CHUNK_ELEMENTS", 1)  # one view a chunk
    assert torch.allclose(render_views(g, cams, 16, background=(0.3, 0.6, 0.1)), single, atol=1e-6)


def test_backgrounds_colour_image_and_function():
    g = Gaussians.from_tensors(torch.zeros(1, 3), torch.tensor([0.1]), torch.zeros(1, 3), torch.tensor([1e-4]))
    cam = Camera(0.0, 20.0)
    img = torch.rand(3, 8, 8)
    assert torch.allclose(render(g, cam, 8, background=img), 2 * img - 1, atol=1e-3)
    assert torch.allclose(render(g, cam, 8, background=lambda c, s: img), 2 * img - 1, atol=1e-3)
    assert torch.allclose(render(g, cam, 8, background=(0.0, 0.0, 0.0)), -torch.ones(3, 8, 8), atol=1e-3)
    with pytest.raises(UserError):
        render(g, cam, 8, background=torch.rand(3, 4, 4))
    with pytest.raises(UserError):
        render(g, cam, 8, backend="nope")


def test_behind_the_camera_is_not_drawn():
    g = Gaussians.from_tensors(torch.tensor([[6.0, 0.0, 0.0]]), torch.tensor([0.5]), torch.zeros(1, 3), torch.tensor([0.9]))
    assert torch.allclose(render(g, Camera(0.0, 0.0), 8), torch.ones(3, 8, 8), atol=1e-6)


def test_state_dict_round_trips_through_safetensors(tmp_path):
    from safetensors.torch import load_file, save_file

    for rot in (False, True):
        g = _scene(5, seed=4, rotations=rot)
        save_file(g.state_dict(), tmp_path / "g.safetensors")
        back = Gaussians.from_state_dict(load_file(tmp_path / "g.safetensors"))
        cam = Camera(30.0, 25.0)
        assert set(back.state_dict()) == set(g.state_dict())
        assert torch.equal(render(back, cam, 16), render(g, cam, 16))
    with pytest.raises(UserError):
        Gaussians.from_state_dict({"means": torch.zeros(1, 3)})


def test_from_tensors_and_random():
    g = Gaussians.from_tensors(torch.zeros(2, 3), torch.tensor([0.1, 0.2]), torch.tensor([[0.2, 0.5, 0.7]] * 2),
                               torch.tensor([0.3, 0.6]))
    assert torch.allclose(g.scales, torch.tensor([[0.1] * 3, [0.2] * 3]))
    assert torch.allclose(g.colors, torch.tensor([[0.2, 0.5, 0.7]] * 2), atol=1e-6)
    assert torch.allclose(g.opacities, torch.tensor([0.3, 0.6]), atol=1e-6)
    a = Gaussians.random(200, torch.Generator().manual_seed(5), radius=0.7)
    b = Gaussians.random(200, torch.Generator().manual_seed(5), radius=0.7)
    assert torch.equal(a.means, b.means) and a.means.norm(dim=1).max() <= 0.7 + 1e-6
    assert len(Gaussians.cat([a, g])) == 202
    with pytest.raises(UserError):
        Gaussians.from_tensors(torch.zeros(2, 3), torch.tensor([0.1, -0.1]), torch.zeros(2, 3), torch.ones(2))


# ----------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("fov", [45.0, None])
def test_gradients_match_finite_differences(fov):
    g = _scene(3, seed=6, dtype=torch.float64, rotations=True)
    cams = [Camera(20.0, 25.0, distance=3.0, fov=fov, ortho_scale=1.0), Camera(250.0, 10.0, distance=3.0, fov=fov, ortho_scale=1.0)]
    names = ("means", "log_scales", "color_logits", "opacity_logits", "quats")
    bg = torch.tensor([0.2, 0.4, 0.6], dtype=torch.float64)

    def f(*params):
        return functional_call(g, dict(zip(names, params)), (cams, 8, bg))

    inputs = tuple(getattr(g, k).detach().clone().requires_grad_() for k in names)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)
    # and every group gets a gradient that is not zero
    f(*inputs).pow(2).sum().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in inputs)


# ----------------------------------------------------------------------------- speed, and the gsplat path


def test_render_time_is_printed():
    g = Gaussians.random(300, torch.Generator().manual_seed(0), radius=0.8)
    cams = [Camera(a, 20.0) for a in range(0, 360, 45)]
    for size in (32, 64):
        render_views(g, cams, size)
        t = time.perf_counter()
        with torch.no_grad():
            render_views(g, cams, size)
        fwd = (time.perf_counter() - t) / len(cams)
        t = time.perf_counter()
        render_views(g, cams, size).sum().backward()
        both = (time.perf_counter() - t) / len(cams)
        print(f"render N=300 at {size}x{size}: {fwd * 1e3:.1f} ms a view forward, {both * 1e3:.1f} ms forward+backward")


@pytest.mark.skipif(not gsplat_available(), reason="gsplat and a CUDA device are not both present")
def test_gsplat_backend_agrees_within_tolerance():
    g = _scene(50, seed=7).cuda()
    cams = [Camera(a, 25.0) for a in (0.0, 120.0, 240.0)]
    ours = render_views(g, cams, 32, background=(1.0, 1.0, 1.0))
    theirs = render_views(g, cams, 32, background=(1.0, 1.0, 1.0), backend="gsplat")
    assert (ours - theirs).abs().mean() < 5e-3 and (ours - theirs).abs().max() < 5e-2
