"""rewardiff's AlignProp and DDPO against trl 0.23.1's trainers: seconds per step and peak memory.

trl's ``AlignPropTrainer`` and ``DDPOTrainer`` and rewardiff's ``finetune()`` train LoRA
adapters of the same locally saved tiny Stable Diffusion pipeline (built once with
``rewardiff.models.sd.tiny_pipeline``) at equal settings. ``--method`` picks AlignProp (the
default), DDPO or both; each method writes its own file.

AlignProp (``results.json``): resolution, DDIM steps, eta 0, guidance scale, batch, LoRA
rank, alpha and target modules, learning rate, weight decay, gradient clipping and the reward
(differentiable brightness of the decoded image). Two truncations: K = 1 (only the last
denoising step carries gradient) and randomized.

DDPO (``ddpo.json``): one step is one epoch: sample ``--samples`` trajectories at eta 1
without gradient (one sampling call), decode, score them with the same brightness used as a
black box (values only), normalize per prompt (buffer 16, at least 16 before the buffer is
used), then one pass (one inner epoch) over ``--minibatches`` minibatches, each trained on
every one of the T timesteps (timestep fraction 1) with classifier-free guidance in the
training forward, gradients accumulated over the T timesteps and one clipped AdamW step per
minibatch; PPO clip 1e-4, advantages clipped to 5. rewardiff: ``method=ddpo``,
``batch_size=samples``, ``ppo_minibatches``, ``ppo_epochs=1``, ``timestep_fraction=1``; trl:
``sample_batch_size=samples``, ``sample_num_batches_per_epoch=1``,
``train_batch_size=samples/minibatches``, ``train_gradient_accumulation_steps=1``,
``train_num_inner_epochs=1``, ``train_timestep_fraction=1``, ``train_cfg=True``,
``per_prompt_stat_tracking=True``. Both sides count, per epoch, the UNet forward calls with
and without an autograd graph (and the batch rows they carry), the backward passes through
the UNet, the text-encoder calls and the optimizer steps actually taken (forward hooks on the
modules, a gradient hook on the UNet output, a post-step hook on the optimizer), so the
timing is known to compare the same work.

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
    .venv/bin/python benchmarks/trl_side_by_side.py --method ddpo --steps 30 --warmup 3 --repeats 2

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

DDPO known inequalities (also written to ddpo.json):
- text encoding: rewardiff's DDPO encodes the minibatch's prompts and the empty prompt again
  for every (minibatch, timestep) update, 2 + 2 x minibatches x T text-encoder calls per
  epoch; trl encodes the epoch's prompts once when sampling, keeps the embeddings for the
  updates and encodes the empty prompt once at start-up (1 call per epoch). A two-layer text
  model here: small, but it grows with a real CLIP encoder.
- timestep order: trl shuffles the order of the timesteps independently for every sample, so
  one UNet call of a minibatch mixes timesteps; rewardiff draws one random order per epoch
  and trains all rows of a minibatch at the same timestep. The same number of UNet calls and
  rows either way.
- trained timesteps: rewardiff trains the stochastic steps only (it skips a step whose
  transition has std 0); trl trains int(T x fraction) steps whatever their std, clamping the
  last step's previous timestep to 0. The tiny pipeline's scheduler has
  ``set_alpha_to_one=False`` (as Stable Diffusion 1.x), so the last step is stochastic and
  both train all T; with ``set_alpha_to_one=True`` rewardiff would train T - 1.
- LoRA targets: as for AlignProp (trl's fixed r = 4, alpha = 4 on to_q/to_k/to_v/to_out.0;
  rewardiff narrowed to those four here).
- loss scaling: rewardiff divides each timestep's loss by the number of trained timesteps;
  trl lets accelerate's gradient accumulation (over T timesteps) divide it by T. The same
  gradient; it changes no cost.
- per-prompt statistics: the same rule (buffer 16, batch statistics below 16 rewards,
  population std + 1e-6); trl recovers the prompt strings by decoding the token ids.
- sampling noise: rewardiff draws each sample's step noise from its own generator (one small
  draw per sample and step), trl one draw for the batch per step. Inside the timed epoch
  for both; small against a UNet call.
- rewardiff evaluates the fixed evaluation set before the first and after the last step
  (outside the timed steps, inside its process's wall time); trl does not.
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
MATCHED_PACKAGES = ["diffusers", "peft", "accelerate", "transformers"]
# DDPO settings held fixed on both sides: eta 1 as the DDPO authors use, the rest both tools' defaults
# (trl's per-prompt statistics, off by default there, are switched on)
DDPO_FIXED = {"eta": 1.0, "ppo_epochs": 1, "timestep_fraction": 1.0, "ppo_clip": 1e-4, "adv_clip": 5.0,
              "stat_buffer": 16, "stat_min_count": 16}
CALL_KEYS = ["unet_forward_no_grad", "unet_rows_no_grad", "unet_forward_grad", "unet_rows_grad", "unet_backward",
             "optimizer_steps", "text_encoder_forward"]
RESULT_FILES = {"alignprop": ("results.json", "run.log"), "ddpo": ("ddpo.json", "ddpo.log")}


sys.path.insert(0, str(Path(__file__).resolve().parent))
# the worker module imports trl (and torch) only when it runs
from trl_worker import TRL_LORA_TARGETS, CallCounts, _status_mb, find_module, timing_summary  # noqa: E402


# ---------------------------------------------------------------------- rewardiff's side (worker)

def _our_config(s: dict, prompts: Path, total: int):
    """The FinetuneConfig of one benchmark run (AlignProp or DDPO) at the shared settings."""
    from rewardiff.finetune.config import FinetuneConfig

    T, method = int(s["num_inference_steps"]), s["method"]
    if method == "alignprop":
        extra = ({"truncation": "gaussian", "truncation_mean": (T - 1) / T, "truncation_std": 0.0}  # K = 1 every step
                 if s["truncation"] == "k1" else {"truncation": "uniform"})
    else:
        extra = {"ppo_minibatches": int(s["minibatches"]), "ppo_epochs": int(s["ppo_epochs"]),
                 "timestep_fraction": float(s["timestep_fraction"]), "ppo_clip": float(s["ppo_clip"]),
                 "adv_clip": float(s["adv_clip"]), "stat_buffer": int(s["stat_buffer"]),
                 "stat_min_count": int(s["stat_min_count"])}
    return FinetuneConfig(
        model=f"diffusers:{s['pipeline']}", reward="brightness", method=method, steps=total,
        batch_size=int(s["batch_size"]), lr=float(s["lr"]), weight_decay=float(s["weight_decay"]), lora_rank=4,
        lora_alpha=4.0, num_inference_steps=T, eta=float(s["eta"]), guidance_scale=float(s["guidance_scale"]),
        grad_clip=float(s["grad_clip"]), checkpointing=True, prompts=str(prompts), eval_prompts=str(prompts),
        eval_samples=int(s["batch_size"]), eval_every=0, checkpoint_every=0, seed=int(s["seed"]), mixed_precision="no",
        **extra,
    )


def run_ours(s: dict) -> dict:
    """One timed rewardiff run (in its own process); the same JSON as trl_worker.py."""
    import warnings

    warnings.filterwarnings("ignore")
    import torch

    import rewardiff.finetune.trainer as trainer
    import rewardiff.finetune.weights as weights

    weights.LORA_TARGETS = list(TRL_LORA_TARGETS)  # the modules trl's pipeline adapts (this process only)
    T, w = int(s["num_inference_steps"]), int(s["warmup"])
    total = w + int(s["steps"])
    ddpo = s["method"] == "ddpo"
    record = {"seconds": [], "rss_before": None, "peak": None, "params": None, "counts": None}
    original = trainer.Run.train_step

    def timed_step(self, step):  # wall time of the whole call, the same boundary as trl's trainer.step
        if record["rss_before"] is None:
            record["rss_before"] = _status_mb("VmRSS")
            record["params"] = sum(p.numel() for p in self.model.net.parameters() if p.requires_grad)
            if ddpo:
                net = self.acc.unwrap_model(self.model.net)
                record["counts"] = CallCounts(find_module(net, "UNet2DConditionModel"), find_module(net, "CLIPTextModel"),
                                              self.opt)
        if record["counts"] is not None:
            record["counts"].start()
        t0 = time.perf_counter()
        row = original(self, step)
        record["seconds"].append(time.perf_counter() - t0)
        if record["counts"] is not None:
            record["counts"].stop()  # the evaluation after the last step is not part of it
        record["peak"] = _status_mb("VmHWM")
        return row

    trainer.Run.train_step = timed_step
    with tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.txt"
        prompts.write_text("\n".join(s["prompts"]) + "\n")
        trainer.finetune(_our_config(s, prompts, total), Path(tmp) / "run", progress=False)
        rows = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    if ddpo:
        extra = {"method": "ddpo", "calls": record["counts"].per_step(), "updates": [int(r["updates"]) for r in rows],
                 "gradient_checkpointing": "none (DDPO's updates run the UNet once per (minibatch, timestep))"}
    else:
        grad_calls = [T - int(r["grad_from"]) for r in rows]
        extra = {"truncation": s["truncation"], "grad_unet_calls": grad_calls,
                 "grad_unet_calls_mean_timed": statistics.fmean(grad_calls[w:]),
                 "gradient_checkpointing": "every guided DDIM step with gradient, and the VAE decode"}
    return {
        "tool": "rewardiff", "torch_version": torch.__version__, "torch_threads": torch.get_num_threads(),
        **extra, **timing_summary(record["seconds"], w),
        "metrics_seconds_median": statistics.median([float(r["seconds"]) for r in rows][w:]),
        "rss_before_training_mb": record["rss_before"], "peak_rss_mb": record["peak"],
        "lora_trainable_params": record["params"], "lora": {"r": 4, "alpha": 4.0, "targets": TRL_LORA_TARGETS},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }


# ---------------------------------------------------------------------- the trl environment

def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _trl_ready(venv: Path) -> bool:
    py = _venv_python(venv)
    if not py.is_file():
        return False
    probe = "import trl, torch; from trl import AlignPropTrainer, DDPOTrainer; print(trl.__version__, torch.__version__)"
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


def _doc_list(header: str) -> list[str]:
    """The bullet list after ``header`` in this module's docstring, one string per bullet."""
    block = __doc__.split(header, 1)[1].strip("\n").split("\n\n", 1)[0]
    return [line.strip("- ").strip() for line in block.replace("\n  ", " ").splitlines() if line.strip()]


