"""PNG grids of image samples, with an optional short label under each cell."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from rewardiff.io import atomic_write_bytes

GUTTER = 2
"""Width in pixels of the dark lines between cells and around the grid."""
BACKGROUND = (48, 48, 48)
LABEL_COLOR = (225, 225, 225)

ImageBatch = torch.Tensor | np.ndarray


def to_uint8_hwc(images: ImageBatch) -> np.ndarray:
    """Convert a batch of images to uint8 ``[N, H, W, 3]``.

    Args:
        images: A float tensor ``[N, C, H, W]`` in [-1, 1] (a uint8 tensor ``[N, C, H, W]``
            is taken as is), or a uint8 array ``[N, H, W, 3]``. ``C`` is 3 or 1 (gray is
            repeated to RGB); a single image without the batch axis is accepted too. Videos
            ``[N, C, F, H, W]`` become filmstrips: the F frames side by side, one pixel of
            :data:`BACKGROUND` between them (:func:`filmstrip`).

    Returns:
        A C-contiguous uint8 array ``[N, H, W, 3]``.

    Raises:
        TypeError: For an array that is not uint8, or an unsupported type.
        ValueError: For an unsupported shape or an empty batch.
    """
    if isinstance(images, torch.Tensor):
        arr = _tensor_to_uint8(images)
    elif isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"a numpy image batch must be uint8 [N, H, W, 3], got dtype {images.dtype}")
        arr = images[None] if images.ndim == 3 else images
        arr = arr[..., None] if arr.ndim == 3 else arr
    else:
        raise TypeError(f"expected a torch.Tensor or a numpy array, got {type(images).__name__}")
    if arr.ndim != 4 or arr.shape[-1] not in (1, 3):
        raise ValueError(f"expected images [N, H, W, 3] after conversion, got shape {tuple(arr.shape)}")
    if arr.shape[0] == 0:
        raise ValueError("no images to put in a grid")
    if arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return np.ascontiguousarray(arr)


def _tensor_to_uint8(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu()
    if x.ndim == 5:
        x = filmstrip(x)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4:
        raise ValueError(f"expected a tensor [N, C, H, W], got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def filmstrip(videos: torch.Tensor, gap: int = 1) -> torch.Tensor:
    """Videos [N, C, F, H, W] -> images [N, C, H, F*W + (F-1)*gap]: frames left to right, in the
    videos' own range and dtype, ``gap`` columns of the grid's background between frames."""
    n, c, f, h, w = videos.shape
    fill = torch.tensor(BACKGROUND[:c] if c == 3 else BACKGROUND[:1], dtype=torch.float32)
    if videos.dtype == torch.uint8:
        fill = fill.round().to(torch.uint8)
    else:
        fill = (fill / 127.5 - 1).to(videos.dtype)
    out = fill.view(1, c, 1, 1).expand(n, c, h, f * w + (f - 1) * gap).clone()
    for k in range(f):
        out[..., k * (w + gap): k * (w + gap) + w] = videos[:, :, k]
    return out


def save_gif(video: torch.Tensor, path: str | os.PathLike, scale: int = 4, fps: int = 8) -> None:
    """One video [C, F, H, W] in [-1, 1] as a looping animated GIF (nearest upscaling by ``scale``)."""
    frames = to_uint8_hwc(video.permute(1, 0, 2, 3))  # [F, H, W, 3]
    ims = [Image.fromarray(f).resize((f.shape[1] * scale, f.shape[0] * scale), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    ims[0].save(buf, format="GIF", save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)
    atomic_write_bytes(Path(path), buf.getvalue())


def label_height() -> int:
    """Height in pixels of the strip under each cell that holds its label."""
    left, top, right, bottom = _font().getbbox("Ag|")
    return int(bottom) + 3


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default()


def grid_shape(n: int, nrow: int) -> tuple[int, int]:
    """Rows and columns of a grid of ``n`` cells with at most ``nrow`` cells a row."""
    if nrow < 1:
        raise ValueError(f"nrow must be at least 1, got {nrow}")
    cols = min(nrow, n)
    return math.ceil(n / cols), cols


def grid_image(images: ImageBatch, nrow: int = 8, scale: int = 4,
               labels: Sequence[str | None] | None = None) -> Image.Image:
    """Lay a batch of images out in a grid.

    Cells are filled row by row, ``nrow`` a row (the last row may be short). Each image is
    upscaled by ``scale`` with nearest-neighbour sampling, so pixels stay sharp. Cells are
    separated by, and the grid surrounded by, ``GUTTER``-pixel dark gray lines.

    Args:
        images: See ``to_uint8_hwc``: a float tensor ``[N, 3, H, W]`` in [-1, 1] or a uint8
            array ``[N, H, W, 3]``.
        nrow: Number of images in each row.
        scale: Integer upscaling factor (1 keeps the native size).
        labels: Optional short text per image (e.g. ``"ok"``/``"x"``), drawn under its
            cell in PIL's default font; truncated to the cell width. ``None`` entries stay blank.

    Returns:
        An RGB image of width ``cols * W * scale + (cols + 1) * GUTTER`` and height
        ``rows * (H * scale + L) + (rows + 1) * GUTTER``, where ``L`` is ``label_height()``
        with labels and 0 without.

    Raises:
        ValueError: For a bad ``scale``/``nrow``, or labels not one per image.
    """
    arr = to_uint8_hwc(images)
    if scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale}")
    if labels is not None and len(labels) != len(arr):
        raise ValueError(f"got {len(labels)} labels for {len(arr)} images")
    arr = arr.repeat(scale, axis=1).repeat(scale, axis=2)
    strip = label_height() if labels is not None else 0
    canvas = _paste_cells(arr, nrow, strip)
    image = Image.fromarray(canvas)
    if labels is not None:
        _draw_labels(image, labels, arr.shape[1:3], nrow, strip)
    return image


def _cell_origin(i: int, cols: int, cell_hw: tuple[int, int], strip: int) -> tuple[int, int]:
    """Top-left ``(y, x)`` of cell ``i``."""
    r, c = divmod(i, cols)
    return GUTTER + r * (cell_hw[0] + strip + GUTTER), GUTTER + c * (cell_hw[1] + GUTTER)


def _paste_cells(arr: np.ndarray, nrow: int, strip: int) -> np.ndarray:
    n, h, w, _ = arr.shape
    rows, cols = grid_shape(n, nrow)
    height = rows * (h + strip) + (rows + 1) * GUTTER
    width = cols * w + (cols + 1) * GUTTER
    canvas = np.empty((height, width, 3), dtype=np.uint8)
    canvas[:] = BACKGROUND
    for i in range(n):
        y, x = _cell_origin(i, cols, (h, w), strip)
        canvas[y : y + h, x : x + w] = arr[i]
    return canvas


def _draw_labels(image: Image.Image, labels: Sequence[str | None], cell_hw: tuple[int, int],
                 nrow: int, strip: int) -> None:
    draw, font = ImageDraw.Draw(image), _font()
    _, cols = grid_shape(len(labels), nrow)
    for i, label in enumerate(labels):
        if not label:
            continue
        text = _fit(str(label), font, cell_hw[1] - 2)
        y, x = _cell_origin(i, cols, cell_hw, strip)
        x += max(0, (cell_hw[1] - int(font.getlength(text))) // 2)
        draw.text((x, y + cell_hw[0] + 1), text, fill=LABEL_COLOR, font=font)


def _fit(text: str, font: ImageFont.ImageFont | ImageFont.FreeTypeFont, width: int) -> str:
    """``text`` cut from the right until it fits in ``width`` pixels."""
    while len(text) > 1 and font.getlength(text) > width:
        text = text[:-1]
    return text


def save_grid(images: ImageBatch, path: str | os.PathLike, nrow: int = 8, scale: int = 4,
              labels: Sequence[str | None] | None = None) -> Path:
    """Write ``grid_image(images, nrow, scale, labels)`` as a PNG, atomically.

    Args:
        images: A float tensor ``[N, 3, H, W]`` in [-1, 1] or a uint8 array ``[N, H, W, 3]``.
        path: Destination PNG; parent folders are created.
        nrow: Number of images in each row.
        scale: Nearest-neighbour upscaling factor.
        labels: Optional short text under each cell.

    Returns:
        The path written.
    """
    buf = io.BytesIO()
    grid_image(images, nrow=nrow, scale=scale, labels=labels).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())
