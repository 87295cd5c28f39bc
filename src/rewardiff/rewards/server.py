"""Serve any reward over HTTP: ``rewardiff serve-reward NAME`` (FastAPI + uvicorn).

Endpoints:

- ``GET /health``: ``{"status": "ok", "reward", "value_range"}``.
- ``POST /score``: ``{"prompts": [...], "images": [[b64png, ...], ...]}``, one list of frames per
  item (one frame: an image [3, H, W]; several: a video [3, F, H, W], stacked on dim 1; all
  items of a request the same size) -> ``{"scores": [...]}``, the reward itself.
- ``GET /v1/models`` and ``POST /v1/chat/completions``: the OpenAI chat shape that vLLM and
  SGLang answer, so that the remote reward (``openai:NAME@http://HOST:PORT/v1``) scores through
  this server exactly as through a vision-language model. The images are read from the message's
  ``image_url`` data URLs, the generation prompt from its text by the template; the answer is
  one token whose ``top_logprobs`` hold the digits 1..9 with a distribution whose expectation
  is 1 + 8 u, u = (r - lo) / (hi - lo) clipped to [0, 1] with (lo, hi) the reward's
  ``value_range`` (or ``--range``), and whose content is the most likely digit; for a yes/no
  template they hold yes and no with P(yes) = u. The client's ``digits`` mode then reads back
  1 + 8 u, its ``yes-no`` mode u.

The digit distribution is p_d ∝ exp(-(d - c)^2 / 2) over d = 1..9 (a discretised Gaussian, so
its mode follows the score), with c solved by bisection so that sum_d d p_d = 1 + 8 u: the mean
of this exponential family in c rises monotonically from 1 to 9, and every digit keeps a finite
log-probability even at u = 0 or 1.

One reward call at a time (a lock); rewards take images only (a molecules reward such as
``qed`` needs SMILES and cannot be served here). A failing reward answers HTTP 500 with its
one-line message; a malformed request HTTP 400.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' ``Request`` annotations
# at runtime, and those are imported inside build_app.
import base64
import binascii
import math
import re
import threading
import time
import uuid
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError, one_line
from rewardiff.rewards.wire import DIGITS_TEMPLATE, YES_NO_TEMPLATE, from_png
from rewardiff.types import Reward

DIGITS = tuple(range(1, 10))
MIN_P = 1e-12  # P(yes) stays in [MIN_P, 1 - MIN_P]: a log-probability must be finite JSON


def digit_distribution(u: float) -> list[float]:
    """Probabilities of the digits 1..9 with expectation 1 + 8 u (u in [0, 1]); see the module docstring."""
    target = 1.0 + 8.0 * min(max(u, 0.0), 1.0)
    lo, hi = -200.0, 210.0  # the mean is within 1e-80 of 1 at c = -200 and of 9 at c = 210
    for _ in range(200):
        c = (lo + hi) / 2
        if _mean(_gauss(c)) < target:
            lo = c
        else:
            hi = c
    return _gauss((lo + hi) / 2)


def _gauss(c: float) -> list[float]:
    logits = [-((d - c) ** 2) / 2 for d in DIGITS]
    top = max(logits)
    w = [math.exp(v - top) for v in logits]
    s = sum(w)
    return [v / s for v in w]


def _mean(p: list[float]) -> float:
    return sum(d * q for d, q in zip(DIGITS, p))


def _log(p: float) -> float:
    return math.log(p) if p > 0 else -1e4  # never -inf in JSON (vLLM writes -9999.0 likewise)


def _entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode())}


def answer_logprobs(u: float, yes_no: bool, k: int) -> tuple[str, dict]:
    """The answer token and its ``logprobs.content[0]`` entry (the ``k`` most likely alternatives)."""
    if yes_no:
        py = min(max(u, MIN_P), 1 - MIN_P)
        options = [("yes", py), ("no", 1 - py)]
    else:
        options = [(str(d), p) for d, p in zip(DIGITS, digit_distribution(u))]
    options.sort(key=lambda o: -o[1])
    token = options[0][0]
    top = [_entry(t, _log(p)) for t, p in options[:k]]
    return token, {**_entry(token, _log(options[0][1])), "top_logprobs": top}


# ----------------------------------------------------------------------------- reading requests


def template_pattern(template: str) -> re.Pattern:
    """A regular expression matching the template's text with any prompt where ``{prompt}`` is."""
    if "{prompt}" not in template:
        raise UserError(f"serve-reward: --template must hold {{prompt}}, got {template!r}")
    head, _, tail = template.strip().partition("{prompt}")
    rest = re.escape(tail).replace(re.escape("{prompt}"), "(?P=prompt)")  # a second {prompt} must repeat the first
    return re.compile(re.escape(head) + "(?P<prompt>.*?)" + rest, re.DOTALL)