KEY = {"alignprop": "truncation", "ddpo": "method"}  # what names a configuration in runs and table rows


def _worker_settings(method: str, a, pipe: Path) -> list[dict]:
    """One settings dict per configuration of ``method``, given to both tools' workers."""
    base = {"method": method, "pipeline": str(pipe), "num_inference_steps": a.num_inference_steps, "warmup": a.warmup,
            "steps": a.steps, "seed": a.seed, "guidance_scale": a.guidance_scale, "lr": a.lr,
            "weight_decay": a.weight_decay, "grad_clip": 1.0, "prompts": PROMPTS}
    if method == "alignprop":
        return [{**base, "eta": 0.0, "batch_size": a.batch, "truncation": t} for t in a.truncation_list]
    return [{**base, **DDPO_FIXED, "batch_size": a.samples, "minibatches": a.minibatches}]


def _calls_mean(runs: list[dict]) -> tuple[dict, bool]:
    """Mean per timed epoch of every call count over ``runs``, and whether every timed epoch had the same counts."""
    epochs = [c for r in runs for c in r["calls"][r["warmup"]:]]
    return {k: statistics.fmean(c[k] for c in epochs) for k in CALL_KEYS}, all(c == epochs[0] for c in epochs)


def _run_line(method: str, r: dict) -> str:
    head = (f"{r['tool']:9s} {r[KEY[method]]:9s} round {r['repeat']}: {r['s_per_step_median']:.3f} s/step "
            f"(median of {r['steps_timed']}), peak {r['peak_rss_mb']:.0f} MB")
    if method == "alignprop":
        return f"{head}, grad UNet calls/step {r['grad_unet_calls_mean_timed']:.2f}"
    c, _ = _calls_mean([r])
    return (f"{head}; per epoch: UNet fwd {c['unet_forward_no_grad']:.0f} no-grad ({c['unet_rows_no_grad']:.0f} rows) + "
            f"{c['unet_forward_grad']:.0f} grad ({c['unet_rows_grad']:.0f} rows), bwd {c['unet_backward']:.0f}, "
            f"opt steps {c['optimizer_steps']:.0f}, text enc {c['text_encoder_forward']:.0f}")


