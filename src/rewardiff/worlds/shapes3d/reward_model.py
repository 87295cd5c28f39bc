"""The 3D shapes world's learned text-alignment reward: a small CNN counting objects of each colour.

VP3D's text-alignment term is a differentiable human-feedback reward of renders and the text;
in this world it is ``shapes3d-count``: sum over the four colours of log(0.02 + 0.98 p), p the
probability of the number of objects of that colour the prompt asks for, read by a CNN from
one render: bounded below by log 0.02 a colour, smoothly, so that a missing colour still pulls. The judge the benchmarks read
(:mod:`rewardiff.worlds.shapes3d.judge`) is classical and never trained: the reward can be
hacked, the judge shows it.

Network: the shapes reward model's backbone (3x3 convolutions with replicate padding, batch
norm, SiLU, at 32, 16 and 8 px), then a non-negative density map with one channel per colour,
summed into a real count n_c per colour, turned into probabilities of 0, 1, 2 and "3 or more"
by an ordinal model with a learned sharpness (P(count >= k) = sigmoid(s (n - k + 1/2))).

Training data (:func:`training_images`): renders of the world's training prompts from random
cameras, labelled by their scenes (true colour counts, also where one object hides another);
blobs of random Gaussians over the ground, the start of every distillation, labelled by the
judge's reading; and the empty ground.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.optim import warmup_cosine
from rewardiff.rewards.base import RewardFn
from rewardiff.worlds import WEIGHTS
from rewardiff.worlds.shapes.reward_model import backbone, load_saved, ordinal_counts, save_reward_model

WEIGHTS_DIR = WEIGHTS / "shapes3d-rm"
LOG_FLOOR = math.log(0.02)
N_CLASSES = 4  # 0, 1, 2, 3 or more objects of a colour
N_COLORS = 4
SIZE = 32


class Shapes3DRM(nn.Module):
    """CNN: renders [B, 3, 32, 32] in [-1, 1] -> log-probabilities [B, 4 colours, 4 counts]."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64)):
        super().__init__()
        self.widths = tuple(widths)
        self.features = backbone(self.widths)
        self.density = nn.Conv2d(self.widths[2], N_COLORS, 1)
        nn.init.constant_(self.density.bias, -5.0)
        self.log_sharpness = nn.Parameter(torch.tensor(0.5))

    def counts(self, x: Tensor) -> Tensor:
        """The real-valued count of each colour [B, 4]."""
        return F.softplus(self.density(self.features(x))).sum(dim=(2, 3))

    def forward(self, x: Tensor) -> Tensor:
        # P(0) = P(< 1); P(k) = P(>= k) - P(>= k + 1) for k = 1, 2; P(3+) = P(>= 3)
        return ordinal_counts(self.counts(x), self.log_sharpness.exp() * 4.0, N_CLASSES - 1)


# ----------------------------------------------------------------------------- data


def training_images(n: int, seed: int, blob_share: float = 0.2, empty_share: float = 0.05) -> tuple[Tensor, Tensor]:
    """``n`` labelled renders: (images [n, 3, 32, 32] in [-1, 1], colour counts [n, 4] clipped at 3)."""
    from rewardiff.render import Gaussians, render_views
    from rewardiff.worlds.shapes3d import data, judge

    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    images, labels = [], []
    train = data.train_prompts()
    for _ in range(n):
        u = rng.random()
        cam = data.random_camera(rng)
        if u < empty_share:
            img = data.ground(cam, SIZE)[None] * 2 - 1
            label = [0] * N_COLORS
        elif u < empty_share + blob_share:
            k = int(rng.integers(8, 200))
            blob = Gaussians.random(k, g, radius=float(rng.uniform(0.2, 1.0)))
            with torch.no_grad():
                blob.means[:, 2] += float(rng.uniform(0.0, 0.6))
                pal = torch.as_tensor(data.COLOR_RGB)[torch.randint(0, N_COLORS, (k,), generator=g)]
                mix = torch.rand(k, 1, generator=g)
                colors = (mix * pal + (1 - mix) * torch.rand(k, 3, generator=g)).clamp(0.02, 0.98)
                blob.color_logits.copy_(torch.log(colors / (1 - colors)))
                img = render_views(blob, [cam], SIZE, background=data.ground).clamp(-1, 1)
            label = list(judge.read(img[0]).per_color)
        else:
            scene = data.random_scene(train[int(rng.integers(len(train)))], rng)
            img = data.render_scene(scene, [cam], SIZE)
            label = list(judge.expected(data.prompt_of(scene)).per_color)
        images.append(img)
        labels.append([min(int(c), N_CLASSES - 1) for c in label])
    return torch.cat(images), torch.tensor(labels)