def is_yes_no(template: str) -> bool:
    """Whether a template asks a yes/no question (it says both "yes" and "no" as words)."""
    words = set(re.findall(r"[a-z]+", template.lower()))
    return {"yes", "no"} <= words


def decode_image(b64: Any, where: str) -> Tensor:
    """A base64 PNG (or a ``data:image/...;base64,`` URL) -> [3, H, W] in [-1, 1]."""
    if not isinstance(b64, str):
        raise BadRequest(f"{where}: expected a base64 PNG string, got {type(b64).__name__}")
    if b64.startswith("data:"):
        head, sep, b64 = b64.partition(",")
        if not sep or ";base64" not in head:
            raise BadRequest(f"{where}: only base64 data URLs are read (data:image/png;base64,...)")
    elif b64.startswith(("http://", "https://", "file:")):
        raise BadRequest(f"{where}: only inline base64 images are read, not URLs")
    try:
        return from_png(base64.b64decode(b64, validate=True))
    except (binascii.Error, ValueError, OSError) as e:
        raise BadRequest(f"{where}: not a base64 image ({one_line(str(e))[:80]})") from None


def stack_frames(frames: list[Tensor], where: str) -> Tensor:
    """One frame -> the image [3, H, W]; several -> the video [3, F, H, W]."""
    if len(frames) == 1:
        return frames[0]
    if len({f.shape for f in frames}) > 1:
        raise BadRequest(f"{where}: frames of different sizes {sorted({tuple(f.shape) for f in frames})}")
    return torch.stack(frames, dim=1)


def chat_inputs(body: Any) -> tuple[list[Tensor], str]:
    """The images and the text of the last user message of a chat completion request."""
    messages = body.get("messages") if isinstance(body, dict) else None
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"] if isinstance(messages, list) else []
    if not users:
        raise BadRequest("the request holds no user message (messages: [{role: user, content: [...]}])")
    content = users[-1].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise BadRequest("the user message's content must be text or a list of parts")
    images, texts = [], []
    for i, part in enumerate(parts):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            texts.append(str(part.get("text", "")))
        elif kind == "image_url":
            url = part.get("image_url")
            images.append(decode_image(url.get("url") if isinstance(url, dict) else url, f"content[{i}]"))
        else:
            raise BadRequest(f"content[{i}]: parts must be of type text or image_url, got {kind!r}")
    if not images:
        raise BadRequest("the user message holds no image_url part")
    return images, "\n".join(texts)


class BadRequest(Exception):
    """A malformed request: HTTP 400 with this one-line message."""


# ----------------------------------------------------------------------------- the scorer


