"""One timed run of trl 0.23.1's ``AlignPropTrainer`` or ``DDPOTrainer`` on a saved pipeline.

Runs inside the separate trl virtual environment that ``benchmarks/trl_side_by_side.py``
creates; it imports nothing from rewardiff. The settings come as one JSON argument
(``"method"``: ``"alignprop"`` or ``"ddpo"``); the result is printed as one JSON line on
stdout (the last line).

    benchmarks/.venv-trl/bin/python benchmarks/trl_worker.py '{"method": "ddpo", "pipeline": "...", ...}'

What is timed: each ``trainer.step(epoch, global_step)`` call. For AlignProp: drawing the
prompts, encoding them, sampling with gradient through the truncation window, decoding, the
reward, backward, gradient clipping and the AdamW step. For DDPO (one epoch): sampling the
epoch's trajectories without gradient, decoding, the reward, the per-prompt advantages and
every PPO update of the epoch (forward and backward of each (minibatch, timestep), gradient
clipping and one AdamW step per minibatch). Checkpoint saving is switched off (``save_freq``
beyond the run), no tracker is attached and the per-timestep progress bar is disabled, so
none of them is inside the timing.

The reward is the same as rewardiff's ``brightness``: Rec. 601 luma of the image in [0, 1]
(trl's pipeline already maps the decoded image from [-1, 1] to [0, 1] and clamps it),
averaged over pixels. DDPO reads only its values.

This module also holds the pieces both sides of the benchmark share (memory readings,
timing summary, call counting); they import torch only when used.
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
from collections import Counter

LUMA = (0.299, 0.587, 0.114)
TRL_LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timing_summary(seconds: list[float], warmup: int) -> dict:
    """Median, mean, min and max of the steps after ``warmup``, and every step's seconds."""
    timed = seconds[warmup:]
    return {"steps_timed": len(timed), "warmup": warmup, "s_per_step_median": statistics.median(timed),
            "s_per_step_mean": statistics.fmean(timed), "s_per_step_min": min(timed), "s_per_step_max": max(timed),
            "seconds": seconds}


def find_module(root, class_name: str):
    """The first submodule of ``root`` (itself included) whose class is named ``class_name``."""
    for m in root.modules():
        if type(m).__name__ == class_name:
            return m
    raise SystemExit(f"no {class_name} inside {type(root).__name__}")


class CallCounts:
    """Per training step: UNet forward calls (and the batch rows they carry) without and with
    an autograd graph, backward passes through the UNet's output, text-encoder forward calls
    and optimizer steps actually taken. Hooks only count; they change nothing computed.

    ``start()`` opens a new step and ``stop()`` closes it (calls between steps, such as an
    evaluation, are not counted); ``steps`` holds one Counter per step.
    """

    def __init__(self, unet, text_encoder, optimizer):
        self.steps: list[Counter] = []
        self.active = False
        unet.register_forward_hook(self._unet, with_kwargs=True)
        text_encoder.register_forward_hook(lambda *_: self._add("text_encoder_forward"))
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper skips steps while accumulating
        inner.register_step_post_hook(lambda *_: self._add("optimizer_steps"))

    def start(self) -> None:
        self.steps.append(Counter())
        self.active = True

    def stop(self) -> None:
        self.active = False

    def _add(self, key: str, n: int = 1) -> None:
        if self.active:
            self.steps[-1][key] += n

    def _unet(self, module, args, kwargs, out):
        x = args[0] if args else kwargs["sample"]
        y = out.sample if hasattr(out, "sample") else out[0]
        kind = "grad" if y.requires_grad else "no_grad"
        self._add(f"unet_forward_{kind}")
        self._add(f"unet_rows_{kind}", int(x.shape[0]))
        if y.requires_grad:
            y.register_hook(lambda g: self._add("unet_backward"))

    def per_step(self) -> list[dict]:
        keys = ["unet_forward_no_grad", "unet_rows_no_grad", "unet_forward_grad", "unet_rows_grad", "unet_backward",
                "optimizer_steps", "text_encoder_forward"]
        return [{k: int(c[k]) for k in keys} for c in self.steps]


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


def _luma(images):
    """Mean Rec. 601 luma of images in [0, 1]. [B, 3, H, W] -> [B]"""
    import torch

    w = torch.tensor(LUMA, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images[:, :3] * w).sum(1).mean(dim=(1, 2))


def _common_config(s: dict, tmp: str, total: int) -> dict:
    return dict(num_epochs=total, save_freq=10**9, seed=int(s["seed"]), log_with=None, mixed_precision="no",
                project_kwargs={"project_dir": tmp, "logging_dir": tmp}, logdir=tmp,
                sample_num_steps=int(s["num_inference_steps"]), sample_eta=float(s["eta"]),
                sample_guidance_scale=float(s["guidance_scale"]), train_learning_rate=float(s["lr"]),
                train_adam_weight_decay=float(s["weight_decay"]), train_max_grad_norm=float(s["grad_clip"]),
                train_gradient_accumulation_steps=1)


