"""rewardiff's AlignProp against trl 0.23.1's ``AlignPropTrainer``: seconds per step and peak memory.

Both train LoRA adapters of the same locally saved tiny Stable Diffusion pipeline (built once
with ``rewardiff.models.sd.tiny_pipeline``) at equal settings: resolution, DDIM steps, eta,
guidance scale, batch, LoRA rank, alpha and target modules, learning rate, weight decay,
gradient clipping and the reward (differentiable brightness of the decoded image). Two
truncations: K = 1 (only the last denoising step carries gradient) and randomized.

Each (tool, configuration) runs in a fresh process, one at a time, with the same thread
count (``OMP_NUM_THREADS``, default 1). trl runs in its own virtual environment
(``benchmarks/.venv-trl``, created on first use: ``torch==2.13.0`` first, then ``trl==0.23.1``
and the same diffusers / peft / accelerate / transformers versions as this environment,
under a constraint that keeps torch) through ``benchmarks/trl_worker.py``; rewardiff runs
through ``finetune()`` in this environment. Seconds per step are the median over the timed
steps after the warm-up steps; peak memory is the process's resident high-water mark
(``VmHWM``) read right after the last training step, next to the resident size just before
the first one.

    .venv/bin/python benchmarks/trl_side_by_side.py --steps 30 --warmup 3

Known inequalities (also written to results.json):
- randomized truncation: rewardiff draws one K uniform in [1, T] per step and backpropagates
  through the last K steps; trl (``truncated_rand_backprop_minmax=(0, T)``) draws a new cut
  r uniform in [0, T] at every denoising step i and keeps that step's gradient when i >= r, so
  its gradient steps are not one contiguous window (on average T/2 of them against
  (T + 1)/2). The mean number of UNet calls with gradient per step is recorded for both.
- gradient checkpointing: both checkpoint every denoising step that carries gradient;
  rewardiff's unit is the whole guided DDIM step, trl's the UNet call. rewardiff also
  checkpoints the VAE decode; trl does not. trl also runs the UNet calls without gradient
  under autograd (checkpointed), rewardiff under ``torch.no_grad``.
- LoRA targets: trl hardcodes r = 4, alpha = 4 on to_q/to_k/to_v/to_out.0; rewardiff's
  default targets (also the ResNet convolutions, proj_in/out, time_emb_proj) are narrowed to
  those four here, in this benchmark's process only.
- text encoding: trl encodes the negative (empty) prompt once at start-up; rewardiff encodes
  the empty prompt at every step (a two-layer text model here: negligible).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROMPTS = ["a photo of a cat", "a red dog", "a blue bird on a tree", "a small green house"]
TRL_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
MATCHED_PACKAGES = ["diffusers", "peft", "accelerate", "transformers"]


sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_worker import _status_mb  # noqa: E402  (the worker imports trl only when it runs)


# ---------------------------------------------------------------------- rewardiff's side (worker)

def run_ours(s: dict) -> dict:
    """One timed rewardiff AlignProp run (in its own process); the same JSON as trl_worker.py."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import rewardiff.finetune.trainer as trainer
    import rewardiff.finetune.weights as weights
    from rewardiff.finetune.config import FinetuneConfig

    weights.LORA_TARGETS = list(TRL_LORA_TARGETS)  # the modules trl's pipeline adapts (this process only)
    T = int(s["num_inference_steps"])
    total = int(s["warmup"]) + int(s["steps"])
    record = {"seconds": [], "rss_before": None, "peak": None, "params": None}
    original = trainer.Run.train_step

    def timed_step(self, step):  # wall time of the whole call, the same boundary as trl's trainer.step
        if record["rss_before"] is None:
            record["rss_before"] = _status_mb("VmRSS")
            record["params"] = sum(p.numel() for p in self.model.net.parameters() if p.requires_grad)
        t0 = time.perf_counter()
        row = original(self, step)
        record["seconds"].append(time.perf_counter() - t0)
        record["peak"] = _status_mb("VmHWM")
        return row

    trainer.Run.train_step = timed_step
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(s["prompts"]) + "\n")
        trunc = ({"truncation": "gaussian", "truncation_mean": (T - 1) / T, "truncation_std": 0.0}  # K = 1 every step
                 if s["truncation"] == "k1" else {"truncation": "uniform"})
        cfg = FinetuneConfig(
            model=f"diffusers:{s['pipeline']}", reward="brightness", method="alignprop", steps=total,
            batch_size=int(s["batch_size"]), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]), lora_rank=4,
            lora_alpha=4.0, num_inference_steps=T, eta=float(s["eta"]), guidance_scale=float(s["guidance_scale"]),
            grad_clip=float(s["grad_clip"]), checkpointing=True, prompts=str(prompts), eval_prompts=str(prompts),
            eval_samples=int(s["batch_size"]), eval_every=0, checkpoint_every=0, seed=int(s["seed"]), mixed_precision="no",
            **trunc,
        )
        trainer.finetune(cfg, Path(tmp) / "run", progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    w = int(s["warmup"])
    timed = record["seconds"][w:]
    grad_calls = [T - int(r["grad_from"]) for r in rows]
    inner = [float(r["seconds"]) for r in rows][w:]
    return {
        "tool": "rewardiff", "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        "truncation": s["truncation"], "steps_timed": len(timed), "warmup": w,
        "s_per_step_median": statistics.median(timed), "s_per_step_mean": statistics.fmean(timed),
        "s_per_step_min": min(timed), "s_per_step_max": max(timed), "seconds": record["seconds"],
        "metrics_seconds_median": statistics.median(inner),
        "grad_unet_calls": grad_calls, "grad_unet_calls_mean_timed": statistics.fmean(grad_calls[w:]),
        "rss_before_training_mb": record["rss_before"], "peak_rss_mb": record["peak"],
        "lora_trainable_params": record["params"], "lora": {"r": 4, "alpha": 4.0, "targets": TRL_LORA_TARGETS},
        "gradient_checkpointing": "every guided DDIM step with gradient, and the VAE decode",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# ---------------------------------------------------------------------- the trl environment

def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _trl_ready(venv: Path) -> bool:
    py = _venv_python(venv)
    if not py.is_file():
        return False
    probe = "import trl, torch; from trl import AlignPropTrainer; print(trl.__version__, torch.__version__)"
    res = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return res.returncode == 0 and res.stdout.split()[:1] == ["0.23.1"] and res.stdout.split()[1].startswith("2.13.0")


def ensure_trl_venv(venv: Path) -> None:
    """Create ``venv`` with torch 2.13.0 (installed first, alone) and trl 0.23.1 (under a
    constraint that keeps torch), with the same diffusers, peft, accelerate and transformers
    versions as this environment."""
    if _trl_ready(venv):
        return
    from importlib.metadata import version

    print(f"creating {venv} (torch 2.13.0, then trl 0.23.1) ...", flush=True)
    if not _venv_python(venv).is_file():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(_venv_python(venv)), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "torch==2.13.0"], check=True)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("torch==2.13.0\n")
        constraint = f.name
    try:
        pins = [f"{p}=={version(p)}" for p in MATCHED_PACKAGES]
        subprocess.run([*pip, "-c", constraint, "trl==0.23.1", *pins], check=True)
    finally:
        os.unlink(constraint)
    if not _trl_ready(venv):
        raise SystemExit(f"trl 0.23.1 with torch 2.13.0 does not import in {venv}")