def train_reward_model(out: str | Path, steps: int = 1500, seed: int = 0, n_train: int = 4000, n_val: int = 600,
                       batch_size: int = 64, lr: float = 2e-3, progress: bool = True) -> dict:
    """Train the reward model on freshly rendered data; save it with its card to ``out``."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    x, y = training_images(n_train, seed)
    xv, yv = training_images(n_val, seed + 10_000)
    net = Shapes3DRM()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in tqdm(range(steps), disable=not progress, desc="train shapes3d-rm"):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb = x[idx]
        flip = torch.rand(batch_size, generator=g) < 0.5
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        logp = net(xb)
        loss = -logp.gather(-1, y[idx][..., None]).mean()
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, 100, lr=lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = torch.cat([net(xv[i : i + 200]).argmax(-1) for i in range(0, len(xv), 200)])
    card = {"model": "shapes3d-rm", "steps": steps, "seed": seed, "train_images": n_train,
            "val_all_colours_right": float((pred == yv).all(-1).float().mean()),
            "val_per_colour_right": float((pred == yv).float().mean())}
    save_reward_model(net, out, card)  # the shapes reward model's format: weights, widths in the metadata, card
    return card


def load(path: str | Path | None = None) -> Shapes3DRM:
    d = Path(path) if path is not None else WEIGHTS_DIR
    file = d / "model.safetensors" if d.suffix != ".safetensors" else d
    return load_saved(Shapes3DRM, file, f"shapes3d reward model weights not found: {file}; train them with: rewardiff train-reward shapes3d")


# ----------------------------------------------------------------------------- the reward


def asked_counts(prompts: list[str]) -> Tensor:
    """The colour counts [B, 4] each prompt asks for (clipped at 3; a camera reference is ignored)."""
    from rewardiff.worlds.shapes3d import data, judge
    from rewardiff.worlds.shapes3d.prior import split_view

    out = []
    for p in prompts:
        text = split_view(p)[0]
        if not data.is_prompt(text):
            raise UserError(f"shapes3d-count needs prompts of the 3D shapes world, got {p!r}")
        out.append([min(int(c), N_CLASSES - 1) for c in judge.expected(text).per_color])
    return torch.tensor(out)


def count_reward(net: Shapes3DRM, x: Tensor, prompts: list[str]) -> Tensor:
    """Sum over colours of log(0.02 + 0.98 p(asked count)). x [B, 3, H, W] -> [B]

    A smooth floor: 0 when every colour count is certainly right, 4 log 0.02 when all are
    certainly wrong, and a gradient everywhere (a hard clamp would give a colour that is
    missing altogether, the case a distillation most needs to fix, no gradient at all)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"shapes3d-count takes RGB images [B, 3, H, W]; got shape {tuple(x.shape)}")
    x = x.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    net = net.to(x.device)
    want = asked_counts(prompts).to(x.device)
    logp = net(x).gather(-1, want[..., None])[..., 0]
    floor = torch.tensor(LOG_FLOOR, device=x.device, dtype=logp.dtype)
    return torch.logaddexp(floor, logp + math.log1p(-math.exp(LOG_FLOOR))).sum(-1)


def shapes3d_count(path: str | Path | None = None) -> RewardFn:
    """3D shapes world: the sum over colours of log(0.02 + 0.98 p(asked count of that colour)), from the learned CNN."""
    d = Path(path) if path is not None else WEIGHTS_DIR
    if not ((d / "model.safetensors").is_file() or d.is_file()):
        raise UserError(f"shapes3d reward model weights not found in {d}; train them with: rewardiff train-reward shapes3d")
    return RewardFn("shapes3d-count", True, (N_COLORS * LOG_FLOOR, 0.0),
                    "3D shapes world: sum over colours of log(0.02 + 0.98 p(asked count)) from the learned CNN",
                    lambda x, prompts: count_reward(load(path), x, prompts))


def train_command(out_dir: str | Path, steps: int, seed: int, n_samples: int, **options) -> dict:
    """``rewardiff train-reward shapes3d``: train the reward model to ``out_dir`` (``n_samples`` unused:
    this world's data are renders, no base-model samples)."""
    return train_reward_model(out_dir, steps=steps, seed=seed, **options)
