"""Rewards over HTTP: the ``openai:`` client against real servers on loopback (the reward server
of ``rewardiff serve-reward`` in a thread or a subprocess, and a small OpenAI-shaped server that
misbehaves on request), with no transport mocked."""

from __future__ import annotations

import asyncio
import base64
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from rewardiff.errors import UserError
from rewardiff.rewards import get_reward
from rewardiff.rewards.remote import RemoteReward
from rewardiff.rewards.server import RewardService, answer_logprobs, bind, build_app, digit_distribution, make_service
from rewardiff.rewards.wire import DIGITS_TEMPLATE, YES_NO_TEMPLATE, read_digits, read_text, read_yes_no, to_png
from tests import remote_rewards

ROOT = Path(__file__).resolve().parent.parent
FAST = dict(retries=2, backoff=0.02, timeout=5.0)  # quick retries for the failure tests


@contextmanager
def served(app):
    """Run ``app`` with uvicorn in a thread on a free loopback port; yields the API base URL."""
    import uvicorn

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="error", timeout_graceful_shutdown=1, lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        server.should_exit = True
        thread.join(5)
        sock.close()


def quantized(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the 8-bit grid a PNG carries, so the served reward sees exactly these pixels."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1


def unit(r: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    return ((r - lo) / (hi - lo)).clamp(0, 1)


# ----------------------------------------------------------------------------- the wire format by hand


def test_digit_distribution_has_the_asked_expectation_and_finite_logprobs():
    for u in (0.0, 0.03, 0.25, 0.5, 0.77, 1.0):
        p = digit_distribution(u)
        assert abs(sum(p) - 1) < 1e-12
        assert abs(sum(d * q for d, q in zip(range(1, 10), p)) - (1 + 8 * u)) < 1e-9
        token, entry = answer_logprobs(u, yes_no=False, k=20)
        assert all(math.isfinite(e["logprob"]) for e in entry["top_logprobs"]) and len(entry["top_logprobs"]) == 9
        assert abs(read_digits(entry["top_logprobs"]) - (1 + 8 * u)) < 1e-9
        assert abs(int(token) - (1 + 8 * u)) <= 1  # the content is the most likely digit, next to the mean
    p = digit_distribution(0.5)  # symmetric about 5: p_d = p_(10 - d)
    assert all(abs(p[i] - p[8 - i]) < 1e-12 for i in range(9)) and max(p) == p[4]
    _, entry = answer_logprobs(0.3, yes_no=True, k=20)
    assert abs(read_yes_no(entry["top_logprobs"]) - 0.3) < 1e-12


def test_reading_scores_by_hand():
    lp = math.log
    top = [{"token": "7", "logprob": lp(0.5)}, {"token": " 7", "logprob": lp(0.1)}, {"token": "3", "logprob": lp(0.2)},
           {"token": "x", "logprob": lp(0.15)}, {"token": "10", "logprob": lp(0.05)}]
    assert read_digits(top) == pytest.approx((7 * 0.6 + 3 * 0.2) / 0.8)  # 6.0: only 1..9 count, renormalised
    top = [{"token": "Yes", "logprob": lp(0.3)}, {"token": " no", "logprob": lp(0.1)}, {"token": "maybe", "logprob": lp(0.6)}]
    assert read_yes_no(top) == pytest.approx(0.75)
    assert read_digits([{"token": "a", "logprob": 0.0}]) is None and read_yes_no(top[2:]) is None
    assert read_text("Score: 7/9") == 7.0 and read_text(" Yes, it does.") == 1.0 and read_text("No.") == 0.0
    assert read_text("cannot tell") is None


# ----------------------------------------------------------------------------- the served reward read back


@pytest.fixture(scope="module")
def count_server():
    """``shapes-count`` served in a thread, with the server's default templates."""
    service = make_service("shapes-count")
    with served(build_app(service)) as url:
        yield url, service.reward, service.value_range


def _shapes_batch():
    """Shapes images from clean to half noise (rewards spread over the range), 8-bit, with their prompts."""
    from rewardiff.worlds.shapes.data import make_batch

    x, prompts, _ = make_batch(8, 1)
    a = torch.linspace(0, 1, 8)[:, None, None, None]
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return quantized((1 - a) * x + a * noise), prompts


def test_client_reads_back_the_served_reward_through_the_digit_identity(count_server):
    url, reward, (lo, hi) = count_server
    x, prompts = _shapes_batch()
    u = unit(reward(x, prompts), lo, hi)
    assert u.max() - u.min() > 0.5 and ((u > 0.1) & (u < 0.9)).sum() >= 3  # not all at an end: a wrong reading shows
    with get_reward(f"openai:shapes-count@{url}", concurrency=4) as client:
        assert client.value_range == (1.0, 9.0) and not client.differentiable
        got = client(x, prompts)
    assert torch.allclose(got, 1 + 8 * u, atol=1e-4), (got, 1 + 8 * u)
    with get_reward(f"openai:shapes-count@{url}", mode="yes-no") as client:
        assert client.value_range == (0.0, 1.0)
        assert torch.allclose(client(x, prompts), u, atol=1e-4)
    with get_reward(f"openai:shapes-count@{url}", mode="text") as client:  # the content: the most likely digit
        assert ((client(x, prompts) - (1 + 8 * u)).abs() <= 1).all()


def test_kept_alive_answers_do_not_wait_for_a_delayed_ack(count_server):
    """The server's socket is a TCP one asyncio sets TCP_NODELAY on; without it every answer on a
    kept-alive connection waited the peer's delayed ACK (40 ms on Linux)."""
    url, _, _ = count_server
    with httpx.Client(timeout=10) as c:
        c.get(url + "/models")
        times = []
        for _ in range(9):
            t0 = time.perf_counter()
            c.get(url + "/models")
            times.append(time.perf_counter() - t0)
    assert sorted(times)[4] < 0.025, times


def test_cache_hits_on_repeat_in_memory_and_on_disk(count_server, tmp_path):
    url, reward, (lo, hi) = count_server
    x, prompts = _shapes_batch()
    x, prompts = torch.cat([x[:3], x[:1]]), prompts[:3] + prompts[:1]  # the 4th repeats the 1st
    with RemoteReward("shapes-count", url, cache_file=tmp_path / "cache.jsonl") as client:
        first = client(x, prompts)
        assert (client.stats.requests, client.stats.cache_hits, len(client.stats.latencies)) == (3, 1, 3)
        again = client(x, prompts)
        assert torch.equal(first, again) and client.stats.requests == 3 and client.stats.cache_hits == 5
        client(x[:1], ["four red squares"])  # another prompt: not a hit
        assert client.stats.requests == 4
    with RemoteReward("shapes-count", url, cache_file=tmp_path / "cache.jsonl") as client:  # read back from the file
        assert torch.equal(client(x, prompts), first) and client.stats.requests == 0
    with RemoteReward("shapes-count", url, cache=False) as client:
        client(x, prompts)
        client(x, prompts)
        assert client.stats.requests == 6


def test_videos_send_their_key_frames_and_score_matches(tmp_path):
    service = make_service("tests.remote_rewards:frame_weighted")
    levels = torch.linspace(-0.9, 0.9, 20)  # a different brightness in every frame
    x = quantized(levels[None, None, :, None, None] + 0.05 * torch.randn(2, 3, 20, 8, 8, generator=torch.Generator().manual_seed(1)))
    x[1] = x[1].flip(1)  # the second video runs backwards
    fw = remote_rewards.frame_weighted
    with served(build_app(service)) as url:
        with RemoteReward("v", url) as client:  # frames 0, 5, 10, 15
            assert torch.allclose(client(x, ["a", "b"]), 1 + 8 * unit(fw(x[:, :, [0, 5, 10, 15]], []), -1, 1), atol=1e-4)
            short = x[:, :, :7]  # 7 frames: 0, 5, then 10 and 15 clipped to the last one, 6
            assert torch.allclose(client(short, ["a", "b"]), 1 + 8 * unit(fw(short[:, :, [0, 5, 6]], []), -1, 1), atol=1e-4)
            assert client.stats.requests == 4
        with RemoteReward("v", url, frames="all") as client:
            assert torch.allclose(client(x[:, :, :3], ["a", "b"]), 1 + 8 * unit(fw(x[:, :, :3], []), -1, 1), atol=1e-4)
        # /score: the reward itself, frames stacked on dim 1
        b64 = [[base64.b64encode(to_png(x[i, :, f])).decode() for f in (2, 9, 4)] for i in range(2)]
        got = httpx.post(url.removesuffix("/v1") + "/score", json={"prompts": ["a", "b"], "images": b64}, timeout=10).json()
        assert torch.allclose(torch.tensor(got["scores"]), fw(x[:, :, [2, 9, 4]], []), atol=1e-6)
        single = httpx.post(url.removesuffix("/v1") + "/score", json={"prompts": ["a"], "images": [b64[0][:1]]}, timeout=10).json()
        assert single["scores"][0] == pytest.approx(float(fw(x[:1, :, 2], [])[0]), abs=1e-6)


# ----------------------------------------------------------------------------- a server that misbehaves on request


def fake_vlm() -> FastAPI:
    """OpenAI-shaped answers chosen by the request's model name; counts requests in flight."""
    app = FastAPI()
    app.state.in_flight = app.state.peak = 0

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        model = body["model"]
        if model == "slow":
            await asyncio.sleep(3)
        if model == "garbage":
            return PlainTextResponse("<html>upstream proxy error</html>")
        if model == "fail":
            return JSONResponse({"error": {"message": "CUDA out of memory"}}, status_code=500)
        if model == "bad":
            return JSONResponse({"object": "error", "message": "At most 1 image(s) may be provided in one request"}, status_code=400)
        if model == "empty":
            return {"choices": []}
        app.state.in_flight += 1
        app.state.peak = max(app.state.peak, app.state.in_flight)
        await asyncio.sleep(0.1)
        app.state.in_flight -= 1
        token, entry = answer_logprobs(0.5, False, 20)
        if model == "nodigits":
            entry["top_logprobs"] = [{"token": "The", "logprob": -0.1}, {"token": "A", "logprob": -2.5}]
        logprobs = None if model == "nologprobs" else {"content": [entry]}
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": token}, "logprobs": logprobs}]}

    return app


@pytest.fixture(scope="module")
def fake():
    app = fake_vlm()
    with served(app) as url:
        yield url, app


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_concurrency_bound_is_respected(fake):
    url, app = fake
    for concurrency in (1, 3):
        app.state.peak = 0
        t0 = time.perf_counter()
        with RemoteReward("ok", url, concurrency=concurrency, cache=False) as client:
            assert torch.allclose(client(_images(9), ["p"] * 9), torch.full((9,), 5.0), atol=1e-6)
        assert app.state.peak == concurrency
        assert time.perf_counter() - t0 >= 0.1 * 9 / concurrency - 0.05


@pytest.mark.parametrize(("model", "mode", "needle", "tries"), [
    ("garbage", "digits", "malformed answer (not JSON): '<html>upstream proxy error</html>'", 1),
    ("empty", "digits", "malformed answer (no choices[0])", 1),
    ("nodigits", "digits", 'no top log-probability is a digit 1-9): \'["The", "A"]\'', 1),
    ("nodigits", "yes-no", "no top log-probability is yes or no", 1),
    ("nologprobs", "digits", "the server offered no logprobs, which mode 'digits' reads; use mode 'text'", 1),
    ("bad", "digits", "HTTP 400: At most 1 image(s) may be provided in one request", 1),
    ("fail", "digits", "HTTP 500: CUDA out of memory after 3 tries", 3),
])
def test_bad_answers_are_one_line_errors_naming_the_url(fake, model, mode, needle, tries):
    url, _ = fake
    with RemoteReward(model, url, mode=mode, **FAST) as client:
        with pytest.raises(UserError) as e:
            client(_images(1), ["p"])
    msg = str(e.value)
    assert msg.startswith(f"remote reward {url}: ") and needle in msg and "\n" not in msg, msg
    assert client.stats.retries == tries - 1


def test_text_mode_reads_a_server_without_logprobs(fake):
    url, _ = fake
    with RemoteReward("nologprobs", url, mode="text") as client:
        assert client(_images(1), ["p"]).item() == 5.0 and client.value_range is None


def test_a_slow_answer_times_out_after_the_retries(fake):
    url, _ = fake
    t0 = time.perf_counter()
    with RemoteReward("slow", url, timeout=0.3, retries=1, backoff=0.05) as client:
        with pytest.raises(UserError, match=re.escape(f"remote reward {url}: timed out (timeout 0.3 s) after 2 tries")):
            client(_images(1), ["p"])
    assert time.perf_counter() - t0 < 2.0 and client.stats.retries == 1


def test_connection_refused_on_a_closed_port():
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/v1"
    t0 = time.perf_counter()
    with RemoteReward("m", url, **FAST) as client:
        with pytest.raises(UserError, match=re.escape(f"remote reward {url}: connection refused after 3 tries; is the server running?")):
            client(_images(2), ["p", "q"])
    assert time.perf_counter() - t0 < 2.0


# ----------------------------------------------------------------------------- a server that dies


def _start_server(*args: str, port: int = 0) -> tuple[subprocess.Popen, str]:
    """``rewardiff serve-reward ARGS --port PORT`` in a subprocess; (process, API base URL) once it listens."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rewardiff", "serve-reward", *args, "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline() if ready else ""
    m = re.search(r" at (http://\S+/v1):", line)
    if m is None:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r}")
    return proc, m.group(1)


def test_a_killed_server_ends_the_run_with_the_error_after_the_retries():
    proc, url = _start_server("tests.remote_rewards:sleepy", "--range", "0,1")
    try:
        client = RemoteReward("sleepy", url, **FAST)
        x = quantized(_images(1, seed=3))
        assert client(x, ["a"]).item() == pytest.approx(1 + 8 * remote_rewards.sleepy(x, ["a"]).item(), abs=1e-4)
        errors: list[Exception] = []
        worker = threading.Thread(target=lambda: errors.append(pytest.raises(UserError, client, _images(1, 4), ["slow"]).value))
        worker.start()
        time.sleep(1.0)  # the request is in flight: the reward sleeps 3 s
        proc.kill()
        killed = time.perf_counter()
        worker.join(10)
        assert not worker.is_alive() and time.perf_counter() - killed < 3.0
        msg = str(errors[0])
        assert msg == f"remote reward {url}: connection refused after 3 tries; is the server running?", msg
        assert client.stats.retries == 2
        t0 = time.perf_counter()  # and between calls
        with pytest.raises(UserError, match="connection refused after 3 tries"):
            client(_images(1, 5), ["b"])
        assert time.perf_counter() - t0 < 2.0 and client.stats.retries == 4
        client.close()
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()


# ----------------------------------------------------------------------------- the server's own errors


def test_server_answers_400_off_template_and_500_for_a_failing_reward():
    x = quantized(_images(1))
    with served(build_app(make_service("tests.remote_rewards:broken", value_range="0,1"))) as url:
        with RemoteReward("broken", url, **FAST) as client, pytest.raises(UserError) as e:
            client(x, ["p"])
        assert "HTTP 500: reward 'tests.remote_rewards:broken' failed: RuntimeError: the reward model ran out of memory after 3 tries" in str(e.value)
    with served(build_app(RewardService(remote_rewards.frame_weighted, ["Score {prompt} now."], (-1, 1)))) as url:
        with RemoteReward("m", url, template="Rate {prompt}!", **FAST) as client, pytest.raises(UserError) as e:
            client(x, ["p"])
        assert "HTTP 400: the text 'Rate p!' does not match the server's template 'Score {prompt} now.'" in str(e.value)
        assert client.stats.retries == 0
        with RemoteReward("m", url, template="Score {prompt} now.") as client:  # the template's yes/no-ness decides the answer
            assert client(x, ["p"]).item() == pytest.approx(1 + 8 * unit(remote_rewards.frame_weighted(x, []), -1, 1).item(), abs=1e-4)
    with served(build_app(make_service("tests.remote_rewards:unranged"))) as url:
        with RemoteReward("m", url) as client, pytest.raises(UserError, match="has no value range.*restart the server with --range LO,HI"):
            client(x, ["p"])
        got = httpx.post(url.removesuffix("/v1") + "/score", json={"prompts": ["a"], "images": [["not base64!"]]}, timeout=10)
        assert got.status_code == 400 and "images[0][0]: not a base64 image" in got.json()["error"]["message"]
        assert httpx.get(url.removesuffix("/v1") + "/health", timeout=10).json()["status"] == "ok"
        assert httpx.get(url + "/models", timeout=10).json()["data"][0]["id"] == "tests.remote_rewards:unranged"


def test_default_templates_are_the_clients():
    service = make_service("brightness")
    assert service.match(DIGITS_TEMPLATE.replace("{prompt}", "two red circles")) == ("two red circles", False)
    assert service.match(YES_NO_TEMPLATE.replace("{prompt}", "a cat")) == ("a cat", True)


# ----------------------------------------------------------------------------- specs and the command


def test_specs_and_options_are_checked():
    r = get_reward("openai:Qwen/Qwen2.5-VL-7B-Instruct@http://127.0.0.1:8000/v1", mode="yes-no", frames="all")
    assert (r.model, r.url, r.endpoint) == ("Qwen/Qwen2.5-VL-7B-Instruct", "http://127.0.0.1:8000/v1",
                                            "http://127.0.0.1:8000/v1/chat/completions")
    assert r.name == "openai:Qwen/Qwen2.5-VL-7B-Instruct@http://127.0.0.1:8000/v1" and r.frames == "all"
    assert get_reward("openai", model="m", url="http://h:1/v1").value_range == (1.0, 9.0)
    for spec, options, needle in [
        ("openai:no-url", {}, "must look like openai:MODEL@http://HOST:PORT/v1"),
        ("openai", {}, "needs model= and url="),
        ("openai:m@http://h:1/v1", {"mode": "stars"}, "mode must be one of digits, yes-no, text"),
        ("openai:m@http://h:1/v1", {"template": "no placeholder"}, "must be text holding {prompt}"),
        ("openai:m@http://h:1/v1", {"frames": (0, -1)}, "non-negative frame indices"),
        ("openai:m@http://h:1/v1", {"concurrency": 0}, "concurrency must be an integer at least 1"),
        ("openai:m@http://h:1/v1", {"timeout": 0}, "timeout must be a number above 0"),
        ("openai:m@http://h:1/v1", {"speed": 3}, "unknown options ['speed']"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            get_reward(spec, **options)


def _main(args, monkeypatch, capsys):
    from rewardiff.cli import main

    monkeypatch.setattr(sys, "argv", ["rewardiff", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


def test_serve_reward_command_errors_are_one_line(monkeypatch, capsys):
    taken = bind("127.0.0.1", 0)
    port = str(taken.getsockname()[1])
    try:
        for args, needle in [(["nosuch"], "unknown reward 'nosuch'"), (["brightness", "--range", "1,x"], "--range must be LO,HI"),
                             (["brightness", "--range", "2,1"], "finite LO < HI"),
                             (["brightness", "--port", port], f"port {port} on 127.0.0.1 is in use")]:
            code, err = _main(["serve-reward", *args], monkeypatch, capsys)
            assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
    finally:
        taken.close()


# ----------------------------------------------------------------------------- a training run whose server dies


def test_a_training_run_whose_reward_server_dies_stops_naming_the_url_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """DDPO on the served reward: the server crashes at step 4; the run stops with the client's
    one-line error (the URL, the retries) and the step, keeps its step-2 checkpoint, and resumes
    to the end once a server answers again, bit for bit as a run that never lost it."""
    from rewardiff.finetune.trainer import finetune
    from rewardiff.rewards.guard import RewardFailure
    from tests.helpers import blackbox_cfg

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}/v1"
    cfg = blackbox_cfg(tiny_model_dir, reward=f"openai:mortal@{url}", steps=6)

    def start(die_after: int) -> subprocess.Popen:
        monkeypatch.setenv("REWARDIFF_TEST_DIE_AFTER", str(die_after))
        proc, got = _start_server("tests.remote_rewards:mortal", "--range", "0,1", port=port)
        assert got == url
        return proc

    proc = start(4 + 3 * 2)  # the evaluation before training (4 samples), then 2 a step: dies at step 4
    try:
        t0 = time.perf_counter()
        with pytest.raises(RewardFailure) as e:
            finetune(cfg, tmp_path / "run", progress=False)
        assert time.perf_counter() - t0 < 60
        msg = str(e.value)
        assert "\n" not in msg and f"remote reward {url}: " in msg and "at step 4" in msg, msg
        assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step-000002"
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    proc = start(0)
    try:
        finetune(cfg, tmp_path / "run", resume=True, progress=False)
        finetune(cfg, tmp_path / "straight", progress=False)
    finally:
        proc.kill()
        proc.wait(10)
        proc.stdout.close()
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "run" / "checkpoints" / "step-000006" / "trainable.safetensors"))
    b = load_file(str(tmp_path / "straight" / "checkpoints" / "step-000006" / "trainable.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------- context images (super-resolution judges)


def test_context_images_go_first_and_the_server_can_score_the_last_only(tmp_path):
    """With ``context: [low-res, ground-truth]`` the client sends the prompt's input and truth before
    the sample; a server started with ``last_image`` scores the sample alone, reading the truth from
    the prompt, and the client reads back that reward."""
    from rewardiff.rewards.wire import from_png

    low, high = quantized(_images(1, 7)[0]), quantized(torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(8)) * 2 - 1)
    for name, im in (("low.png", low), ("high.png", high)):
        (tmp_path / name).write_bytes(to_png(im))
    prompt = f"a square | file:{tmp_path / 'low.png'};gt={tmp_path / 'high.png'}"
    x = quantized(torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1)
    x[1] = high  # the second sample is the truth itself
    service = make_service("tests.remote_rewards:truth_match", last_image=True)
    with served(build_app(service)) as url:
        client = RemoteReward("truth", url, context=("low-res", "ground-truth"), **FAST)
        sent = client.payload([to_png(low), to_png(high), to_png(x[0])], prompt)["messages"][0]["content"]
        assert [p["type"] for p in sent] == ["image_url"] * 3 + ["text"]
        got = client(x, [prompt, prompt])
        expected = 1 + 8 * remote_rewards.truth_match(x, [prompt, prompt])
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
        assert got[1].item() == pytest.approx(9.0, abs=1e-4)
        body = client.payload([to_png(c) for c in client._context_images(prompt)] + [to_png(x[0])], prompt)
        decoded = [from_png(base64.b64decode(p["image_url"]["url"].split(",", 1)[1])) for p in body["messages"][0]["content"][:3]]
        torch.testing.assert_close(decoded[0], low, atol=1e-6, rtol=0)
        torch.testing.assert_close(decoded[1], high, atol=1e-6, rtol=0)
        client.close()
    # without last_image the server stacks the three images of different sizes: a one-line 400
    with served(build_app(make_service("tests.remote_rewards:truth_match"))) as url:
        with RemoteReward("truth", url, context=("low-res", "ground-truth"), **FAST) as client:
            with pytest.raises(UserError, match="frames of different sizes"):
                client(x[:1], [prompt])
    with pytest.raises(UserError, match="'context' takes low-res and ground-truth"):
        RemoteReward("m", "http://127.0.0.1:1/v1", context=("truth",))