# ---------------------------------------------------------------------- the driver

def _run_worker(cmd: list[str], env: dict, log) -> dict:
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if log is not None:
        log.write(f"$ {' '.join(cmd[:2])} ...\n{res.stderr[-4000:]}\n")
    if res.returncode != 0:
        raise SystemExit(f"worker failed ({res.returncode}): {' '.join(cmd[:2])}\n{res.stderr[-3000:]}")
    out = json.loads(res.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = time.perf_counter() - t0
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30, help="timed steps per (tool, configuration)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--truncations", default="k1,random", help="k1 and/or random")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds (ours, trl) per configuration")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--num-inference-steps", type=int, default=20)
    ap.add_argument("--guidance-scale", type=float, default=2.0)
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for both tools")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--venv", type=Path, default=HERE / ".venv-trl")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "trl_side_by_side")
    ap.add_argument("--worker-ours", default=None, help=argparse.SUPPRESS)  # JSON settings: run ours, print JSON
    a = ap.parse_args()
    if a.worker_ours:
        print(json.dumps(run_ours(json.loads(a.worker_ours))), flush=True)
        return

    ensure_trl_venv(a.venv)
    from rewardiff.models.sd import tiny_pipeline

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    a.out.mkdir(parents=True, exist_ok=True)
    started = datetime.datetime.now(datetime.timezone.utc)
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp, (a.out / "run.log").open("w") as log:
        pipe = tiny_pipeline(Path(tmp) / "tiny-sd", seed=a.seed, resolution=a.resolution)
        for trunc in [t.strip() for t in a.truncations.split(",") if t.strip()]:
            settings = {"pipeline": str(pipe), "num_inference_steps": a.num_inference_steps, "warmup": a.warmup,
                        "steps": a.steps, "seed": a.seed, "eta": 0.0, "guidance_scale": a.guidance_scale,
                        "batch_size": a.batch, "lr": a.lr, "weight_decay": a.weight_decay, "grad_clip": 1.0,
                        "truncation": trunc, "prompts": PROMPTS}
            for rep in range(a.repeats):
                for tool in ("rewardiff", "trl"):
                    if tool == "rewardiff":
                        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker-ours", json.dumps(settings)]
                    else:
                        cmd = [str(_venv_python(a.venv)), str(HERE / "trl_worker.py"), json.dumps(settings)]
                    load = os.getloadavg()[0]
                    r = _run_worker(cmd, env, log)
                    r.update({"repeat": rep, "loadavg_1min_before": load})
                    runs.append(r)
                    print(f"{tool:9s} {trunc:6s} round {rep}: {r['s_per_step_median']:.3f} s/step (median of {r['steps_timed']}), "
                          f"peak {r['peak_rss_mb']:.0f} MB, grad UNet calls/step {r['grad_unet_calls_mean_timed']:.2f}", flush=True)

    table = []
    for trunc in sorted({r["truncation"] for r in runs}, key=lambda t: a.truncations.index(t)):
        row = {"truncation": trunc}
        for tool in ("rewardiff", "trl"):
            mine = [r for r in runs if r["truncation"] == trunc and r["tool"] == tool]
            secs = [x for r in mine for x in r["seconds"][r["warmup"]:]]
            row[tool] = {"s_per_step_median": statistics.median(secs), "s_per_step_mean": statistics.fmean(secs),
                         "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                         "rss_before_training_mb": max(r["rss_before_training_mb"] for r in mine),
                         "grad_unet_calls_mean": statistics.fmean(c for r in mine for c in r["grad_unet_calls"][r["warmup"]:])}
            row[tool]["s_per_grad_call_mean"] = row[tool]["s_per_step_mean"] / row[tool]["grad_unet_calls_mean"]
        row["ratio_s_per_step_median"] = row["rewardiff"]["s_per_step_median"] / row["trl"]["s_per_step_median"]
        row["ratio_peak_rss"] = row["rewardiff"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
        table.append(row)

    print()
    print(f"{'truncation':10s} {'tool':9s} {'s/step med':>10s} {'s/step mean':>11s} {'grad calls':>10s} {'peak MB':>8s} {'RSS@start':>9s}")
    for row in table:
        for tool in ("rewardiff", "trl"):
            c = row[tool]
            print(f"{row['truncation']:10s} {tool:9s} {c['s_per_step_median']:10.3f} {c['s_per_step_mean']:11.3f} "
                  f"{c['grad_unet_calls_mean']:10.2f} {c['peak_rss_mb']:8.0f} {c['rss_before_training_mb']:9.0f}")
        print(f"{row['truncation']:10s} {'ours/trl':9s} {row['ratio_s_per_step_median']:10.2f} {'':11s} {'':10s} {row['ratio_peak_rss']:8.2f}")

    from importlib.metadata import version

    result = {
        "date_utc": started.isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
        "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version()},
        "threads": a.threads,
        "settings": {"resolution": a.resolution, "latent": a.resolution // 2, "num_inference_steps": a.num_inference_steps,
                     "scheduler": "DDIM, trailing spacing, eta 0", "guidance_scale": a.guidance_scale,
                     "batch_size": a.batch, "lora": {"r": 4, "alpha": 4, "targets": TRL_LORA_TARGETS},
                     "optimizer": {"name": "AdamW", "lr": a.lr, "weight_decay": a.weight_decay, "betas": [0.9, 0.999],
                                   "eps": 1e-8},
                     "grad_clip": 1.0, "mixed_precision": "no", "reward": "mean Rec. 601 luma of the image in [0, 1]",
                     "prompts": PROMPTS, "steps_timed": a.steps, "warmup": a.warmup, "repeats": a.repeats,
                     "truncation": {"k1": "only the last of the T denoising steps carries gradient",
                                    "random": {"rewardiff": "K ~ U{1..T} once per step, last K steps with gradient",
                                               "trl": "truncated_rand_backprop_minmax=(0, T): r_i ~ U{0..T} per denoising "
                                                      "step i, gradient kept where i >= r_i"}}},
        "versions": {"rewardiff_env": {p: version(p) for p in ["torch", *MATCHED_PACKAGES]}, "trl": "0.23.1"},
        "inequalities": [line.strip("- ").strip() for line in __doc__.split("Known inequalities (also written to results.json):")[1]
                         .replace("\n  ", " ").splitlines() if line.strip()],
        "table": table,
        "runs": runs,
    }
    (a.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"\nwrote {a.out / 'results.json'}")


if __name__ == "__main__":
    main()
