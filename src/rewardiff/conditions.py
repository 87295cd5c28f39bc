"""Image conditions carried by prompts: super-resolution inputs and their references.

Every generator takes prompts (strings), so an image-conditioned model (a super-resolution
model's low-resolution input) reads its image through the prompt, and every method, trainer
and reward keeps its contract unchanged. A prompt is

    "TEXT | REF"    or    "REF"

where REF is ``SCHEME:KEY``: ``file:PATH`` (a PNG or JPEG on disk, read with PIL) or a scheme a
world registers in :data:`rewardiff.plugins.IMAGE_SOURCES` (``shapes-sr:held-out/17``: the
super-resolution world's held-out image 17). A source answers ``low_res(key)`` (the
conditioning image) and ``ground_truth(key)`` (the high-resolution truth, or None when there is
none, as for a user's file); images are float [3, H, W] in [-1, 1].

``file:`` refs may name the truth too: ``file:low.png;gt=high.png``.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from rewardiff.errors import UserError

SEP = " | "
FILE = "file"


class ImageSource(Protocol):
    """What a scheme of :data:`rewardiff.plugins.IMAGE_SOURCES` resolves to."""

    def low_res(self, key: str) -> Tensor: ...

    def ground_truth(self, key: str) -> Tensor | None: ...


def split(prompt: str) -> tuple[str, str | None]:
    """``"a cat | file:x.png"`` -> ``("a cat", "file:x.png")``; ``"shapes-sr:3"`` -> ``("", "shapes-sr:3")``;
    a prompt with no image reference -> ``(prompt, None)``."""
    text, sep, ref = prompt.rpartition(SEP)
    if sep:
        return text, ref.strip()
    return ("", prompt.strip()) if _scheme(prompt) is not None else (prompt, None)


def unconditional(prompt: str) -> str:
    """Classifier-free guidance's unconditional prompt of ``prompt``: its image with no text
    (``"a cat | file:x.png"`` -> ``" | file:x.png"``), or ``""`` for a prompt with no image. An
    image-conditioned model's unconditional branch drops the text and keeps the image, as
    diffusers' upscaler and image-to-image pipelines do."""
    _, ref = split(prompt)
    return "" if ref is None else SEP + ref


def _scheme(ref: str) -> str | None:
    from rewardiff import plugins

    scheme, sep, _ = ref.strip().partition(":")
    return scheme if sep and (scheme == FILE or scheme in plugins.IMAGE_SOURCES) else None


def _source(ref: str) -> tuple[Any, str]:
    from rewardiff import plugins

    scheme, sep, key = ref.partition(":")
    if not sep:
        raise UserError(f"image reference {ref!r} must look like SCHEME:KEY (file:PATH or one of {', '.join(plugins.IMAGE_SOURCES) or 'none registered'})")
    if scheme == FILE:
        return _FILES, key
    return plugins.load(plugins.lookup(plugins.IMAGE_SOURCES, scheme, "image source")), key


def low_res(prompt: str) -> Tensor:
    """The conditioning image of ``prompt`` [3, H, W] in [-1, 1]; UserError when it names none."""
    _, ref = split(prompt)
    if ref is None:
        raise UserError(f"prompt {prompt!r} names no image; write 'TEXT | file:PATH' or a world's reference such as shapes-sr:0")
    source, key = _source(ref)
    return source.low_res(key)


def ground_truth(prompt: str) -> Tensor | None:
    """The high-resolution truth of ``prompt``'s image, or None when its source has none."""
    _, ref = split(prompt)
    if ref is None:
        return None
    source, key = _source(ref)
    return source.ground_truth(key)


def stack(images: list[Tensor | None], what: str) -> Tensor:
    """Images of one size stacked [B, 3, H, W]; UserError naming ``what`` when one is missing or sizes differ."""
    if any(im is None for im in images):
        raise UserError(f"{what}: a prompt's image has no ground truth to compare with")
    sizes = {tuple(im.shape) for im in images}  # type: ignore[union-attr]
    if len(sizes) != 1:
        raise UserError(f"{what}: images of different sizes {sorted(sizes)} in one batch")
    return torch.stack(images)  # type: ignore[arg-type]


@lru_cache(maxsize=256)
def read_image(path: str) -> Tensor:
    """A PNG or JPEG as float [3, H, W] in [-1, 1]; UserError naming the file when it cannot be read."""
    import numpy as np
    from PIL import Image

    try:
        with Image.open(Path(path).expanduser()) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read image {path}: {e}") from None
    return torch.from_numpy(arr).permute(2, 0, 1) / 127.5 - 1


class _Files:
    """``file:PATH`` and ``file:PATH;gt=PATH``."""

    @staticmethod
    def _parts(key: str) -> tuple[str, str | None]:
        path, _, rest = key.partition(";gt=")
        return path, (rest or None)

    def low_res(self, key: str) -> Tensor:
        return read_image(self._parts(key)[0])

    def ground_truth(self, key: str) -> Tensor | None:
        gt = self._parts(key)[1]
        return None if gt is None else read_image(gt)


_FILES = _Files()
