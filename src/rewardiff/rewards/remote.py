"""A vision-language model behind an OpenAI-compatible chat API (vLLM, SGLang) as a black-box reward.

    reward = get_reward("openai:Qwen/Qwen2.5-VL-7B-Instruct@http://127.0.0.1:8000/v1")
    r = reward(x, prompts)  # x: images [B, 3, H, W] or videos [B, 3, F, H, W] in [-1, 1] -> [B]

Each sample is one chat request: its frames (the image, or the video's key frames ``frames``)
as base64 PNG ``image_url`` data URLs, then the prompt ``template`` with ``{prompt}`` filled in,
all in one user message. The score is read by ``mode``:

- ``digits``: as Free2Guide (arXiv 2411.17041) reads a 1-9 rating, from the top log-probabilities
  of the first answer token: the expected digit sum_d d p_d / sum_d p_d over the digits 1..9
  among them (``max_tokens: 1, logprobs: true, top_logprobs: 20``). Range (1, 9).
- ``yes-no``: P(yes) / (P(yes) + P(no)) from the same log-probabilities. Range (0, 1).
- ``text``: the first number of the answer text (1 or 0 for an answer that starts yes or no),
  for servers that return no log-probabilities. Range unknown.

Tokens are matched after stripping spaces (and, for yes/no, case), and variants of one answer
(``"7"``, ``" 7"``) are summed. Requests run on at most ``concurrency`` threads, each attempt
bounded by ``timeout`` seconds and retried ``retries`` times with exponential backoff
(``backoff`` x 1, 2, 4, ... s) on a refused or dropped connection, a timeout, HTTP 429 or 5xx.
Scores are cached by (sha256 of the frames' PNG bytes, prompt, model, template, mode): in
memory, and in a JSON-lines file when ``cache_file`` is given (read back on start, a torn last
line skipped). ``reward.stats`` counts what was sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import threading
import time
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.rewards.wire import (DEFAULT_FRAMES, MODES, PREFIX, TEXT_MAX_TOKENS, TOP_LOGPROBS, check_frames, default_template,
                                    excerpt, read_digits, read_text, read_yes_no, sample_frames, server_message, to_png)

RETRY_STATUS = (429, 500, 502, 503, 504)
_SPEC = re.compile(r"^(?P<model>[^@]+)@(?P<url>https?://\S+)$")


# ----------------------------------------------------------------------------- the reward


@dataclass
class RemoteStats:
    """What a :class:`RemoteReward` sent: ``requests`` samples sent to the server (once each, however
    many tries), ``cache_hits`` samples answered from the cache (a repeat within one batch
    included), ``retries`` tries after the first, and ``latencies`` the seconds from sending each
    answered sample to its answer, retries and backoff included."""

    requests: int = 0
    cache_hits: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)


class RemoteReward:
    """Score images or videos with a vision-language model over an OpenAI-compatible chat API.

    Black-box (``differentiable = False``); see the module docstring for what is sent and read.

    Args:
        model: the served model's name (``Qwen/Qwen2.5-VL-7B-Instruct``).
        url: the API's base, ``http://HOST:PORT/v1`` (``/chat/completions`` is appended), or the
            full ``.../chat/completions`` address.
        template: the question, holding ``{prompt}`` (default: :func:`default_template` of ``mode``).
        mode: ``digits``, ``yes-no`` or ``text`` (how the score is read).
        frames: key frames of a video, clipped to its length, or ``"all"``.
        context: images of the prompt's condition sent before the sample's own, in this order:
            ``"low-res"`` (the conditioning input) and ``"ground-truth"`` (its truth), read by
            :mod:`rewardiff.conditions` (a super-resolution judge compares the output with them);
            empty by default. The template can say which image is which.
        concurrency: requests in flight at most.
        timeout: seconds each try may take to connect, send or receive.
        retries: tries after the first on connection errors, timeouts, 429 and 5xx.
        backoff: seconds before the first retry, doubled before each next one.
        cache: keep scores in memory (and in ``cache_file``) and reuse them.
        cache_file: a JSON-lines file the cache is read from and appended to.
        api_key: sent as ``Authorization: Bearer``; default ``$OPENAI_API_KEY`` when set.
        name: the reward's name (default ``openai:MODEL@URL``).
    """

    differentiable = False

    def __init__(self, model: str, url: str, template: str | None = None, mode: str = "digits",
                 frames: Any = DEFAULT_FRAMES, concurrency: int = 4, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.5, cache: bool = True, cache_file: str | Path | None = None,
                 api_key: str | None = None, name: str | None = None, context: Any = ()):
        import httpx

        self.model, self.url, self.mode = _check_model(model), _check_url(url), _check_mode(mode)
        self.template = _check_template(template if template is not None else default_template(mode))
        self.frames = check_frames(frames)
        self.context = _check_context(context)
        self.concurrency = _check_number("concurrency", concurrency, int, 1)
        self.timeout = _check_number("timeout", timeout, float, 0.0, strict=True)
        self.retries = _check_number("retries", retries, int, 0)
        self.backoff = _check_number("backoff", backoff, float, 0.0)
        self.name = name or f"{PREFIX}{self.model}@{self.url}"
        self.value_range = MODES[self.mode]
        self.description = f"{self.model} at {self.url} ({self.mode})"
        self.endpoint = self.url if self.url.endswith("/chat/completions") else self.url + "/chat/completions"
        self.stats = RemoteStats()
        self._lock = threading.Lock()
        self._use_cache, self._cache_file = bool(cache), Path(cache_file) if cache_file is not None else None
        self._cache: dict[str, float] = self._read_cache() if self._use_cache else {}
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers,
                                    limits=httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency))

    # -- the Reward contract

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor:
        """Score a batch: ``x`` images [B, 3, H, W] or videos [B, 3, F, H, W] in [-1, 1], B prompts -> float [B]."""
        if len(prompts) != x.shape[0]:
            raise UserError(f"reward {self.name!r}: {x.shape[0]} samples but {len(prompts)} prompts")
        pngs = [[to_png(c) for c in self._context_images(prompt)] + [to_png(f) for f in frames]
                for frames, prompt in zip(sample_frames(x, self.frames), prompts)]
        keys = [self.cache_key(p, prompt) for p, prompt in zip(pngs, prompts)]
        scores: dict[str, float] = {}
        todo: dict[str, int] = {}  # key -> the first sample that needs it
        for i, key in enumerate(keys):
            if self._use_cache and key in self._cache:
                scores[key] = self._cache[key]
            elif key not in todo:
                todo[key] = i
                continue
            with self._lock:
                self.stats.cache_hits += 1
        if todo:
            fresh = self._score_all({k: (pngs[i], prompts[i]) for k, i in todo.items()})
            scores.update(fresh)
            if self._use_cache:
                self._remember(fresh)
        return torch.tensor([scores[k] for k in keys], dtype=torch.float32, device=x.device)

    def _context_images(self, prompt: str) -> list[Tensor]:
        """The condition images sent before a sample's own (``context``), [3, H, W] each."""
        if not self.context:
            return []
        from rewardiff import conditions

        out = []
        for what in self.context:
            im = conditions.low_res(prompt) if what == "low-res" else conditions.ground_truth(prompt)
            if im is None:
                raise UserError(f"remote reward {self.url}: prompt {prompt!r} has no {what} image to send")
            out.append(im)
        return out

    def cache_key(self, pngs: list[bytes], prompt: str) -> str:
        """sha256 over the frames' PNG bytes (each length-prefixed), the prompt, model, template and mode."""
        h = hashlib.sha256()
        for png in pngs:
            h.update(len(png).to_bytes(8, "little"))
            h.update(png)
        h.update(json.dumps([prompt, self.model, self.template, self.mode]).encode())
        return h.hexdigest()

    def close(self) -> None:
        """Close the HTTP connections (the reward cannot be called after)."""
        self._client.close()

    def __enter__(self) -> RemoteReward:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"RemoteReward({self.model!r} at {self.url!r}, mode={self.mode!r}, range={self.value_range})"

    # -- requests

    def payload(self, pngs: list[bytes], prompt: str) -> dict:
        """The chat request body for one sample."""
        content: list[dict] = [{"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(p).decode()}}
                               for p in pngs]
        content.append({"type": "text", "text": self.template.replace("{prompt}", prompt)})
        body: dict[str, Any] = {"model": self.model, "messages": [{"role": "user", "content": content}], "temperature": 0.0}
        if self.mode == "text":
            body["max_tokens"] = TEXT_MAX_TOKENS
        else:
            body.update(max_tokens=1, logprobs=True, top_logprobs=TOP_LOGPROBS)
        return body

    def _score_all(self, items: dict[str, tuple[list[bytes], str]]) -> dict[str, float]:
        """Score every (frames, prompt) on the thread pool; the first error stops the batch. Every
        wait is bounded: past the worst case of tries, timeouts and backoff, it is an error."""
        workers = min(self.concurrency, len(items))
        rounds = math.ceil(len(items) / workers)
        one = (self.retries + 1) * 3 * self.timeout + self.backoff * (2 ** self.retries - 1) + 1.0
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="remote-reward")
        try:
            futures = {pool.submit(self._score_one, *item): key for key, item in items.items()}
            done, pending = wait(futures, timeout=rounds * one, return_when=FIRST_EXCEPTION)
            for fut in done:
                if fut.exception() is not None:
                    raise fut.exception()  # type: ignore[misc]
            if pending:
                raise self._error(f"no answer within {rounds * one:.0f} s for {len(pending)} of {len(items)} samples")
            return {futures[f]: f.result() for f in done}
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _score_one(self, pngs: list[bytes], prompt: str) -> float:
        with self._lock:
            self.stats.requests += 1
        t0 = time.perf_counter()
        body, raw = self._post(self.payload(pngs, prompt))
        score = self.read(body, raw)
        with self._lock:
            self.stats.latencies.append(time.perf_counter() - t0)
        return score

    def _post(self, payload: dict) -> tuple[Any, str]:
        """POST with retries; the parsed JSON and the raw text of the answer."""
        import httpx

        failure = ""
        for attempt in range(self.retries + 1):
            if attempt:
                with self._lock:
                    self.stats.retries += 1
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                resp = self._client.post(self.endpoint, json=payload)
            except httpx.ConnectError as e:
                failure = "connection refused" if "refused" in str(e).lower() else f"cannot connect ({excerpt(str(e), 80)})"
                continue
            except httpx.TimeoutException:
                failure = f"timed out (timeout {self.timeout:g} s)"
                continue
            except (httpx.NetworkError, httpx.RemoteProtocolError) as e:
                failure = f"connection dropped ({excerpt(str(e), 80) or type(e).__name__})"
                continue
            if resp.status_code in RETRY_STATUS:
                failure = f"HTTP {resp.status_code}: {server_message(resp)}"
                continue
            if resp.status_code >= 400:
                raise self._error(f"HTTP {resp.status_code}: {server_message(resp)}")
            try:
                return resp.json(), resp.text
            except ValueError:
                raise self._error(f"malformed answer (not JSON): {excerpt(resp.text)!r}") from None
        tries = self.retries + 1
        raise self._error(f"{failure} after {tries} {'try' if tries == 1 else 'tries'}"
                          + ("; is the server running?" if "connect" in failure or "refused" in failure else ""))

    def read(self, body: Any, raw: str = "") -> float:
        """The score in a chat completion ``body`` (``raw``: its text, for error messages), by ``mode``."""
        try:
            choice = body["choices"][0]
            assert isinstance(choice, dict)
        except (KeyError, IndexError, TypeError, AssertionError):
            raise self._error(f"malformed answer (no choices[0]): {excerpt(raw or json.dumps(body))!r}") from None
        if self.mode == "text":
            content = (choice.get("message") or {}).get("content")
            score = read_text(content) if isinstance(content, str) else None
            if score is None:
                raise self._error(f"malformed answer (no number or yes/no in the text): {excerpt(str(content))!r}")
            return score
        logprobs = choice.get("logprobs")
        content = logprobs.get("content") if isinstance(logprobs, dict) else None
        top = content[0].get("top_logprobs") if isinstance(content, list) and content and isinstance(content[0], dict) else None
        if not top:
            raise self._error(f"the server offered no logprobs, which mode {self.mode!r} reads; use mode 'text', or a "
                              "server that returns logprobs (vLLM: --max-logprobs 20)")
        try:
            score = (read_digits if self.mode == "digits" else read_yes_no)(top)
        except (TypeError, ValueError, KeyError, AttributeError, OverflowError):
            score, top = None, None
        if score is None:
            want = "a digit 1-9" if self.mode == "digits" else "yes or no"
            tokens = json.dumps([e.get("token") for e in top if isinstance(e, dict)]) if top else raw
            raise self._error(f"malformed answer (no top log-probability is {want}): {excerpt(tokens)!r}")
        return score

    def _error(self, what: str) -> UserError:
        return UserError(f"remote reward {self.url}: {what}")

    # -- the cache

    def _read_cache(self) -> dict[str, float]:
        """The cache file's scores; a malformed line (a torn last write) is skipped."""
        if self._cache_file is None or not self._cache_file.is_file():
            return {}
        cache = {}
        for line in self._cache_file.read_text(errors="replace").splitlines():
            try:
                row = json.loads(line)
                cache[str(row["key"])] = float(row["score"])
            except (ValueError, KeyError, TypeError):
                continue
        return cache

    def _remember(self, scores: dict[str, float]) -> None:
        with self._lock:
            self._cache.update(scores)
            if self._cache_file is not None:
                self._cache_file.parent.mkdir(parents=True, exist_ok=True)
                with open(self._cache_file, "a") as f:  # appended line by line: a crash tears at most the last line
                    f.writelines(json.dumps({"key": k, "score": v}) + "\n" for k, v in scores.items())


