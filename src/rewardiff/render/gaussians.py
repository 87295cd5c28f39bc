"""A set of 3D Gaussians: the differentiable scene that score distillation optimizes.

Every parameter lives in an unconstrained space so that plain gradient descent keeps it
valid: scales are stored as logs, colours and opacities as logits (colour = sigmoid, in
[0, 1]; opacity = sigmoid, in (0, 1)). Gaussians are axis-aligned in world space unless the
set carries rotations (``quats``, unit quaternions w, x, y, z after normalisation), as 3D
Gaussian splatting (Kerbl et al. 2023) parameterises them.
"""

from __future__ import annotations

import torch
from torch import nn

from rewardiff.errors import UserError

_EPS = 1e-4  # colours and opacities are clamped into [eps, 1 - eps] before taking logits


def _logit(p: torch.Tensor) -> torch.Tensor:
    return torch.logit(p.clamp(_EPS, 1.0 - _EPS))


class Gaussians(nn.Module):
    """N 3D Gaussians with colour and opacity.

    Parameters (all ``nn.Parameter``, so ``state_dict`` holds exactly these tensors):
        means [N, 3]: centres in world coordinates.
        log_scales [N, 3]: log standard deviations along the world axes (or the rotated axes).
        color_logits [N, 3]: RGB logits; colour = sigmoid.
        opacity_logits [N]: opacity = sigmoid.
        quats [N, 4] (only when built with rotations): unnormalised quaternions (w, x, y, z).
    """

    def __init__(self, means: torch.Tensor, log_scales: torch.Tensor, color_logits: torch.Tensor,
                 opacity_logits: torch.Tensor, quats: torch.Tensor | None = None):
        super().__init__()
        n = means.shape[0]
        shapes = {"means": (means, (n, 3)), "log_scales": (log_scales, (n, 3)),
                  "color_logits": (color_logits, (n, 3)), "opacity_logits": (opacity_logits, (n,))}
        if quats is not None:
            shapes["quats"] = (quats, (n, 4))
        for name, (t, shape) in shapes.items():
            if tuple(t.shape) != shape:
                raise UserError(f"Gaussians {name} must have shape {list(shape)}, got {list(t.shape)}")
        self.means = nn.Parameter(means.detach().clone())
        self.log_scales = nn.Parameter(log_scales.detach().clone())
        self.color_logits = nn.Parameter(color_logits.detach().clone())
        self.opacity_logits = nn.Parameter(opacity_logits.detach().clone())
        self.quats = nn.Parameter(quats.detach().clone()) if quats is not None else None

    # ------------------------------------------------------------------ constructors

    @classmethod
    def random(cls, n: int, generator: torch.Generator | None = None, radius: float = 0.5,
               scale: float | None = None, opacity: float = 0.5, rotations: bool = False) -> "Gaussians":
        """A blob of ``n`` Gaussians, uniform in the ball of ``radius`` around the origin (the
        usual start of score distillation).

        Args:
            n: number of Gaussians.
            generator: the random source (a seeded ``torch.Generator`` makes it reproducible).
            radius: the ball's radius.
            scale: every Gaussian's standard deviation; by default about the mean spacing of
                ``n`` points in the ball (radius / n^(1/3)), so the blob starts closed.
            opacity: every Gaussian's starting opacity.
            rotations: give the set rotations (identity quaternions) as parameters.
        """
        if n < 1:
            raise UserError(f"Gaussians.random needs n >= 1, got {n}")
        d = torch.randn(n, 3, generator=generator)
        r = radius * torch.rand(n, 1, generator=generator) ** (1.0 / 3.0)
        means = d / d.norm(dim=1, keepdim=True).clamp_min(1e-8) * r
        s = scale if scale is not None else radius / n ** (1.0 / 3.0)
        colors = 0.5 + 0.1 * torch.randn(n, 3, generator=generator)
        quats = torch.tensor([1.0, 0.0, 0.0, 0.0]).expand(n, 4) if rotations else None
        return cls.from_tensors(means, torch.full((n, 3), float(s)), colors, torch.full((n,), float(opacity)), quats)

    @classmethod
    def from_tensors(cls, means: torch.Tensor, scales: torch.Tensor, colors: torch.Tensor,
                     opacities: torch.Tensor, quats: torch.Tensor | None = None) -> "Gaussians":
        """Gaussians from values in their natural ranges.

        Args:
            means: [N, 3].
            scales: standard deviations, [N, 3], or [N] / [N, 1] for isotropic Gaussians; > 0.
            colors: RGB in [0, 1], [N, 3].
            opacities: in (0, 1], [N].
            quats: optional rotations (w, x, y, z) [N, 4].
        """
        scales = torch.as_tensor(scales, dtype=means.dtype)
        if scales.dim() == 1 or scales.shape[-1] == 1:
            scales = scales.reshape(-1, 1).expand(-1, 3)
        if (scales <= 0).any():
            raise UserError("Gaussians scales must all be positive")
        return cls(means, scales.log(), _logit(torch.as_tensor(colors, dtype=means.dtype)),
                   _logit(torch.as_tensor(opacities, dtype=means.dtype)), quats)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "Gaussians":
        """The set a ``state_dict`` (or a safetensors file's tensors) was taken from."""
        missing = {"means", "log_scales", "color_logits", "opacity_logits"} - set(state)
        if missing:
            raise UserError(f"not a Gaussians state: missing {', '.join(sorted(missing))}")
        return cls(state["means"], state["log_scales"], state["color_logits"], state["opacity_logits"], state.get("quats"))

    @classmethod
    def cat(cls, sets: list["Gaussians"]) -> "Gaussians":
        """One set holding every Gaussian of ``sets`` (new parameters; rotations kept only when
        some set has them, identity for the others)."""
        if not sets:
            raise UserError("Gaussians.cat needs at least one set")
        rot = any(g.quats is not None for g in sets)
        quats = torch.cat([g.quats.detach() if g.quats is not None else
                           g.means.new_tensor([1.0, 0, 0, 0]).expand(len(g), 4) for g in sets]) if rot else None
        return cls(*(torch.cat([getattr(g, k).detach() for g in sets]) for k in
                     ("means", "log_scales", "color_logits", "opacity_logits")), quats)

    def forward(self, cameras: list, size: int = 32, background=(1.0, 1.0, 1.0)) -> torch.Tensor:
        """:func:`rewardiff.render.render_views` of this set (so ``torch.func.functional_call``
        renders with substituted parameters)."""
        from rewardiff.render.splat import render_views

        return render_views(self, cameras, size, background)

    # ------------------------------------------------------------------ values

    def __len__(self) -> int:
        return self.means.shape[0]

    @property
    def scales(self) -> torch.Tensor:
        """Standard deviations [N, 3]."""
        return self.log_scales.exp()

    @property
    def colors(self) -> torch.Tensor:
        """RGB in [0, 1] [N, 3]."""
        return torch.sigmoid(self.color_logits)

    @property
    def opacities(self) -> torch.Tensor:
        """Opacities in (0, 1) [N]."""
        return torch.sigmoid(self.opacity_logits)

    def rotations(self) -> torch.Tensor | None:
        """Rotation matrices [N, 3, 3] of the normalised quaternions, or None (axis-aligned)."""
        if self.quats is None:
            return None
        w, x, y, z = (self.quats / self.quats.norm(dim=-1, keepdim=True)).unbind(-1)
        return torch.stack([
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ], -1).reshape(-1, 3, 3)

    def covariances(self) -> torch.Tensor:
        """World-space covariances Sigma = R S S^T R^T [N, 3, 3] (R = I when axis-aligned)."""
        var = (2.0 * self.log_scales).exp()
        rot = self.rotations()
        if rot is None:
            return torch.diag_embed(var)
        return rot @ torch.diag_embed(var) @ rot.transpose(-1, -2)
