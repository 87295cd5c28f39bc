"""The fine-tuning configuration: one flat dataclass, YAML presets, typed overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rewardiff.errors import UserError


@dataclass
class FinetuneConfig:
    model: str = "shapes"  # "shapes", "diffusers:PIPELINE_DIR", "molecules-ar", "hf:MODEL_DIR", "molecules", or a model directory
    reward: str = "shapes-count"  # registered name, "pkg.module:function", or "0.7*a+0.3*b"
    method: str = "draft-k"  # draft | draft-k | draft-lv | alignprop | refl | ddpo | vard | gumbel
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # trajectories per step
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    lora_rank: int = 8  # LoRA rank on the UNet (token models: their attention or linear layers); 0 fine-tunes all weights
    lora_alpha: float = 8.0  # LoRA scaling numerator (scale = alpha / rank)
    k: int = 3  # draft-k, gumbel on masked diffusion: steps at the end of the chain that carry gradient
    lv_n: int = 2  # draft-lv: re-noised copies of each sample
    num_inference_steps: int = 15  # DDIM steps of the sampling chain
    eta: float = 0.0  # DDIM stochasticity of training rollouts
    guidance_scale: float = 2.0  # classifier-free guidance scale
    kl_weight: float = 0.0  # penalty to the base model: squared output distance (DRaFT+), per-step KL (vard), per-token KL (gumbel)
    grad_clip: float = 1.0  # max gradient norm (0 disables clipping)
    checkpointing: bool = True  # gradient checkpointing of every step in the window
    truncation: str = "uniform"  # alignprop: uniform | gaussian draw of the truncation point
    truncation_mean: float = 0.84  # alignprop gaussian: mean start, as a fraction of the chain
    truncation_std: float = 0.1  # alignprop gaussian: std, as a fraction of the chain
    refl_start: float = 0.75  # refl: earliest step (fraction of the chain) to jump from
    ppo_clip: float = 1e-4  # ddpo: clip range of the probability ratio
    adv_clip: float = 5.0  # ddpo: advantages clipped to [-adv_clip, adv_clip]
    ppo_epochs: int = 1  # ddpo: passes over each sampled batch
    ppo_minibatches: int = 2  # ddpo: optimizer steps per pass (divides batch_size)
    stat_buffer: int = 16  # ddpo: rewards kept per prompt for the advantage normalization
    stat_min_count: int = 16  # ddpo: below this many, a prompt is normalized with the batch's statistics
    timestep_fraction: float = 1.0  # ddpo: share of the stochastic steps trained on
    vard_value: str = ""  # vard: value model directory to start from (rewardiff train-value); "" fits one
    vard_warmup: int = 256  # vard: base-model trajectories the value is fitted on before the first update
    vard_warmup_steps: int = 400  # vard: value regression steps of the warm-up
    vard_value_steps: int = 8  # vard: value regression steps on each training batch
    vard_value_lr: float = 1e-3  # vard: Adam learning rate of the value model
    gumbel_tau: float = 0.3  # gumbel: temperature of the Gumbel-softmax relaxation (measured: 0.3 climbs, 1 does not)
    gumbel_estimator: str = "relaxed"  # gumbel: relaxed (the reward reads the relaxation) | straight-through (one-hot, relaxed gradient)
    prompts: str = "train"  # train | held-out | all | animals | animals-held-out | a .txt (one a line) or .json file
    eval_prompts: str = "held-out"  # prompts of the fixed evaluation set
    eval_samples: int = 96  # evaluation samples (fixed prompts and seeds)
    eval_every: int = 50  # steps between evaluations on the held-out set (0: only before and after)
    seed: int = 0  # seeds weights, prompts, noise
    checkpoint_every: int = 50  # steps between checkpoints (0: only at the end)
    mixed_precision: str = "no"  # no | bf16 (accelerate)
    tracker: str = "none"  # none | tensorboard | wandb (through accelerate; metrics.jsonl is always written)


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """``value`` as the field's type, or a UserError naming the field."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("true", "1", "yes", "on"):
                return True
            if str(value).lower() in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        if kind is int and isinstance(value, str):
            return int(value)
        return kind(value)
    except (TypeError, ValueError):
        raise UserError(f"config field {name!r} expects {kind.__name__}, got {value!r}") from None


def _field_types() -> dict[str, Any]:
    hints = typing.get_type_hints(FinetuneConfig)
    return {f.name: hints[f.name] for f in dataclasses.fields(FinetuneConfig)}


def build_config(values: dict[str, Any] | None = None, overrides: list[str] | None = None) -> FinetuneConfig:
    """A config from a mapping plus ``key=value`` overrides, every value type-checked."""
    kinds = _field_types()
    merged = dict(values or {})
    for item in overrides or []:
        if "=" not in item:
            raise UserError(f"override {item!r} is not of the form key=value")
        key, val = item.split("=", 1)
        merged[key.strip()] = val.strip()
    unknown = sorted(set(merged) - set(kinds))
    if unknown:
        raise UserError(f"unknown config field {unknown[0]!r}; valid fields: {', '.join(kinds)}")
    return FinetuneConfig(**{k: _coerce(k, kinds[k], v) for k, v in merged.items()})


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a YAML preset (or none) and apply overrides."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(values, dict):
            raise UserError(f"config file {p} must hold a mapping of field: value")
    return build_config(values, overrides)