# ----------------------------------------------------------------------------- checks and factories


def _check_model(model: Any) -> str:
    if not isinstance(model, str) or not model.strip():
        raise UserError(f"remote reward: model must be the served model's name, got {model!r}")
    return model.strip()


def _check_url(url: Any) -> str:
    if not isinstance(url, str) or not re.match(r"^https?://[^/\s]+", url.strip()):
        raise UserError(f"remote reward: url must look like http://HOST:PORT/v1, got {url!r}")
    return url.strip().rstrip("/")


def _check_mode(mode: Any) -> str:
    if mode not in MODES:
        raise UserError(f"remote reward: mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def _check_template(template: Any) -> str:
    if not isinstance(template, str) or "{prompt}" not in template:
        raise UserError(f"remote reward: template must be text holding {{prompt}}, got {template!r}")
    return template


def _check_number(what: str, value: Any, kind: type, low: float, strict: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (kind is float or float(value) == int(value))
    if ok and math.isfinite(value) and (value > low if strict else value >= low):
        return kind(value)
    bound = f"{'above' if strict else 'at least'} {low:g}"
    raise UserError(f"remote reward: {what} must be {'an integer' if kind is int else 'a number'} {bound}, got {value!r}")


CONTEXT = ("low-res", "ground-truth")


def _check_context(context: Any) -> tuple[str, ...]:
    items = (context,) if isinstance(context, str) else tuple(context or ())
    bad = [c for c in items if c not in CONTEXT]
    if bad:
        raise UserError(f"remote reward option 'context' takes {' and '.join(CONTEXT)}, got {bad}")
    return items


def openai_reward(model: str | None = None, url: str | None = None, **options: Any) -> RemoteReward:
    """Remote vision-language judge over an OpenAI-compatible chat API (vLLM, SGLang); options as :class:`RemoteReward`."""
    if model is None or url is None:
        raise UserError("the openai reward needs model= and url= (or the spec openai:MODEL@http://HOST:PORT/v1)")
    known = {"template", "mode", "frames", "concurrency", "timeout", "retries", "backoff", "cache", "cache_file", "api_key", "name"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise UserError(f"remote reward: unknown options {unknown}; valid: model, url, {', '.join(sorted(known))}")
    return RemoteReward(model, url, **options)


def from_spec(spec: str, **options: Any) -> RemoteReward:
    """``openai:MODEL@URL`` (``openai:Qwen/Qwen2.5-VL-7B-Instruct@http://127.0.0.1:8000/v1``) with ``options``."""
    m = _SPEC.match(spec.strip()[len(PREFIX):])
    if m is None:
        raise UserError(f"reward spec {spec!r} must look like openai:MODEL@http://HOST:PORT/v1")
    for given in ("model", "url"):
        if given in options:
            raise UserError(f"reward spec {spec!r} names the {given} already; drop the {given!r} option")
    return openai_reward(m["model"], m["url"], name=options.pop("name", spec.strip()), **options)
