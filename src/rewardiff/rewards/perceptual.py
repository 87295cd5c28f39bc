"""LPIPS and DISTS with their published weights, read from disk (never downloaded).

The backbones are plain torch modules whose state-dict keys are torchvision's
(``features.0.weight``, ...), so the files torchvision saves load as they are:

- VGG16 ``features``: 13 3x3 convolutions with ReLU, max pooling after the 2nd, 4th, 7th, 10th
  and 13th (indices as torchvision's: conv 0, relu 1, conv 2, relu 3, pool 4, ...).
- AlexNet ``features``: conv 11x11 stride 4, pool, conv 5x5, pool, three 3x3 convolutions, pool.

LPIPS (Zhang et al. 2018, v0.1) reads relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of VGG16
(indices 3, 8, 15, 22, 29) or relu1..relu5 of AlexNet (1, 4, 7, 9, 11), on images scaled by
the ImageNet mean and standard deviation (its "scaling layer": shift 2 mean - 1 and scale
2 std of [-1, 1] pixels, the same map), with the linear heads of the ``lpips`` package.

DISTS (Ding et al. 2020) reads the same five VGG16 stages with every max pooling replaced by L2
pooling (sqrt of a 3x3 Hanning-weighted mean of the squared features, weights
[1/4, 1/2, 1/4] in each direction, stride 2, padding 1), plus the input image itself in [0, 1]
as stage 0: 3 + 64 + 128 + 256 + 512 + 512 = 1475 channels, weighted by the ``alpha`` and
``beta`` of its file.

Files (``path``, else ``$REWARDIFF_LPIPS_PATH`` / ``$REWARDIFF_DISTS_PATH``, else
``~/.cache/rewardiff/lpips`` / ``dists``):

- ``lpips``: ``vgg16-397923af.pth`` or ``alexnet-owt-7be5be79.pth`` (torchvision's) and
  ``vgg.pth`` or ``alex.pth`` (the ``lpips`` package's ``weights/v0.1/``: ``lin{k}.model.1.weight``).
- ``dists``: ``vgg16-397923af.pth`` and ``weights.pt`` (DISTS_pytorch's: ``alpha``, ``beta``
  of shape [1, 1475, 1, 1]).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.features import FeatureDistance, check_against, lazy_metric, reference_reward, split_weights
from rewardiff.rewards.vision import _freeze, _need, default_path

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
VGG16_TAPS = (3, 8, 15, 22, 29)  # relu1_2 ... relu5_3
VGG16_CHANNELS = (64, 128, 256, 512, 512)
ALEX_TAPS = (1, 4, 7, 9, 11)  # relu1 ... relu5
ALEX_CHANNELS = (64, 192, 384, 256, 256)
BACKBONE_FILES = {"vgg": "vgg16-397923af.pth", "alex": "alexnet-owt-7be5be79.pth"}
LPIPS_HEADS = {"vgg": "vgg.pth", "alex": "alex.pth"}
DISTS_FILE = "weights.pt"
MIN_SIZE = 32  # the smallest side both backbones take (AlexNet's third pooling needs it)


class L2Pool(nn.Module):
    """L2 pooling: sqrt(g * x^2) with g the normalised 3x3 Hanning window, stride 2. [B, C, H, W] -> [B, C, H/2, W/2]"""

    def __init__(self, channels: int):
        super().__init__()
        a = torch.tensor([0.5, 1.0, 0.5])
        g = a[:, None] * a[None, :]
        self.register_buffer("window", (g / g.sum()).expand(channels, 1, 3, 3).clone(), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x.pow(2), self.window, stride=2, padding=1, groups=x.shape[1])
        return (out + 1e-12).sqrt()


def vgg16_features(pool: str = "max") -> nn.Sequential:
    """torchvision's ``vgg16().features`` layout; ``pool="l2"`` puts DISTS's L2 pooling in place of max pooling."""
    layers: list[nn.Module] = []
    c = 3
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2, 2) if pool == "max" else L2Pool(c))
        else:
            layers += [nn.Conv2d(c, int(v), 3, padding=1), nn.ReLU()]
            c = int(v)
    return nn.Sequential(*layers)


def alexnet_features() -> nn.Sequential:
    """torchvision's ``alexnet().features`` layout."""
    return nn.Sequential(
        nn.Conv2d(3, 64, 11, stride=4, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
        nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
        nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
        nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
    )


class TappedBackbone(nn.Module):
    """A ``features`` stack read at ``taps``: x [B, 3, H, W] in [-1, 1] -> the maps after those layers.

    Args:
        features: the stack (its state-dict keys are ``features.N.*``, as torchvision's).
        taps: indices of the layers whose outputs are returned.
        with_input: put the image itself, in [0, 1], first (DISTS's stage 0).
    """

    def __init__(self, features: nn.Sequential, taps: tuple[int, ...], with_input: bool = False):
        super().__init__()
        self.features, self.taps, self.with_input = features, tuple(taps), with_input
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        unit = (x + 1) / 2
        h = (unit - self.mean) / self.std  # ImageNet normalisation (LPIPS's scaling layer)
        outs = [unit] if self.with_input else []
        for i, layer in enumerate(self.features[: self.taps[-1] + 1]):
            h = layer(h)
            if i in self.taps:
                outs.append(h)
        return outs


def _load(file: Path) -> dict[str, Tensor]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise UserError(f"cannot read {file}: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict):
        raise UserError(f"{file} holds a {type(state).__name__}, not a state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_backbone(file: Path, net: str, pool: str = "max", with_input: bool = False) -> TappedBackbone:
    """The VGG16 (``net="vgg"``) or AlexNet (``"alex"``) features of a torchvision state dict file (its classifier ignored)."""
    features = vgg16_features(pool) if net == "vgg" else alexnet_features()
    state = {k.removeprefix("features."): v for k, v in _load(file).items() if k.startswith("features.")}
    try:
        features.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()[1:2] or [str(e)]
        raise UserError(f"{file} is not torchvision's {net} state dict: {first[0].strip()}") from None
    taps = VGG16_TAPS if net == "vgg" else ALEX_TAPS
    return _freeze(TappedBackbone(features, taps, with_input))  # type: ignore[return-value]


def load_lpips_heads(file: Path, channels: tuple[int, ...]) -> list[Tensor]:
    """The ``lpips`` package's linear heads: ``lin{k}.model.{j}.weight`` [1, C_k, 1, 1] -> one [C_k] per layer."""
    state = _load(file)
    heads = []
    for k, c in enumerate(channels):
        keys = [key for key in state if key.startswith(f"lin{k}.model.") and key.endswith(".weight")]
        if len(keys) != 1 or state[keys[0]].numel() != c:
            raise UserError(f"{file} is not an LPIPS linear-head file for these layers: expected lin{k}.model.1.weight with {c} weights")
        heads.append(state[keys[0]].reshape(c).float())
    return heads


def load_dists_weights(file: Path, channels: tuple[int, ...]) -> tuple[list[Tensor], list[Tensor]]:
    """DISTS's ``alpha`` and ``beta`` [1, 1475, 1, 1], split per stage."""
    state = _load(file)
    if "alpha" not in state or "beta" not in state:
        raise UserError(f"{file} is not DISTS's weight file: it needs 'alpha' and 'beta' (has {sorted(state)[:4]})")
    return split_weights(state["alpha"].float(), channels), split_weights(state["beta"].float(), channels)


def _file(folder: Path, name: str, glob: str) -> Path | None:
    """``folder/name``, else the one file matching ``glob`` there."""
    if (folder / name).is_file():
        return folder / name
    found = sorted(folder.glob(glob)) if folder.is_dir() else []
    return found[0] if len(found) == 1 else None


def _backbone_file(folder: Path, net: str, model: str, reward: str) -> Path:
    name = BACKBONE_FILES[net]
    file = _file(folder, name, "vgg16-*.pth" if net == "vgg" else "alexnet-*.pth")
    _need(model, file is not None, f"torchvision's {net} weights {folder / name}", "download.pytorch.org/models/" + name, reward)
    return file  # type: ignore[return-value]


def _check_net(net: str) -> str:
    if net not in BACKBONE_FILES:
        raise UserError(f"lpips net must be 'vgg' or 'alex', got {net!r}")
    return net


def lpips_metric(folder: Path, net: str = "vgg") -> FeatureDistance:
    """LPIPS v0.1 from the files in ``folder`` (see the module docstring). (x, y) -> [B]"""
    backbone = load_backbone(_backbone_file(folder, net, "LPIPS", "lpips"), net)
    heads = load_lpips_heads(folder / LPIPS_HEADS[net], VGG16_CHANNELS if net == "vgg" else ALEX_CHANNELS)
    return FeatureDistance(backbone, "lpips", weights=heads, min_size=MIN_SIZE)


def dists_metric(folder: Path) -> FeatureDistance:
    """DISTS from the files in ``folder`` (see the module docstring). (x, y) -> [B]"""
    backbone = load_backbone(_backbone_file(folder, "vgg", "DISTS", "dists"), "vgg", pool="l2", with_input=True)
    alpha, beta = load_dists_weights(folder / DISTS_FILE, (3, *VGG16_CHANNELS))
    return FeatureDistance(backbone, "dists", alpha=alpha, beta=beta, min_size=MIN_SIZE)


def lpips(net: str = "vgg", path: str | Path | None = None, against: str = "gt") -> RewardFn:
    """Minus LPIPS v0.1 (VGG16 or AlexNet, torchvision weights + the lpips package's heads), against gt or lr."""
    _check_net(net)
    check_against(against)
    folder = Path(path).expanduser() if path is not None else default_path("lpips")
    _backbone_file(folder, net, "LPIPS", "lpips")
    head = folder / LPIPS_HEADS[net]
    _need("LPIPS", head.is_file(), f"the lpips package's linear heads {head}",
          "github.com/richzhang/PerceptualSimilarity (lpips/weights/v0.1)", "lpips")
    return reference_reward("lpips", lazy_metric(lambda: lpips_metric(folder, net)), against, -1.0, None,
                            f"minus LPIPS ({net}) against the {'ground truth' if against == 'gt' else 'low-resolution input'}")


def dists(path: str | Path | None = None, against: str = "gt") -> RewardFn:
    """Minus DISTS (VGG16 with L2 pooling, torchvision weights + DISTS's alpha/beta), against gt or lr."""
    check_against(against)
    folder = Path(path).expanduser() if path is not None else default_path("dists")
    _backbone_file(folder, "vgg", "DISTS", "dists")
    _need("DISTS", (folder / DISTS_FILE).is_file(), f"DISTS's alpha/beta file {folder / DISTS_FILE}",
          "github.com/dingkeyan93/DISTS (DISTS_pytorch/weights.pt)", "dists")
    return reference_reward("dists", lazy_metric(lambda: dists_metric(folder)), against, -1.0, None,
                            f"minus DISTS against the {'ground truth' if against == 'gt' else 'low-resolution input'}")
