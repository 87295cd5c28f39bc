"""Throughput of the remote reward client against the served ``shapes-count`` reward on loopback,
and how long a run takes to stop when the server dies.

A ``rewardiff serve-reward shapes-count --port 0`` subprocess serves the learned shapes reward
model; the client (``openai:shapes-count@URL``, digits mode) scores 32x32 shapes images in
batches of ``--batch`` at concurrency 1, 4 and 16: requests per second and latency p50/p90/p99,
once without the cache (every sample a request) and once repeating a batch the cache holds.
Then the server is SIGKILLed while a run scores batch after batch, and the time from the kill
to the client's one-line error is measured with retries 0 and 3 (backoff 0.5 s doubling).

    python benchmarks/remote_reward.py --images 256 --batch 32
"""

from __future__ import annotations

import argparse
import os
import re
import select
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "benchmarks" / "results" / "remote_reward.json"


def start_server() -> tuple[subprocess.Popen, str]:
    """``rewardiff serve-reward shapes-count --port 0``; (process, API base URL) once it listens."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rewardiff", "serve-reward", "shapes-count", "--port", "0"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 120)
    line = proc.stdout.readline() if ready else ""
    m = re.search(r" at (http://\S+/v1):", line)
    if m is None:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}")
    return proc, m.group(1)


def percentiles(values: list[float]) -> dict:
    """p50, p90, p99 in milliseconds."""
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50_ms": 1e3 * q[49], "p90_ms": 1e3 * q[89], "p99_ms": 1e3 * q[98]}


def throughput(url: str, x, prompts: list[str], concurrency: int, batch: int) -> dict:
    """Requests per second and latencies without the cache, then the same batches again from the cache."""
    from rewardiff.rewards.remote import RemoteReward

    row = {"concurrency": concurrency}
    with RemoteReward("shapes-count", url, concurrency=concurrency, cache=False) as client:
        client(x[:batch], prompts[:batch])  # warm the connections and the server's model
        client.stats.latencies.clear()
        t0 = time.perf_counter()
        for i in range(0, len(prompts), batch):
            client(x[i:i + batch], prompts[i:i + batch])
        seconds = time.perf_counter() - t0
        row["uncached"] = {"samples": len(prompts), "seconds": seconds, "requests_per_s": len(prompts) / seconds,
                           **percentiles(client.stats.latencies)}
    with RemoteReward("shapes-count", url, concurrency=concurrency) as client:
        for i in range(0, len(prompts), batch):
            client(x[i:i + batch], prompts[i:i + batch])
        calls = []
        for i in range(0, len(prompts), batch):
            t0 = time.perf_counter()
            client(x[i:i + batch], prompts[i:i + batch])
            calls.append(time.perf_counter() - t0)
        row["cached"] = {"samples": len(prompts), "seconds": sum(calls), "samples_per_s": len(prompts) / sum(calls),
                         "batch_p50_ms": 1e3 * statistics.median(calls), "cache_hits": client.stats.cache_hits,
                         "requests": client.stats.requests}
    return row


def time_to_error(x, prompts: list[str], retries: int, batch: int) -> dict:
    """A run scoring batch after batch; the server is killed 1 s in; seconds from the kill to the error."""
    from rewardiff.errors import UserError
    from rewardiff.rewards.remote import RemoteReward

    proc, url = start_server()
    client = RemoteReward("shapes-count", url, retries=retries, backoff=0.5, timeout=10.0, cache=False)
    client(x[:batch], prompts[:batch])  # the server is up and its model loaded
    outcome: dict = {}

    def run() -> None:
        try:
            while True:
                client(x[:batch], prompts[:batch])
        except UserError as e:
            outcome["at"], outcome["error"] = time.perf_counter(), str(e)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    time.sleep(1.0)
    proc.kill()
    killed = time.perf_counter()
    worker.join(60)
    proc.wait(10)
    client.close()
    return {"retries": retries, "backoff_s": 0.5, "seconds_to_error": outcome["at"] - killed if outcome else None,
            "error": outcome.get("error", "no error within 60 s")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256, help="distinct images scored per concurrency")
    ap.add_argument("--batch", type=int, default=32, help="samples per reward call")
    ap.add_argument("--concurrency", default="1,4,16")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import torch

    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json
    from rewardiff.worlds.shapes.data import make_batch

    torch.set_num_threads(1)
    x, prompts, _ = make_batch(args.images, seed=0)
    proc, url = start_server()
    try:
        rows = []
        for c in (int(v) for v in args.concurrency.split(",")):
            rows.append(throughput(url, x, prompts, c, args.batch))
            u, k = rows[-1]["uncached"], rows[-1]["cached"]
            print(f"concurrency {c:2d}: {u['requests_per_s']:6.1f} requests/s, p50 {u['p50_ms']:.1f} ms, p90 {u['p90_ms']:.1f} ms, "
                  f"p99 {u['p99_ms']:.1f} ms; cached {k['samples_per_s']:.0f} samples/s", flush=True)
    finally:
        proc.kill()
        proc.wait(10)
    deaths = [time_to_error(x, prompts, r, args.batch) for r in (0, 3)]
    for d in deaths:
        print(f"server killed, retries {d['retries']}: error after {d['seconds_to_error']:.2f} s: {d['error']}", flush=True)
    result = {"command": " ".join(["python benchmarks/remote_reward.py", *sys.argv[1:]]), "reward": "shapes-count",
              "image_size": list(x.shape[1:]), "images": args.images, "batch": args.batch, "throughput": rows,
              "server_death": deaths, **stamp(),
              "note": "server and client on the same machine (loopback); the server is one process running the reward under a lock"}
    write_json(OUT, result)
    print(f"written {OUT}")


if __name__ == "__main__":
    main()