def _table(method: str, runs: list[dict], labels: list[str]) -> list[dict]:
    table = []
    for label in labels:
        row = {KEY[method]: label}
        for tool in ("rewardiff", "trl"):
            mine = [r for r in runs if r[KEY[method]] == label and r["tool"] == tool]
            secs = [x for r in mine for x in r["seconds"][r["warmup"]:]]
            cell = {"s_per_step_median": statistics.median(secs), "s_per_step_mean": statistics.fmean(secs),
                    "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
                    "rss_before_training_mb": max(r["rss_before_training_mb"] for r in mine)}
            if method == "alignprop":
                cell["grad_unet_calls_mean"] = statistics.fmean(c for r in mine for c in r["grad_unet_calls"][r["warmup"]:])
                cell["s_per_grad_call_mean"] = cell["s_per_step_mean"] / cell["grad_unet_calls_mean"]
            else:
                cell["calls_per_epoch"], cell["calls_same_every_epoch"] = _calls_mean(mine)
            row[tool] = cell
        row["ratio_s_per_step_median"] = row["rewardiff"]["s_per_step_median"] / row["trl"]["s_per_step_median"]
        row["ratio_peak_rss"] = row["rewardiff"]["peak_rss_mb"] / row["trl"]["peak_rss_mb"]
        if method == "ddpo":
            ours, theirs = row["rewardiff"]["calls_per_epoch"], row["trl"]["calls_per_epoch"]
            row["same_unet_and_optimizer_work"] = all(ours[k] == theirs[k] for k in CALL_KEYS if k != "text_encoder_forward")
        table.append(row)
    return table


