"""The super-resolution world: 32x32 shapes scenes and their blurred, noisy 8x8 inputs.

A scene holds 2 to 5 objects of any kind and colour (the shapes world's drawing), some of them
small (radius 1.8-2.5 px) and some drawn as near-touching pairs (1-2 px apart). Its
low-resolution input is the scene blurred (Gaussian, sigma :data:`BLUR_SIGMA` px), averaged
over 4x4 blocks (8x8) and given a little Gaussian noise: at that size a small shape's kind is
lost, a near pair reads as one blob and two colours side by side mix, so a generative model
that super-resolves it must invent detail, and can invent the wrong one (an object added,
dropped, merged, split or recoloured).

Everything is deterministic by key: ``train/123`` and ``held-out/17`` name one scene each, the
held-out scenes (:data:`HELD_OUT_SIZE` of them) drawn from a seed stream the training keys
never reach. Prompts reference them as ``shapes-sr:KEY`` (:mod:`rewardiff.conditions`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.worlds.shapes import data as shapes

SCHEME = "shapes-sr"
SIZE = shapes.SIZE  # high resolution (32)
FACTOR = 4  # downsampling factor: inputs are 8x8
LOW = SIZE // FACTOR
BLUR_SIGMA = 1.0  # Gaussian blur before downsampling, in high-resolution pixels
NOISE = 0.03  # std of the inputs' Gaussian noise, in [-1, 1] units
OBJECTS = (2, 5)  # objects a scene, both ends included
SMALL = (1.8, 2.5)  # radius of a small object
NORMAL = (3.2, 5.0)  # radius of any other (the shapes world's)
P_SMALL = 0.3  # chance that an object is small
P_PAIR = 0.4  # chance that an object is placed 1-2 px from the previous one
JITTER = 12.0  # colour jitter a channel (of 255)
TRAIN = "train"
HELD = "held-out"
HELD_OUT_SIZE = 256  # held-out scenes: held-out/0 .. held-out/255
TRAIN_KEYS = 1_000_000  # training scenes: train/0 .. train/999999
TRAIN_PROMPTS = 4096  # the sr-train prompt set: train/0 .. train/4095
_HELD_SEED = 1 << 40  # held-out seeds start here, beyond every training seed


class Obj(NamedTuple):
    """One drawn object: ``shape`` and ``color`` index ``shapes.SHAPES`` / ``shapes.COLORS``; centre (cy, cx) and radius in px."""

    shape: int
    color: int
    cy: float
    cx: float
    r: float


class Scene(NamedTuple):
    """A high-resolution image uint8 [32, 32, 3], the objects drawn and each one's mask [32, 32]."""

    image: np.ndarray
    objects: list[Obj]
    masks: list[np.ndarray]


def parse_key(key: str) -> tuple[str, int]:
    """``"held-out/17"`` -> ("held-out", 17); UserError for a key of no split or out of range."""
    split, sep, index = key.strip().partition("/")
    if not sep or split not in (TRAIN, HELD) or not index.isdigit():
        raise UserError(f"shapes-sr key {key!r} must look like train/N or held-out/N")
    i, limit = int(index), (TRAIN_KEYS if split == TRAIN else HELD_OUT_SIZE)
    if i >= limit:
        raise UserError(f"shapes-sr key {key!r}: {split} keys run from 0 to {limit - 1}")
    return split, i


def seed_of(key: str) -> int:
    """The seed that draws ``key``'s scene and noise (held-out and training seeds never meet)."""
    split, i = parse_key(key)
    return i if split == TRAIN else _HELD_SEED + i


def paint(objects: list[Obj], rng: np.random.Generator | None = None) -> Scene:
    """The scene of ``objects`` drawn in order on black (later ones over earlier ones), each in
    its colour jittered by ``rng`` (no jitter without one)."""
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    masks = []
    for o in objects:
        mask = shapes._shape_mask(o.shape, o.cy, o.cx, o.r)
        jitter = rng.uniform(-JITTER, JITTER, 3) if rng is not None else 0.0
        img[mask] = np.clip(shapes.COLOR_RGB[o.color] + jitter, 0, 255).astype(np.uint8)
        masks.append(mask)
    return Scene(img, list(objects), masks)