def _alignprop(s: dict, tmp: str, total: int, pipeline, prompt_fn):
    """trl's AlignPropTrainer, its per-step hooks and its extra result fields."""
    from trl import AlignPropConfig, AlignPropTrainer
    from trl.models import modeling_sd_base

    counter = _CountingRandom()
    modeling_sd_base.random = counter
    T = int(s["num_inference_steps"])
    kw = dict(_common_config(s, tmp, total), train_batch_size=int(s["batch_size"]))
    if s["truncation"] == "k1":  # only the last step's UNet output keeps its gradient
        kw.update(truncated_backprop_rand=False, truncated_backprop_timestep=T - 1)
    elif s["truncation"] == "random":  # trl's randomized truncation over the whole chain
        kw.update(truncated_backprop_rand=True, truncated_rand_backprop_minmax=(0, T))
    else:
        raise SystemExit(f"unknown truncation {s['truncation']!r}")
    trainer = AlignPropTrainer(AlignPropConfig(**kw), lambda images, prompts, meta: (_luma(images), {}), prompt_fn, pipeline)
    grad_calls: list[int] = []

    def before():
        counter.draws.clear()

    def after():
        if s["truncation"] == "k1":
            grad_calls.append(1)
        else:  # step i keeps its gradient when i >= its own draw
            grad_calls.append(sum(1 for i, r in enumerate(counter.draws) if i >= r))

    def extra(w: int) -> dict:
        return {"truncation": s["truncation"], "grad_unet_calls": grad_calls,
                "grad_unet_calls_mean_timed": statistics.fmean(grad_calls[w:]),
                "gradient_checkpointing": "UNet call of every step (trl's default); VAE decode not checkpointed"}

    return trainer, before, after, extra


def _ddpo(s: dict, tmp: str, total: int, pipeline, prompt_fn):
    """trl's DDPOTrainer at rewardiff's DDPO settings, its per-epoch hooks and its extra result fields."""
    from trl import DDPOConfig, DDPOTrainer

    n, m = int(s["batch_size"]), int(s["minibatches"])
    if n % m:
        raise SystemExit(f"minibatches ({m}) must divide the samples per epoch ({n})")
    config = DDPOConfig(
        **_common_config(s, tmp, total),
        sample_batch_size=n, sample_num_batches_per_epoch=1,  # the epoch's samples in one sampling call, as rewardiff
        train_batch_size=n // m, train_num_inner_epochs=int(s["ppo_epochs"]), train_cfg=True,
        train_timestep_fraction=float(s["timestep_fraction"]), train_clip_range=float(s["ppo_clip"]),
        train_adv_clip_max=float(s["adv_clip"]), per_prompt_stat_tracking=True,
        per_prompt_stat_tracking_buffer_size=int(s["stat_buffer"]), per_prompt_stat_tracking_min_count=int(s["stat_min_count"]),
    )
    trainer = DDPOTrainer(config, lambda images, prompts, meta: (_luma(images), {}), prompt_fn, pipeline)
    counts = CallCounts(pipeline.unet, pipeline.text_encoder, trainer.optimizer)

    def extra(w: int) -> dict:
        return {"method": "ddpo", "calls": counts.per_step(), "trained_timesteps": trainer.num_train_timesteps,
                "gradient_checkpointing": "none (trl's DDPO runs the UNet without checkpointing)"}

    return trainer, counts.start, counts.stop, extra


def main() -> None:
    s = json.loads(sys.argv[1])
    warnings.filterwarnings("ignore")
    import torch
    from accelerate import PartialState

    PartialState(cpu=True)  # CPU, one process, before the trainer builds its Accelerator
    import trl
    from trl import DefaultDDPOStableDiffusionPipeline

    build = {"alignprop": _alignprop, "ddpo": _ddpo}.get(s.get("method", "alignprop"))
    if build is None:
        raise SystemExit(f"unknown method {s['method']!r}; valid: alignprop, ddpo")
    total, w = int(s["warmup"]) + int(s["steps"]), int(s["warmup"])
    with tempfile.TemporaryDirectory() as tmp:
        pipeline = DefaultDDPOStableDiffusionPipeline(s["pipeline"], use_lora=True)
        prompts = list(s["prompts"])
        rng = random.Random(int(s["seed"]))

        def prompt_fn():
            return rng.choice(prompts), {}

        trainer, before, after, extra = build(s, tmp, total, pipeline, prompt_fn)
        pipeline.set_progress_bar_config(disable=True)  # no per-timestep bar on stderr (rewardiff draws none)
        lora_params = sum(p.numel() for p in trainer.trainable_layers)
        rss_before = _status_mb("VmRSS")
        seconds, global_step = [], 0
        for epoch in range(total):
            before()
            t0 = time.perf_counter()
            global_step = trainer.step(epoch, global_step)
            seconds.append(time.perf_counter() - t0)
            after()
        peak = _status_mb("VmHWM")
    print(json.dumps({
        "tool": "trl", "trl_version": trl.__version__, "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(), **extra(w), **timing_summary(seconds, w),
        "rss_before_training_mb": rss_before, "peak_rss_mb": peak,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "lora_trainable_params": lora_params, "lora": {"r": 4, "alpha": 4, "targets": TRL_LORA_TARGETS},
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }), flush=True)


if __name__ == "__main__":
    main()