def _print_table(method: str, table: list[dict]) -> None:
    key = KEY[method]
    extra = "grad calls" if method == "alignprop" else "fwd/bwd/opt"
    print(f"\n{key:10s} {'tool':9s} {'s/step med':>10s} {'s/step mean':>11s} {extra:>12s} {'peak MB':>8s} {'RSS@start':>9s}")
    for row in table:
        for tool in ("rewardiff", "trl"):
            c = row[tool]
            if method == "alignprop":
                calls = f"{c['grad_unet_calls_mean']:.2f}"
            else:
                n = c["calls_per_epoch"]
                calls = f"{n['unet_forward_no_grad'] + n['unet_forward_grad']:.0f}/{n['unet_backward']:.0f}/{n['optimizer_steps']:.0f}"
            print(f"{row[key]:10s} {tool:9s} {c['s_per_step_median']:10.3f} {c['s_per_step_mean']:11.3f} "
                  f"{calls:>12s} {c['peak_rss_mb']:8.0f} {c['rss_before_training_mb']:9.0f}")
        print(f"{row[key]:10s} {'ours/trl':9s} {row['ratio_s_per_step_median']:10.2f} {'':11s} {'':12s} {row['ratio_peak_rss']:8.2f}")
        if method == "ddpo" and not row["same_unet_and_optimizer_work"]:
            print("warning: the two tools did not do the same UNet / optimizer work per epoch (see calls_per_epoch)")


def _result_settings(method: str, a) -> dict:
    """The settings block of the results file (AlignProp's keeps the order of earlier files)."""
    T = a.num_inference_steps
    s = {"resolution": a.resolution, "latent": a.resolution // 2, "num_inference_steps": T,
         "scheduler": f"DDIM, trailing spacing, eta {0 if method == 'alignprop' else 1}", "guidance_scale": a.guidance_scale}
    if method == "alignprop":
        s["batch_size"] = a.batch
    else:
        s.update({"step": "one epoch: sampling (no gradient), decoding, reward, advantages and every PPO update of the epoch",
                  "samples_per_epoch": a.samples, "sampling_batches_per_epoch": 1, "minibatches": a.minibatches,
                  "minibatch_size": a.samples // a.minibatches,
                  "optimizer_steps_per_epoch": a.minibatches * DDPO_FIXED["ppo_epochs"],
                  "inner_epochs": DDPO_FIXED["ppo_epochs"], "timestep_fraction": DDPO_FIXED["timestep_fraction"],
                  "trained_timesteps_per_minibatch": T, "guidance_in_training_forward": True,
                  "ppo_clip": DDPO_FIXED["ppo_clip"], "adv_clip": DDPO_FIXED["adv_clip"],
                  "per_prompt_stats": {"buffer": DDPO_FIXED["stat_buffer"], "min_count": DDPO_FIXED["stat_min_count"]}})
    s.update({"lora": {"r": 4, "alpha": 4, "targets": TRL_LORA_TARGETS},
              "optimizer": {"name": "AdamW", "lr": a.lr, "weight_decay": a.weight_decay, "betas": [0.9, 0.999], "eps": 1e-8},
              "grad_clip": 1.0, "mixed_precision": "no",
              "reward": "mean Rec. 601 luma of the image in [0, 1]" + ("" if method == "alignprop" else ", values only"),
              "prompts": PROMPTS, "steps_timed": a.steps, "warmup": a.warmup, "repeats": a.repeats})
    if method == "alignprop":
        s["truncation"] = {"k1": "only the last of the T denoising steps carries gradient",
                           "random": {"rewardiff": "K ~ U{1..T} once per step, last K steps with gradient",
                                      "trl": "truncated_rand_backprop_minmax=(0, T): r_i ~ U{0..T} per denoising "
                                             "step i, gradient kept where i >= r_i"}}
    return s