class RewardService:
    """What the endpoints call: the reward under a lock, the value mapping and the templates.

    Args:
        reward: the reward to serve (images [B, 3, H, W] or videos [B, 3, F, H, W] in [-1, 1]).
        templates: the chat texts accepted, each holding ``{prompt}`` (the first that matches wins).
        value_range: (lo, hi) mapping the reward to u in [0, 1]; default the reward's own.
        last_image: score only the last image of a chat message (the ones before it are context
            for a vision-language model, such as a super-resolution input and its truth, which
            the served reward reads from the prompt instead).
    """

    def __init__(self, reward: Reward, templates: list[str], value_range: tuple[float, float] | None = None,
                 last_image: bool = False):
        self.last_image = bool(last_image)
        self.reward, self.templates = reward, [(t, template_pattern(t), is_yes_no(t)) for t in templates]
        self.value_range = value_range or getattr(reward, "value_range", None)
        self.name = str(getattr(reward, "name", "reward"))
        self._lock = threading.Lock()

    def score(self, x: Tensor, prompts: list[str]) -> list[float]:
        """The reward of a batch, one call at a time; a failure is a :class:`RewardFailed`."""
        with self._lock:
            try:
                with torch.no_grad():
                    out = self.reward(x, prompts)
                values = torch.as_tensor(out).detach().float().cpu().reshape(-1).tolist()
            except Exception as e:  # whatever the reward raises is the server's 500, in one line
                raise RewardFailed(f"reward {self.name!r} failed: {type(e).__name__}: {e}") from e
        if len(values) != len(prompts):
            raise RewardFailed(f"reward {self.name!r} returned {len(values)} values for {len(prompts)} samples")
        return values

    def unit(self, r: float) -> float:
        """The reward mapped to [0, 1] by the value range (clipped)."""
        if self.value_range is None:
            raise BadRequest(f"reward {self.name!r} has no value range, which the chat answer needs; "
                             "restart the server with --range LO,HI")
        lo, hi = self.value_range
        if not math.isfinite(r):
            raise RewardFailed(f"reward {self.name!r} returned {r}")
        return min(max((r - lo) / (hi - lo), 0.0), 1.0)

    def match(self, text: str) -> tuple[str, bool]:
        """(generation prompt, whether the template is yes/no) read from a chat text by the templates."""
        for _, pattern, yes_no in self.templates:
            m = pattern.fullmatch(text.strip())
            if m:
                return m["prompt"], yes_no
        shown = " or ".join(repr(t) for t, _, _ in self.templates)
        raise BadRequest(f"the text {one_line(text[:120])!r} does not match the server's template {shown}; "
                         "start the server with the client's --template")

    def chat(self, body: Any) -> dict:
        """An OpenAI chat completion answering one request (see the module docstring)."""
        images, text = chat_inputs(body)
        if self.last_image:
            images = images[-1:]
        prompt, yes_no = self.match(text)
        x = stack_frames(images, "images")[None]
        u = self.unit(self.score(x, [prompt])[0])
        k = body.get("top_logprobs") or 0
        k = k if isinstance(k, int) and not isinstance(k, bool) and k >= 0 else 0
        token, entry = answer_logprobs(u, yes_no, k)
        logprobs = {"content": [entry]} if body.get("logprobs") else None
        return {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion", "created": int(time.time()),
                "model": str(body.get("model") or self.name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": token}, "logprobs": logprobs,
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 0, "completion_tokens": 1, "total_tokens": 1}}

    def score_request(self, body: Any) -> dict:
        """``/score``: {"prompts": [...], "images": [[b64, ...], ...]} -> {"scores": [...]}."""
        prompts = body.get("prompts") if isinstance(body, dict) else None
        images = body.get("images") if isinstance(body, dict) else None
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise BadRequest('"prompts" must be a list of strings')
        if not isinstance(images, list) or len(images) != len(prompts) or not prompts:
            raise BadRequest(f'"images" must be a list of frame lists, one per prompt ({len(prompts)} prompts)')
        items = []
        for i, frames in enumerate(images):
            if not isinstance(frames, list) or not frames:
                raise BadRequest(f"images[{i}] must be a non-empty list of base64 PNG frames")
            items.append(stack_frames([decode_image(f, f"images[{i}][{j}]") for j, f in enumerate(frames)], f"images[{i}]"))
        if len({t.shape for t in items}) > 1:
            raise BadRequest(f"the items of one request must have one size, got {sorted({tuple(t.shape) for t in items})}")
        return {"scores": self.score(torch.stack(items), prompts)}