def draw(rng: np.random.Generator, tries: int = 300) -> Scene:
    """A random scene: :data:`OBJECTS` objects, same-coloured ones never 8-connected (so the
    judge reads each one), most at least 2 px from the others, some near-touching pairs 1-2 px
    apart, some small."""
    n = int(rng.integers(OBJECTS[0], OBJECTS[1] + 1))
    while True:
        objs: list[Obj] = []
        occupied = np.zeros((SIZE, SIZE), bool)
        for _ in range(tries):
            if len(objs) == n:
                break
            shape, color = int(rng.integers(len(shapes.SHAPES))), int(rng.integers(len(shapes.COLORS)))
            r = float(rng.uniform(*(SMALL if rng.random() < P_SMALL else NORMAL)))
            pair = bool(objs) and rng.random() < P_PAIR
            if pair:  # beside the previous object, edge to edge about 1-2 px
                prev = objs[-1]
                angle = rng.uniform(0, 2 * np.pi)
                dist = prev.r + r + rng.uniform(0.5, 2.0)
                cy, cx = prev.cy + dist * np.sin(angle), prev.cx + dist * np.cos(angle)
                if not (r <= cy <= SIZE - r and r <= cx <= SIZE - r):
                    continue
            else:
                cy, cx = rng.uniform(r + 1, SIZE - r - 1, size=2)
            mask = shapes._shape_mask(shape, cy, cx, r)
            if mask.sum() < 7 or (shapes._dilate(mask, 1 if pair else 2) & occupied).any():
                continue
            if pair and not (shapes._dilate(mask, 3) & occupied).any():
                continue  # not near after all
            occupied |= mask
            objs.append(Obj(shape, color, float(cy), float(cx), r))
        if len(objs) == n:
            return paint(objs, rng)


@lru_cache(maxsize=4096)
def scene(key: str) -> Scene:
    """The scene a key names (cached)."""
    return draw(np.random.default_rng(seed_of(key)))


def _kernel() -> Tensor:
    x = torch.arange(7, dtype=torch.float32) - 3
    k = torch.exp(-0.5 * (x / BLUR_SIGMA) ** 2)
    return k / k.sum()


def degrade(hr: Tensor) -> Tensor:
    """High-resolution images [B, 3, 32, 32] in [-1, 1] -> blurred, 4x downsampled [B, 3, 8, 8]
    (differentiable; no noise): separable Gaussian blur, edges replicated, then 4x4 means."""
    b, c, h, w = hr.shape
    k = _kernel().to(hr)
    x = hr.reshape(b * c, 1, h, w)
    x = F.conv2d(F.pad(x, (3, 3, 0, 0), mode="replicate"), k.view(1, 1, 1, 7))
    x = F.conv2d(F.pad(x, (0, 0, 3, 3), mode="replicate"), k.view(1, 1, 7, 1))
    return F.avg_pool2d(x, FACTOR).reshape(b, c, h // FACTOR, w // FACTOR)


def upsample(lr: Tensor, mode: str = "bicubic") -> Tensor:
    """Low-resolution images [B, 3, 8, 8] -> [B, 3, 32, 32] (bicubic or nearest), clamped to [-1, 1]."""
    if mode not in ("bicubic", "nearest", "bilinear"):
        raise UserError(f"unknown upsampling {mode!r}; bicubic, bilinear or nearest")
    kw = {} if mode == "nearest" else {"align_corners": False}
    return F.interpolate(lr, scale_factor=FACTOR, mode=mode, **kw).clamp(-1, 1)


@lru_cache(maxsize=4096)
def _low_res(key: str) -> Tensor:
    hr = shapes.to_tensor(scene(key).image[None])
    gen = torch.Generator().manual_seed(seed_of(key) * 7 + 3)
    lr = degrade(hr)[0]
    return (lr + NOISE * torch.randn(lr.shape, generator=gen)).clamp(-1, 1)


def low_res(key: str) -> Tensor:
    """The 8x8 input of ``key``'s scene, float [3, 8, 8] in [-1, 1] (deterministic noise)."""
    return _low_res(key).clone()


def ground_truth(key: str) -> Tensor:
    """``key``'s 32x32 scene, float [3, 32, 32] in [-1, 1]."""
    return shapes.to_tensor(scene(key).image[None])[0]


class _Source:
    """The ``shapes-sr`` image source of :data:`rewardiff.plugins.IMAGE_SOURCES`."""

    def low_res(self, key: str) -> Tensor:
        return low_res(key)

    def ground_truth(self, key: str) -> Tensor:
        return ground_truth(key)


SOURCE = _Source()


def ref(key: str) -> str:
    """The prompt that names ``key``'s scene: ``"shapes-sr:KEY"``."""
    return f"{SCHEME}:{key}"


def train_prompts() -> list[str]:
    """The ``sr-train`` prompt set: the first :data:`TRAIN_PROMPTS` training scenes."""
    return [ref(f"{TRAIN}/{i}") for i in range(TRAIN_PROMPTS)]


def held_out_prompts() -> list[str]:
    """The ``sr-held-out`` prompt set: every held-out scene."""
    return [ref(f"{HELD}/{i}") for i in range(HELD_OUT_SIZE)]


def make_batch(n: int, seed: int) -> tuple[Tensor, Tensor, list[str]]:
    """``n`` training pairs drawn by ``seed``: (high-resolution [n, 3, 32, 32], low-resolution
    [n, 3, 8, 8], their prompts), the keys uniform over the training scenes."""
    rng = np.random.default_rng(seed)
    keys = [f"{TRAIN}/{int(i)}" for i in rng.integers(0, TRAIN_KEYS, size=n)]
    hr = torch.stack([ground_truth(k) for k in keys])
    lr = torch.stack([low_res(k) for k in keys])
    return hr, lr, [ref(k) for k in keys]
