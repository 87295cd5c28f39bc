"""Kill a fine-tuning run anywhere, resume it, again and again: it must end bit for bit where the
uninterrupted run ends, and no checkpoint may ever be unloadable.

    python benchmarks/kill_campaign.py --methods draft-k,ddpo,vard,gumbel --kills 20 --out benchmarks/results/kill_campaign
    python benchmarks/kill_campaign.py --two-process --kills 3      # one rank of two killed

For each method a small run goes straight through once (the reference). Then the same run is
started, SIGKILLed, resumed with ``--resume``, SIGKILLed again, ``--kills`` times, then left to
finish. Half of the kills come at a random moment (uniform over the reference run's duration);
the other half at a named point, by a wrapper that sends SIGKILL to its own process when the
point is reached for the n-th time (n drawn at random):

- ``step``: at the start of a training step;
- ``evaluation``: at the start of an evaluation (before, during training, after);
- ``weights-written``: inside a checkpoint write, after the weights, before the optimizer state;
- ``before-state``: before the checkpoint's ``state.json``;
- ``before-latest``: after the checkpoint folder is in place, before ``latest`` names it;
- ``metrics``: while the metrics log is rewritten on resume.

After every kill each checkpoint folder is loaded (weights, optimizer, state, the method's own
files) and ``latest`` must name one of them. At the end the final weights, the last
checkpoint's files (optimizer, ``ddpo_stats.json``, the VARD value model) and the metrics
(without the timings) must equal the reference's, and no temporary file may remain. Writes
``tally.json`` and ``tally.md`` to ``--out``.

``--two-process``: the same with ``torchrun --nproc_per_node 2`` (CPU, gloo) on a tiny random
Stable Diffusion pipeline: one rank is SIGKILLed at a random moment; the launcher must end the
survivor within ``--bound`` seconds (never a hang), and the resumed run must end bit for bit
where the uninterrupted two-process run does.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

COMMON = ["steps=8", "batch_size=2", "num_inference_steps=4", "eval_samples=4", "eval_every=4", "checkpoint_every=2", "seed=1",
          "lr=1e-3"]
METHODS = {
    "draft-k": ["model=shapes", "reward=shapes-count", "method=draft-k", "k=2", "lora_rank=4", "lora_alpha=4"],
    "ddpo": ["model=shapes", "reward=jpeg-compressibility", "method=ddpo", "eta=1", "ppo_minibatches=2", "stat_buffer=4",
             "stat_min_count=2", "lora_rank=4", "lora_alpha=4"],
    "vard": ["model=shapes", "reward=shapes-count", "method=vard", "eta=1", "vard_warmup=8", "vard_warmup_steps=10",
             "vard_value_steps=2", "kl_weight=1e-3", "lora_rank=4", "lora_alpha=4"],
    "gumbel": ["model=molecules-ar", "reward=chem-rm-qed", "method=gumbel", "lora_rank=4", "lora_alpha=4", "guidance_scale=1"],
}
POINTS = ["step", "evaluation", "weights-written", "before-state", "before-latest", "metrics"]

# Run by the child: arm one named point, then run the command line as the console script does.
WRAPPER = r"""
import os, signal, sys
point, n = os.environ["KILL_POINT"], int(os.environ["KILL_AT"])
from rewardiff.finetune import trainer
count = [0]
def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
def around(owner, name, when=lambda *a, **k: True):
    orig = getattr(owner, name)
    def wrapped(*a, **k):
        if when(*a, **k):
            hit()
        return orig(*a, **k)
    setattr(owner, name, wrapped)
if point == "step":
    around(trainer.Run, "train_step")
elif point == "evaluation":
    around(trainer.Run, "evaluate")
elif point == "weights-written":
    around(trainer, "atomic_write", lambda path, *a, **k: str(path).endswith("optimizer.pt"))
elif point == "before-state":
    around(trainer, "atomic_write_text", lambda path, *a, **k: str(path).endswith("state.json"))
elif point == "before-latest":
    around(trainer, "atomic_write_text", lambda path, *a, **k: str(path).endswith("latest"))
elif point == "metrics":
    around(trainer, "truncate_jsonl")
