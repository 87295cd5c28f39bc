"""One timed AlignProp run of trl's ``AlignPropTrainer`` (trl 0.23.1) on a saved pipeline.

Runs inside the separate trl virtual environment that ``benchmarks/trl_side_by_side.py``
creates; it imports nothing from rewardiff. The settings come as one JSON argument; the
result is printed as one JSON line on stdout (the last line).

    benchmarks/.venv-trl/bin/python benchmarks/trl_worker.py '{"pipeline": "...", ...}'

What is timed: each ``trainer.step(epoch, global_step)`` call, that is, drawing the prompts,
encoding them, sampling with gradient through the truncation window, decoding, the reward,
backward, gradient clipping and the AdamW step. Checkpoint saving is switched off
(``save_freq`` beyond the run), no tracker is attached and the per-timestep progress bar is
disabled, so none of them is inside the timing.

The reward is the same as rewardiff's ``brightness``: Rec. 601 luma of the image in [0, 1]
(trl's pipeline already maps the decoded image from [-1, 1] to [0, 1] and clamps it),
averaged over pixels.
"""

from __future__ import annotations

import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import warnings

LUMA = (0.299, 0.587, 0.114)


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


class _CountingRandom:
    """Stands in for the ``random`` module inside trl's pipeline code: the same draws from the
    same global generator, recorded, so the number of UNet calls that carry gradient in each
    step is known. It changes nothing the trainer computes."""

    def __init__(self):
        self.draws: list[int] = []

    def randint(self, a: int, b: int) -> int:
        r = random.randint(a, b)
        self.draws.append(r)
        return r

    def __getattr__(self, name):
        return getattr(random, name)


def main() -> None:
    s = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    import torch
    from accelerate import PartialState

    PartialState(cpu=True)  # CPU, one process, before the trainer builds its Accelerator
    import trl
    from trl import AlignPropConfig, AlignPropTrainer, DefaultDDPOStableDiffusionPipeline
    from trl.models import modeling_sd_base

    counter = _CountingRandom()
    modeling_sd_base.random = counter

    T = int(s["num_inference_steps"])
    total = int(s["warmup"]) + int(s["steps"])
    with tempfile.TemporaryDirectory() as tmp:
        kw = dict(
            num_epochs=total, save_freq=10**9, seed=int(s["seed"]), log_with=None, mixed_precision="no",
            project_kwargs={"project_dir": tmp, "logging_dir": tmp}, logdir=tmp,
            sample_num_steps=T, sample_eta=float(s["eta"]), sample_guidance_scale=float(s["guidance_scale"]),
            train_batch_size=int(s["batch_size"]), train_learning_rate=float(s["lr"]),
            train_adam_weight_decay=float(s["weight_decay"]), train_max_grad_norm=float(s["grad_clip"]),
            train_gradient_accumulation_steps=1,
        )
        if s["truncation"] == "k1":  # only the last step's UNet output keeps its gradient
            kw.update(truncated_backprop_rand=False, truncated_backprop_timestep=T - 1)
        elif s["truncation"] == "random":  # trl's randomized truncation over the whole chain
            kw.update(truncated_backprop_rand=True, truncated_rand_backprop_minmax=(0, T))
        else:
            raise SystemExit(f"unknown truncation {s['truncation']!r}")
        config = AlignPropConfig(**kw)
        pipeline = DefaultDDPOStableDiffusionPipeline(s["pipeline"], use_lora=True)
        prompts = list(s["prompts"])
        rng = random.Random(int(s["seed"]))

        def prompt_fn():
            return rng.choice(prompts), {}

        def reward_fn(images, prompts, metadata):
            w = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
            return (images[:, :3] * w).sum(1).mean(dim=(1, 2)), {}

        trainer = AlignPropTrainer(config, reward_fn, prompt_fn, pipeline)
        pipeline.set_progress_bar_config(disable=True)  # no per-timestep bar on stderr (rewardiff draws none)
        lora_params = sum(p.numel() for p in trainer.trainable_layers)
        rss_before = _status_mb("VmRSS")
        seconds, grad_calls, global_step = [], [], 0
        for epoch in range(total):
            counter.draws.clear()
            t0 = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            seconds.append(time.perf_counter() - t0)
            if s["truncation"] == "k1":
                grad_calls.append(1)
            else:  # step i keeps its gradient when i >= its own draw
                grad_calls.append(sum(1 for i, r in enumerate(counter.draws) if i >= r))
        peak = _status_mb("VmHWM")
    timed = seconds[int(s["warmup"]):]
    print(json.dumps({
        "tool": "trl", "trl_version": trl.__version__, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), "truncation": s["truncation"],
        "steps_timed": len(timed), "warmup": int(s["warmup"]),
        "s_per_step_median": statistics.median(timed), "s_per_step_mean": statistics.fmean(timed),
        "s_per_step_min": min(timed), "s_per_step_max": max(timed), "seconds": seconds,
        "grad_unet_calls": grad_calls, "grad_unet_calls_mean_timed": statistics.fmean(grad_calls[int(s["warmup"]):]),
        "rss_before_training_mb": rss_before, "peak_rss_mb": peak,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lora_trainable_params": lora_params, "lora": {"r": 4, "alpha": 4, "targets": ["to_k", "to_q", "to_v", "to_out.0"]},
        "gradient_checkpointing": "UNet call of every step (trl's default); VAE decode not checkpointed",
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }), flush=True)


if __name__ == "__main__":
    main()
