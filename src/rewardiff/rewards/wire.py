"""The OpenAI chat format both ends of a remote reward share: frames as PNGs, the default
templates, and reading a score out of an answer.

:mod:`rewardiff.rewards.remote` (the client) and :mod:`rewardiff.rewards.server` (the reward
server) both use these, so that a frame encoded by one decodes to the same pixels in the other.
"""

from __future__ import annotations

import io
import math
import re
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError, one_line

PREFIX = "openai:"  # the reward spec openai:MODEL@URL
DEFAULT_FRAMES = (0, 5, 10, 15)  # Free2Guide's key frames of a 16-frame video
DIGITS_TEMPLATE = ('How well does the image match the description "{prompt}"? Rate it from 1 (not at all) '
                   "to 9 (perfectly). Answer with a single digit.")
YES_NO_TEMPLATE = 'Does the image show "{prompt}"? Answer yes or no.'
MODES: dict[str, tuple[float, float] | None] = {"digits": (1.0, 9.0), "yes-no": (0.0, 1.0), "text": None}
TOP_LOGPROBS = 20  # OpenAI's maximum, and vLLM's default --max-logprobs
TEXT_MAX_TOKENS = 16
_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?")


def default_template(mode: str) -> str:
    """The prompt template a mode uses unless told: a yes/no question for ``yes-no``, a 1-9 rating otherwise."""
    return YES_NO_TEMPLATE if mode == "yes-no" else DIGITS_TEMPLATE


# ----------------------------------------------------------------------------- frames and PNGs


def to_png(frame: Tensor) -> bytes:
    """One frame float [3, H, W] in [-1, 1] -> 8-bit RGB PNG bytes (rounded to the nearest level)."""
    from PIL import Image

    arr = ((frame.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, format="PNG")
    return buf.getvalue()


def from_png(data: bytes) -> Tensor:
    """PNG (or any image PIL reads) bytes -> float [3, H, W] in [-1, 1]; the inverse of :func:`to_png`."""
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
    return torch.from_numpy(arr).permute(2, 0, 1).float().div(127.5).sub(1.0)


def check_frames(frames: Any) -> tuple[int, ...] | str:
    """``"all"``, or key-frame indices (a sequence of ints >= 0, or ``"0,5,10,15"``), checked."""
    if isinstance(frames, str) and frames.strip() == "all":
        return "all"
    try:
        items = frames.split(",") if isinstance(frames, str) else list(frames)
        idx = tuple(int(f) for f in items)
        if any(isinstance(f, bool) or (isinstance(f, float) and f != int(f)) for f in items):
            raise ValueError
    except (TypeError, ValueError):
        raise UserError(f"remote reward: frames must be 'all' or frame indices like (0, 5, 10, 15), got {frames!r}") from None
    if not idx or min(idx) < 0:
        raise UserError(f"remote reward: frames must be 'all' or non-negative frame indices, got {frames!r}")
    return idx


def frame_indices(n: int, frames: tuple[int, ...] | str) -> list[int]:
    """The frames of an ``n``-frame video to send: all of them, or the key frames clipped to n - 1
    (so a short video still sends its last frame) without repeats, in the order given."""
    if frames == "all":
        return list(range(n))
    return list(dict.fromkeys(min(f, n - 1) for f in frames))


def sample_frames(x: Tensor, frames: tuple[int, ...] | str) -> list[list[Tensor]]:
    """The frames [3, H, W] of each sample: images [B, 3, H, W] give one, videos [B, 3, F, H, W] their key frames."""
    if x.dim() == 4 and x.shape[1] == 3:
        return [[x[i]] for i in range(x.shape[0])]
    if x.dim() == 5 and x.shape[1] == 3 and x.shape[2] >= 1:
        idx = frame_indices(x.shape[2], frames)
        return [[x[i, :, f] for f in idx] for i in range(x.shape[0])]
    raise UserError(f"remote reward: expects images [B, 3, H, W] or videos [B, 3, F, H, W] in [-1, 1], got shape {tuple(x.shape)}")


# ----------------------------------------------------------------------------- reading an answer


def read_digits(top: list[dict]) -> float | None:
    """Expected digit over 1..9 from top log-probabilities ``[{"token", "logprob"}, ...]``, the
    digits' probabilities renormalised among themselves; None when no digit is among them."""
    probs = [0.0] * 10
    for entry in top:
        token = str(entry.get("token", "")).strip()
        if len(token) == 1 and token in "123456789":
            probs[int(token)] += math.exp(float(entry["logprob"]))
    total = sum(probs)
    return sum(d * p for d, p in enumerate(probs)) / total if total > 0 else None


def read_yes_no(top: list[dict]) -> float | None:
    """P(yes) / (P(yes) + P(no)) from top log-probabilities; None when neither answer is among them."""
    p = {"yes": 0.0, "no": 0.0}
    for entry in top:
        token = str(entry.get("token", "")).strip().strip(".,!").lower()
        if token in p:
            p[token] += math.exp(float(entry["logprob"]))
    total = p["yes"] + p["no"]
    return p["yes"] / total if total > 0 else None


def read_text(text: str) -> float | None:
    """The first number in ``text``, else 1 / 0 for a text that starts with yes / no, else None."""
    m = _NUMBER.search(text)
    if m:
        return float(m.group())
    word = text.strip().lower()
    return 1.0 if word.startswith("yes") else 0.0 if word.startswith("no") else None


def excerpt(text: str, n: int = 120) -> str:
    """The first ``n`` characters of ``text`` on one line, for an error message."""
    text = one_line(text.strip())
    return text if len(text) <= n else text[:n] + "..."


def server_message(resp: Any) -> str:
    """What a server said in an error reply: OpenAI's ``error.message``, FastAPI's ``detail``, or the text."""
    try:
        body = resp.json()
    except ValueError:
        return excerpt(resp.text) or resp.reason_phrase
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return excerpt(str(err["message"]), 300)
        for key in ("detail", "message", "error"):
            if body.get(key):
                return excerpt(str(body[key]), 300)
    return excerpt(resp.text)