class RewardFailed(Exception):
    """The reward raised or returned something unusable: HTTP 500 with this one-line message."""


# ----------------------------------------------------------------------------- the app and the command


def build_app(service: "RewardService"):
    """The FastAPI application serving ``service``."""
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.responses import JSONResponse

    app = FastAPI(title=f"rewardiff reward server: {service.name}")

    def error(status: int, message: str) -> JSONResponse:
        message = one_line(message)
        return JSONResponse({"error": {"message": message, "type": "BadRequestError" if status == 400 else "InternalServerError",
                                       "code": status}, "detail": message}, status_code=status)

    async def answer(request: Request, handler) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not JSON")
        try:
            return JSONResponse(await run_in_threadpool(handler, body))
        except BadRequest as e:
            return error(400, str(e))
        except RewardFailed as e:
            return error(500, str(e))

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok", "reward": service.name, "value_range": service.value_range}

    @app.get("/v1/models")
    def models() -> dict:
        return {"object": "list", "data": [{"id": service.name, "object": "model", "owned_by": "rewardiff"}]}

    @app.post("/score")
    async def score(request: Request):
        return await answer(request, service.score_request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await answer(request, service.chat)

    return app


def parse_range(text: str | None) -> tuple[float, float] | None:
    """``"LO,HI"`` -> (LO, HI), two finite numbers with LO < HI; None -> None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise UserError(f"--range must be LO,HI (two numbers), got {text!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise UserError(f"--range must be LO,HI with finite LO < HI, got {text!r}")
    return lo, hi


def bind(host: str, port: int):
    """A listening socket on (host, port), or a one-line error when the port is taken."""
    import socket

    if not 0 <= port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"--host {host!r}: {e.strerror}") from None
    family, kind, proto = infos[0][:3]
    # proto must be IPPROTO_TCP (not 0): asyncio sets TCP_NODELAY only on such sockets, and without
    # it every kept-alive answer waits ~40 ms for a delayed ACK
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(infos[0][4])
    except OSError as e:
        sock.close()
        what = "is in use" if e.errno in (98, 48) else f"cannot be bound ({e.strerror})"
        raise UserError(f"port {port} on {host} {what}; choose another with --port") from None
    sock.listen(128)
    return sock


def make_service(name: str, template: str | None = None, value_range: str | None = None, last_image: bool = False) -> RewardService:
    """The service for reward ``name`` (any spec :func:`~rewardiff.rewards.get_reward` takes)."""
    from rewardiff.rewards import get_reward

    lohi = parse_range(value_range)
    templates = [template] if template is not None else [DIGITS_TEMPLATE, YES_NO_TEMPLATE]
    return RewardService(get_reward(name), templates, lohi, last_image)


def serve(name: str, host: str = "127.0.0.1", port: int = 8000, template: str | None = None,
          value_range: str | None = None, log_level: str = "warning", last_image: bool = False) -> None:
    """Serve reward ``name`` until interrupted; prints the address (the real port when ``port`` is 0)."""
    import uvicorn

    service = make_service(name, template, value_range, last_image)
    sock = bind(host, port)
    where = sock.getsockname()
    url = f"http://{host if ':' not in host else f'[{host}]'}:{where[1]}/v1"
    print(f"serving reward {service.name!r} (range {service.value_range}) at {url}: POST /score, /v1/chat/completions; "
          f"client: openai:{service.name}@{url}", flush=True)
    server = uvicorn.Server(uvicorn.Config(build_app(service), log_level=log_level, timeout_graceful_shutdown=2))
    server.run(sockets=[sock])