def _check_args(a) -> None:
    methods = {"alignprop": ["alignprop"], "ddpo": ["ddpo"], "both": ["alignprop", "ddpo"]}
    if a.method not in methods:
        raise SystemExit(f"--method must be alignprop, ddpo or both, got {a.method!r}")
    a.methods = methods[a.method]
    a.truncation_list = [t.strip() for t in a.truncations.split(",") if t.strip()]
    bad = [t for t in a.truncation_list if t not in ("k1", "random")]
    if "alignprop" in a.methods and (bad or not a.truncation_list):
        raise SystemExit(f"--truncations takes k1 and/or random, got {a.truncations!r}")
    if a.steps < 1 or a.warmup < 0 or a.repeats < 1:
        raise SystemExit("--steps and --repeats must be at least 1 and --warmup at least 0")
    if "ddpo" in a.methods and (a.minibatches < 1 or a.samples < a.minibatches or a.samples % a.minibatches):
        raise SystemExit(f"--minibatches ({a.minibatches}) must divide --samples ({a.samples})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="alignprop", help="alignprop, ddpo or both")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per (tool, configuration); a DDPO step is one epoch")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--truncations", default="k1,random", help="alignprop: k1 and/or random")
    ap.add_argument("--repeats", type=int, default=1, help="alternating rounds (ours, trl) per configuration")
    ap.add_argument("--batch", type=int, default=2, help="alignprop: samples per step")
    ap.add_argument("--samples", type=int, default=4, help="ddpo: samples per epoch (one sampling call)")
    ap.add_argument("--minibatches", type=int, default=2, help="ddpo: minibatches per epoch = optimizer steps per epoch")
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
    _check_args(a)

    ensure_trl_venv(a.venv)
    from importlib.metadata import version

    from rewardiff.models.sd import tiny_pipeline

    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "MKL_NUM_THREADS": str(a.threads), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}
    a.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_pipeline(Path(tmp) / "tiny-sd", seed=a.seed, resolution=a.resolution)
        for method in a.methods:
            results_name, log_name = RESULT_FILES[method]
            started = datetime.datetime.now(datetime.timezone.utc)
            runs: list[dict] = []
            configs = _worker_settings(method, a, pipe)
            with (a.out / log_name).open("w") as log:
                for settings in configs:
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
                            print(_run_line(method, r), flush=True)

            table = _table(method, runs, [s[KEY[method]] for s in configs])
            _print_table(method, table)
            header = ("Known inequalities (also written to results.json):" if method == "alignprop"
                      else "DDPO known inequalities (also written to ddpo.json):")
            result = {
                "date_utc": started.isoformat(timespec="seconds"),
                "command": " ".join([os.path.relpath(sys.executable, ROOT), *sys.argv]),
                "machine": {"cpu": _cpu_model(), "logical_cpus": os.cpu_count(), "python": platform.python_version()},
                "threads": a.threads,
                "settings": _result_settings(method, a),
                "versions": {"rewardiff_env": {p: version(p) for p in ["torch", *MATCHED_PACKAGES]}, "trl": "0.23.1"},
                "inequalities": _doc_list(header),
                "table": table,
                "runs": runs,
            }
            (a.out / results_name).write_text(json.dumps(result, indent=2))
            print(f"\nwrote {a.out / results_name}")


if __name__ == "__main__":
    main()