from rewardiff.cli import main
sys.argv = ["rewardiff", *sys.argv[1:]]
main()
"""


def env() -> dict[str, str]:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1")
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), e.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return e


def command(method: str, out: Path, resume: bool, overrides: tuple[str, ...] = ()) -> list[str]:
    sets = [a for kv in COMMON + METHODS[method] + list(overrides) for a in ("--set", kv)]
    return ["finetune", *sets, "--out", str(out), *(["--resume"] if resume else [])]


def run_straight(method: str, out: Path, overrides: tuple[str, ...] = ()) -> float:
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "rewardiff", *command(method, out, False, overrides)], env=env(), capture_output=True,
                         text=True)
    if res.returncode != 0:
        raise SystemExit(f"{method}: the reference run failed:\n{res.stderr[-2000:]}")
    return time.perf_counter() - t0


def checkpoint_problems(out: Path, method: str) -> list[str]:
    """What is wrong with the checkpoints in ``out`` (empty: every one loads, latest names one)."""
    import torch
    from safetensors.torch import load_file

    root = out / "checkpoints"
    problems = []
    folders = sorted(p for p in root.glob("step-*")) if root.is_dir() else []
    for d in folders:
        try:
            load_file(str(d / "trainable.safetensors"))
            torch.load(d / "optimizer.pt", weights_only=True)
            int(json.loads((d / "state.json").read_text())["step"])
            if method == "ddpo":
                json.loads((d / "ddpo_stats.json").read_text())
            if method == "vard":
                load_file(str(d / "value.safetensors"))
                torch.load(d / "value_optimizer.pt", weights_only=True)
        except Exception as e:  # any failure to load is what this campaign looks for
            problems.append(f"{d.name}: {type(e).__name__}: {str(e)[:120]}")
    latest = root / "latest"
    if latest.is_file() and not (root / latest.read_text().strip()).is_dir():
        problems.append(f"latest names {latest.read_text().strip()!r}, which is not a checkpoint folder")
    return problems


def strays(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".tmp-"))


def same_files(a: Path, b: Path, method: str) -> dict[str, bool]:
    """Whether the runs in ``a`` and ``b`` ended the same: weights, last checkpoint, metrics."""
    import torch
    from safetensors.torch import load_file

    def tensors_equal(x: Path, y: Path) -> bool:
        p, q = load_file(str(x)), load_file(str(y))
        return p.keys() == q.keys() and all(torch.equal(p[k], q[k]) for k in p)

    def last(d: Path) -> Path:
        return d / "checkpoints" / (d / "checkpoints" / "latest").read_text().strip()

    def metrics(d: Path) -> list[dict]:
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]

    out = {"final weights": tensors_equal(a / "final" / "trainable.safetensors", b / "final" / "trainable.safetensors"),
           "optimizer": (lambda x, y: all(torch.equal(x["state"][i][k], y["state"][i][k]) for i in x["state"] for k in x["state"][i]))(
               torch.load(last(a) / "optimizer.pt", weights_only=True), torch.load(last(b) / "optimizer.pt", weights_only=True)),
           "metrics": metrics(a) == metrics(b)}
    if method == "ddpo":
        out["ddpo statistics"] = (last(a) / "ddpo_stats.json").read_text() == (last(b) / "ddpo_stats.json").read_text()
    if method == "vard":
        out["value model"] = tensors_equal(last(a) / "value.safetensors", last(b) / "value.safetensors")
    return out


def campaign(method: str, kills: int, out: Path, rng: random.Random, overrides: tuple[str, ...] = (),
             points: list[str] = POINTS) -> dict:
    """``kills`` SIGKILLs of ``method``'s run, in cycles: a cycle kills and resumes one run until
    it finishes, then compares it with the reference; the next cycle starts afresh. Every
    second kill is at one of ``points`` in turn; ``overrides`` (key=value) change the run."""
    import shutil

    straight, killed = out / f"{method}-straight", out / f"{method}-killed"
    shutil.rmtree(straight, ignore_errors=True)
    duration = run_straight(method, straight, overrides)
    log: list[dict] = []
    problems: list[str] = []
    cycles: list[dict] = []
    done_kills = attempt = 0
    while done_kills < kills:
        shutil.rmtree(killed, ignore_errors=True)
        finished = False
        while not finished:
            resume = (killed / "config.yaml").is_file()
            args = command(method, killed, resume, overrides)
            if done_kills < kills and attempt % 2 == 1:  # a named point, reached for the n-th time
                point = points[(attempt // 2) % len(points)]
                n = rng.randint(1, {"step": 8, "evaluation": 3, "metrics": 1}.get(point, 4))
                p = subprocess.Popen([sys.executable, "-c", WRAPPER, *args], env={**env(), "KILL_POINT": point, "KILL_AT": str(n)},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                kind, code = f"{point} #{n}", p.wait()
            elif done_kills < kills:  # a random moment
                p = subprocess.Popen([sys.executable, "-m", "rewardiff", *args], env=env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
                delay = rng.uniform(0.0, duration)
                try:
                    code = p.wait(timeout=delay)
                except subprocess.TimeoutExpired:
                    p.send_signal(signal.SIGKILL)
                    code = p.wait()
                kind = f"random at {delay:.1f} s"
            else:  # left to finish
                p = subprocess.Popen([sys.executable, "-m", "rewardiff", *args], env=env(), stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
                kind, code = "to the end", p.wait()
            err = p.stderr.read() if p.stderr else ""
            attempt += 1
            done_kills += code == -signal.SIGKILL
            problems += [f"after {kind}: {x}" for x in checkpoint_problems(killed, method)]
            latest = killed / "checkpoints" / "latest"
            log.append({"cycle": len(cycles) + 1, "attempt": attempt, "kind": kind, "exit": code, "resumed": resume,
                        "latest": latest.read_text().strip() if latest.is_file() else None})
            print(f"  {method} cycle {len(cycles) + 1} attempt {attempt:2d}: {kind:22s} exit {code:4d}  latest {log[-1]['latest']}",
                  flush=True)
            if code not in (0, -signal.SIGKILL):
                problems.append(f"after {kind}: exit status {code}: {err.strip()[-300:]}")
                return {"method": method, "kills": done_kills, "attempts": attempt, "reference_seconds": duration,
                        "cycles": cycles, "all_identical": False, "identical": {}, "unloadable": problems, "strays": [], "log": log}
            finished = code == 0
        cycles.append({"kills": sum(1 for r in log if r["cycle"] == len(cycles) + 1 and r["exit"] == -signal.SIGKILL),
                       "identical": same_files(killed, straight, method), "strays": strays(killed)})
    same = {k: all(c["identical"][k] for c in cycles) for k in cycles[0]["identical"]} if cycles else {}
    return {"method": method, "kills": done_kills, "attempts": attempt, "reference_seconds": duration, "cycles": cycles,
            "identical": same, "all_identical": bool(same) and all(same.values()), "unloadable": problems,
            "strays": [x for c in cycles for x in c["strays"]], "log": log}


def two_process(kills: int, out: Path, rng: random.Random, bound: float) -> dict:
    """One rank of a two-process torchrun run SIGKILLed; the survivor must end within ``bound``."""
    import shutil

    sys.path.insert(0, str(ROOT))
    from rewardiff.models.sd import tiny_pipeline

    base = out / "two-process"
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    prompts = base / "prompts.txt"
    prompts.write_text("a photo of a cat\na red dog\na blue bird\na green tree\n")
    pipe = tiny_pipeline(base / "pipe")
    script = ROOT / "tests" / "mp_finetune.py"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    steps = "12"
    t0 = time.perf_counter()
    subprocess.run([*launcher, str(script), str(pipe), str(prompts), str(base / "straight"), steps], env=env(), check=True,
                   capture_output=True)
    duration = time.perf_counter() - t0
    run_dir = base / "killed"
    log, problems = [], []
    for attempt in range(kills + 1):
        resume = (run_dir / "config.yaml").is_file()
        for stale in run_dir.glob("rank*.pid"):  # a pid of an earlier attempt names no process of this one
            stale.unlink()
        p = subprocess.Popen([*launcher, str(script), str(pipe), str(prompts), str(run_dir), steps, *(["resume"] if resume else [])],
                             env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if attempt == kills:
            code = p.wait()
            log.append({"attempt": attempt + 1, "kind": "to the end", "exit": code})
            if code != 0:
                problems.append(f"final run: exit {code}: {p.stderr.read()[-500:]}")
            break
        delay = rng.uniform(0.3, 0.8) * duration
        time.sleep(delay)
        pid_file = run_dir / "rank1.pid"
        if p.poll() is not None or not pid_file.is_file():
            p.wait()
            log.append({"attempt": attempt + 1, "kind": f"rank 1 at {delay:.1f} s: finished first", "exit": p.returncode})
            continue
        try:
            os.kill(int(pid_file.read_text()), signal.SIGKILL)
        except ProcessLookupError:  # rank 1 was done; rank 0 finishing
            p.wait()
            log.append({"attempt": attempt + 1, "kind": f"rank 1 at {delay:.1f} s: finished first", "exit": p.returncode})
            continue
        t_kill = time.perf_counter()
        try:
            code = p.wait(timeout=bound)
            ended = time.perf_counter() - t_kill
        except subprocess.TimeoutExpired:
            p.kill()
            code, ended = p.wait(), None
            problems.append(f"attempt {attempt + 1}: the surviving rank was still running {bound:.0f} s after rank 1 died")
        log.append({"attempt": attempt + 1, "kind": f"rank 1 at {delay:.1f} s", "exit": code,
                    "survivor_ended_after_s": ended})
        problems += [f"after attempt {attempt + 1}: {x}" for x in checkpoint_problems(run_dir, "draft-k")]
        print(f"  two-process {attempt + 1}: rank 1 killed at {delay:.1f} s; launcher ended {ended and round(ended, 1)} s later", flush=True)
    from safetensors.torch import load_file
    import torch

    same = None
    if (run_dir / "rank0.safetensors").is_file():
        a, b = load_file(str(run_dir / "rank0.safetensors")), load_file(str(base / "straight" / "rank0.safetensors"))
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {"method": "draft-k, 2 processes (torchrun, gloo)", "kills": sum(1 for r in log if "rank 1 at" in r["kind"]
                                                                           and "finished" not in r["kind"]),
            "reference_seconds": duration, "identical": {"final weights": bool(same)}, "all_identical": bool(same),
            "unloadable": problems, "log": log, "bound_s": bound,
            "max_survivor_s": max([r.get("survivor_ended_after_s") or 0 for r in log], default=0)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", default="draft-k,ddpo,vard,gumbel")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--two-process", action="store_true", help="the two-process campaign instead")
    ap.add_argument("--bound", type=float, default=120.0, help="seconds the survivor of a killed rank may take to end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "kill_campaign")
    a = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    from rewardiff.provenance import stamp
    from rewardiff.report.strict import write_json

    rng = random.Random(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    results = [two_process(a.kills, a.out, rng, a.bound)] if a.two_process else [campaign(m, a.kills, a.out, rng) for m in a.methods.split(",")]
    name = "two_process" if a.two_process else "tally"
    cmd = "python benchmarks/kill_campaign.py " + (f"--two-process --kills {a.kills}" if a.two_process else f"--methods {a.methods} --kills {a.kills}")
    write_json(a.out / f"{name}.json", {"command": cmd, **stamp(), "results": results})
    lines = ["| run | SIGKILLs | final state bit-identical | unloadable checkpoints or failures | stray temporary files |", "|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['method']} | {r['kills']} | {'yes' if r['all_identical'] else 'NO: ' + str(r['identical'])} | "
                     f"{len(r['unloadable'])} | {len(r.get('strays', []))} |")
    (a.out / f"{name}.md").write_text("\n".join(lines) + f"\n\n`{cmd}`; {stamp()['date']}, {_machine(stamp()['machine'])}\n")
    print("\n".join(lines))
    return 0 if all(r["all_identical"] and not r["unloadable"] and not r.get("strays") for r in results) else 1


def _machine(m: dict) -> str:
    return f"{m['cpus']}-core {m['processor']} CPU{', ' + m['gpu'] if m.get('gpu') else ''}, torch {m['torch']}"


if __name__ == "__main__":
    sys.exit(main())
