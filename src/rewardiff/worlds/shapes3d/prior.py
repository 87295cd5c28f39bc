"""The 3D shapes world's view-conditioned prior: the shapes denoiser with the camera as conditioning.

As Zero-1-to-3 and MVDream condition a 2D diffusion model on the camera pose, the shapes
world's pixel denoiser (:class:`~rewardiff.worlds.shapes.denoiser.ShapesDenoiser`, a small
diffusers UNet with cross-attention on a tiny text encoder) reads one more token: an embedding
of the camera (sin and cos of azimuth and elevation, and a flag saying a camera was given).
Prompts carry the camera as ``"TEXT | view:AZ,EL"`` (degrees, :mod:`rewardiff.conditions`'s
``TEXT | REF`` form), so every rewardiff method samples it unchanged; a prompt without a view
samples any view (training drops the camera 10 % of the time). Classifier-free guidance's
unconditional prompt keeps the camera and drops the text (``" | view:AZ,EL"``), as MVDream's does.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from rewardiff import conditions
from rewardiff.errors import UserError
from rewardiff.worlds import WEIGHTS
from rewardiff.worlds.shapes.denoiser import ShapesDenoiser, ShapesModelConfig

NAME = "shapes-3d"
VIEW = "view"  # the scheme of a prompt's camera
CAMERA_FEATURES = 5  # sin az, cos az, sin el, cos el, given


def split_view(prompt: str) -> tuple[str, tuple[float, float] | None]:
    """``"two red spheres | view:30,15"`` -> ``("two red spheres", (30.0, 15.0))``; no view -> None.

    Raises:
        UserError: a reference that is not ``view:AZ,EL`` with two numbers.
    """
    text, ref = conditions.split(prompt)
    if ref is None:
        return prompt, None
    scheme, _, key = ref.partition(":")
    parts = key.split(",")
    try:
        if scheme != VIEW or len(parts) != 2:
            raise ValueError
        az, el = float(parts[0]), float(parts[1])
        if not (math.isfinite(az) and -90.0 < el < 90.0):
            raise ValueError
    except ValueError:
        raise UserError(f"prompt {prompt!r}: the shapes-3d model reads a camera as 'TEXT | view:AZ,EL' "
                        "(degrees, elevation within (-90, 90))") from None
    return text.strip(), (az, el)


def camera_features(views: list[tuple[float, float] | None]) -> Tensor:
    """[B, 5] features of cameras: (sin az, cos az, sin el, cos el, 1), zeros where none is given."""
    out = torch.zeros(len(views), CAMERA_FEATURES)
    for i, v in enumerate(views):
        if v is not None:
            az, el = math.radians(v[0]), math.radians(v[1])
            out[i] = torch.tensor([math.sin(az), math.cos(az), math.sin(el), math.cos(el), 1.0])
    return out


def with_view(text: str, azimuth: float, elevation: float) -> str:
    """The prompt of ``text`` seen from (azimuth, elevation)."""
    return f"{text}{conditions.SEP}{VIEW}:{azimuth:.1f},{elevation:.1f}"


class ViewDenoiser(ShapesDenoiser):
    """``forward(x_t [B,3,32,32], t [B], cond [B, L+1, D])``: the shapes denoiser whose condition
    is the prompt's token states followed by one camera token."""

    def __init__(self, config: ShapesModelConfig | None = None):
        config = config or ShapesModelConfig(prompts="shapes3d")
        if config.prompts != "shapes3d":
            raise UserError(f"the shapes-3d model reads the shapes3d grammar, not {config.prompts!r}")
        super().__init__(config)
        d = config.cross_attention_dim
        self.camera = nn.Sequential(nn.Linear(CAMERA_FEATURES, d), nn.SiLU(), nn.Linear(d, d))

    def encode(self, prompts: list[str]) -> Tensor:
        """Prompts ("TEXT | view:AZ,EL", or TEXT alone) -> token states with the camera token last."""
        device = next(self.parameters()).device
        parts = [split_view(p) for p in prompts]
        h = self.text(self.tokenize([t for t, _ in parts]).to(device))
        cam = self.camera(camera_features([v for _, v in parts]).to(device))
        return torch.cat([h, cam[:, None]], dim=1)

    def check_prompts(self, prompts: list[str]) -> None:
        """A UserError naming the first prompt or word it cannot read."""
        texts = [split_view(p)[0] for p in prompts]
        super().check_prompts(texts)


def unconditional(prompts: list[str]) -> list[str]:
    """Guidance's other branch: each prompt's camera without its text."""
    return [conditions.unconditional(p) for p in prompts]


def shapes3d_model(directory: str | Path | None = None):
    """The 3D shapes world's view-conditioned prior (shipped weights unless ``directory``)."""
    from rewardiff.models.base import DiffusionModel
    from rewardiff.worlds.shapes3d import data

    d = Path(directory) if directory else WEIGHTS / NAME
    if not (d / "model.safetensors").is_file():
        raise UserError(f"no shapes-3d model weights in {d}; train them with: rewardiff pretrain shapes-3d")
    net = ViewDenoiser.load(d)
    net.eval()
    model = DiffusionModel(net, net.process(), net.encode, (3, data.SIZE, data.SIZE), name=NAME, world="shapes3d",
                           check_prompts=net.check_prompts, unconditional=unconditional)
    model.view_conditioned = True  # type: ignore[attr-defined]  # distill writes "TEXT | view:AZ,EL"
    model.render_background = data.ground  # type: ignore[attr-defined]  # the world's ground and sky behind renders
    return model


def is_shapes3d_dir(directory: str | Path) -> bool:
    """Whether ``directory`` holds a shapes-3d model (its config reads the shapes3d grammar)."""
    import json

    cfg = Path(directory) / "config.json"
    try:
        return json.loads(cfg.read_text()).get("prompts") == "shapes3d"
    except (OSError, ValueError, AttributeError):
        return False
