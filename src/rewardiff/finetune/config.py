"""The fine-tuning configuration: one flat dataclass, YAML presets, typed overrides."""

from __future__ import annotations

import dataclasses
import math
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
    method: str = "draft-k"  # draft | draft-k | draft-lv | alignprop | refl | ddpo | vard | grpo | nft | gumbel
    steps: int = 200  # optimizer steps
    batch_size: int = 8  # trajectories per step
    lr: float = 3e-4  # AdamW learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    lora_rank: int = 8  # LoRA rank on the UNet or SD3's transformer (token models: their attention or linear layers); 0 fine-tunes all weights
    lora_alpha: float = 8.0  # LoRA scaling numerator (scale = alpha / rank)
    k: int = 3  # draft-k, gumbel on masked diffusion: steps at the end of the chain that carry gradient
    lv_n: int = 2  # draft-lv: re-noised copies of each sample
    num_inference_steps: int = 15  # sampler steps of the chain (DDIM steps, or a flow's Euler or SDE steps)
    eta: float = 0.0  # stochasticity of training rollouts: DDIM's eta (0 deterministic, 1 DDPM-like), or a flow's SDE noise level a (0: the ODE)
    guidance_scale: float = 2.0  # classifier-free guidance scale
    kl_weight: float = 0.0  # penalty to the base model: squared output distance (DRaFT+), per-step KL (vard), KL of the transition means (grpo: beta), squared velocity distance (nft), per-token KL (gumbel)
    grad_clip: float = 1.0  # max gradient norm (0 disables clipping)
    checkpointing: bool = True  # gradient checkpointing of every step in the window
    truncation: str = "uniform"  # alignprop: uniform | gaussian draw of the truncation point
    truncation_mean: float = 0.84  # alignprop gaussian: mean start, as a fraction of the chain
    truncation_std: float = 0.1  # alignprop gaussian: std, as a fraction of the chain
    refl_start: float = 0.75  # refl: earliest step (fraction of the chain) to jump from
    ppo_clip: float = 1e-4  # ddpo, grpo: clip range of the probability ratio
    adv_clip: float = 5.0  # ddpo, grpo, nft: advantages clipped to [-adv_clip, adv_clip]
    ppo_epochs: int = 1  # ddpo, grpo, nft: passes over each sampled batch
    ppo_minibatches: int = 2  # ddpo, grpo, nft: optimizer steps per pass (ddpo: divides batch_size; grpo, nft: slices of the rows kept)
    stat_buffer: int = 16  # ddpo: rewards kept per prompt for the advantage normalization
    stat_min_count: int = 16  # ddpo: below this many, a prompt is normalized with the batch's statistics
    timestep_fraction: float = 1.0  # ddpo, grpo, nft: share of the stochastic steps (nft: of the sampler's timesteps) trained on
    group_size: int = 1  # grpo, nft: samples of each prompt in a step's batch, its group (divides batch_size; Flow-GRPO: 8-24)
    global_std: bool = True  # grpo, nft: advantages divided by the std of the whole batch (the authors' default), else of each group
    sde_window: int = 0  # grpo: SDE steps of each chain, the ODE elsewhere, only they trained (0: every step; Flow-GRPO-Fast: 1-2)
    sde_window_mode: str = "random"  # grpo window: random (start drawn each step from the first sde_window_range steps: Flow-GRPO-Fast) | sliding (MixGRPO)
    sde_window_range: int = 0  # grpo random window: it lies within the first this many steps (0: the first half of the chain)
    sde_window_every: int = 25  # grpo sliding window: optimizer steps before it moves on (MixGRPO's shift interval)
    sde_window_stride: int = 1  # grpo sliding window: steps it moves by each time
    nft_beta: float = 1.0  # nft: the guidance strength beta of the implicit policies (v+ = beta v + (1 - beta) v_old)
    nft_decay_rate: float = 0.001  # nft: the old copy's EMA decay grows by this each step ...
    nft_decay_max: float = 0.5  # nft: ... up to this (the authors' decay_type 1: min(0.001 step, 0.5))
    eval_inference_steps: int = 0  # sampler steps of evaluations (0: num_inference_steps; Flow-GRPO trains with 10, evaluates with 40)
    eval_guidance_scale: float = -1.0  # guidance scale of evaluations (-1: guidance_scale; train CFG-free with guidance_scale=1)
    vard_value: str = ""  # vard: value model directory to start from (rewardiff train-value); "" fits one
    vard_warmup: int = 256  # vard: base-model trajectories the value is fitted on before the first update
    vard_warmup_steps: int = 400  # vard: value regression steps of the warm-up
    vard_value_steps: int = 8  # vard: value regression steps on each training batch
    vard_value_lr: float = 1e-3  # vard: Adam learning rate of the value model
    gumbel_tau: float = 0.3  # gumbel: temperature of the Gumbel-softmax relaxation (measured: 0.3 climbs, 1 does not)
    gumbel_estimator: str = "relaxed"  # gumbel: relaxed (the reward reads the relaxation) | straight-through (one-hot, relaxed gradient)
    prompts: str = "train"  # train | held-out | all | animals | animals-held-out | a .txt (one a line) or .json file
    eval_prompts: str = "held-out"  # prompts of the fixed evaluation set
    eval_samples: int = 96  # evaluation samples (fixed prompts and seeds); each evaluation costs about 2 x eval_samples x num_inference_steps x 2 (guidance) denoiser calls: the samples, then the base model along their paths for the KL (96 x 15: 5,760, a minute on a CPU for shapes)
    eval_every: int = 50  # steps between evaluations on the held-out set (0: only before and after)
    seed: int = 0  # seeds weights, prompts, noise
    checkpoint_every: int = 50  # steps between checkpoints (0: only at the end)
    mixed_precision: str = "no"  # no | bf16 (accelerate)
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (torch FSDP2; also on under accelerate's FSDP launch, configs/accelerate/fsdp.yaml)
    tracker: str = "none"  # none | tensorboard | wandb (through accelerate; metrics.jsonl is always written)
    reward_errors: str = "raise"  # raise | skip: a reward that fails (raises, NaN, wrong shape, timeout) stops the run, or its batch is skipped and counted
    reward_timeout: float = 0.0  # seconds a black-box reward call may take before it counts as failed (0: no limit)


def _coerce(name: str, kind: Any, value: Any) -> Any:
    """``value`` as the field's type, or a UserError naming the field.

    Strict where YAML is loose: ``true`` is not a number, a number is not a name, a float with
    a fraction is not an int, and text is taken only for a text field (or parsed, for a
    ``--set`` override, which is always text).
    """
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        kind = next(a for a in typing.get_args(kind) if a is not type(None))

    def bad() -> UserError:
        return UserError(f"config field {name!r} expects {kind.__name__}, got {_show(value)}")

    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise bad()
    if kind is str:
        if not isinstance(value, str):
            raise bad()
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise bad()
    try:
        if kind is int:
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError
                return int(value)
            return int(value)
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        raise bad() from None


def _show(value: Any) -> str:
    """A value for a one-line message: its repr, shortened, with its type when not obvious."""
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return text if isinstance(value, (str, int, float)) else f"{text} ({type(value).__name__})"


MAX_SEED = 2**32 - 1  # numpy's generators take seeds below 2**32
MAX_INT = 2**31 - 1  # the largest count (steps, batch size, ...) a config takes


def _range_errors(cfg: "FinetuneConfig") -> list[str]:
    """What is out of range in ``cfg``: one phrase per field, empty when everything is."""
    errs: list[str] = []

    failed: set[str] = set()

    def need(ok: bool, field: str, what: str) -> None:
        if not ok and field not in failed:  # one phrase a field: its first unmet condition
            failed.add(field)
            errs.append(f"config field {field!r} must be {what}, got {getattr(cfg, field)!r}")

    need(cfg.steps >= 1, "steps", "at least 1")
    need(cfg.batch_size >= 1, "batch_size", "at least 1")
    need(cfg.lr > 0, "lr", "a positive number")
    need(cfg.weight_decay >= 0, "weight_decay", "a number >= 0")
    need(cfg.lora_rank >= 0, "lora_rank", "0 (every weight) or a positive rank")
    need(cfg.lora_alpha > 0, "lora_alpha", "a positive number")
    need(1 <= cfg.num_inference_steps <= 1000, "num_inference_steps", "between 1 and 1000")
    need(1 <= cfg.k <= max(1, cfg.num_inference_steps), "k", f"between 1 and num_inference_steps ({cfg.num_inference_steps})")
    need(cfg.lv_n >= 1, "lv_n", "at least 1")
    need(0 <= cfg.eta <= 1, "eta", "in [0, 1]")
    need(cfg.guidance_scale >= 0, "guidance_scale", "a number >= 0")
    need(cfg.kl_weight >= 0, "kl_weight", "a number >= 0")
    need(cfg.grad_clip >= 0, "grad_clip", "a number >= 0 (0 disables clipping)")
    need(cfg.truncation in ("uniform", "gaussian"), "truncation", "uniform or gaussian")
    need(0 <= cfg.truncation_mean <= 1, "truncation_mean", "in [0, 1]")
    need(cfg.truncation_std > 0, "truncation_std", "a positive number")
    need(0 <= cfg.refl_start < 1, "refl_start", "in [0, 1)")
    need(cfg.ppo_clip > 0, "ppo_clip", "a positive number")
    need(cfg.adv_clip > 0, "adv_clip", "a positive number")
    need(cfg.ppo_epochs >= 1, "ppo_epochs", "at least 1")
    need(cfg.ppo_minibatches >= 1 and (cfg.method != "ddpo" or cfg.batch_size % cfg.ppo_minibatches == 0), "ppo_minibatches",
         f"at least 1 and (ddpo) divide batch_size ({cfg.batch_size})")
    need(cfg.stat_buffer >= 1, "stat_buffer", "at least 1")
    need(cfg.stat_min_count >= 0, "stat_min_count", "at least 0")
    need(0 < cfg.timestep_fraction <= 1, "timestep_fraction", "in (0, 1]")
    need(cfg.group_size >= 1 and cfg.batch_size % cfg.group_size == 0, "group_size", f"at least 1 and divide batch_size ({cfg.batch_size})")
    need(0 <= cfg.sde_window <= cfg.num_inference_steps, "sde_window", f"between 0 and num_inference_steps ({cfg.num_inference_steps})")
    need(cfg.sde_window_mode in ("random", "sliding"), "sde_window_mode", "random or sliding")
    need(cfg.sde_window_range == 0 or cfg.sde_window <= cfg.sde_window_range <= cfg.num_inference_steps, "sde_window_range",
         f"0 or between sde_window ({cfg.sde_window}) and num_inference_steps ({cfg.num_inference_steps})")
    need(cfg.sde_window_every >= 1, "sde_window_every", "at least 1")
    need(cfg.sde_window_stride >= 1, "sde_window_stride", "at least 1")
    need(cfg.nft_beta > 0, "nft_beta", "a positive number")
    need(cfg.nft_decay_rate >= 0, "nft_decay_rate", "a number >= 0")
    need(0 <= cfg.nft_decay_max < 1, "nft_decay_max", "in [0, 1)")
    need(0 <= cfg.eval_inference_steps <= 1000, "eval_inference_steps", "between 0 (num_inference_steps) and 1000")
    need(cfg.eval_guidance_scale >= 0 or cfg.eval_guidance_scale == -1, "eval_guidance_scale", "-1 (guidance_scale) or a number >= 0")
    need(cfg.vard_warmup >= 1, "vard_warmup", "at least 1")
    need(cfg.vard_warmup_steps >= 0, "vard_warmup_steps", "at least 0")
    need(cfg.vard_value_steps >= 0, "vard_value_steps", "at least 0")
    need(cfg.vard_value_lr > 0, "vard_value_lr", "a positive number")
    need(cfg.gumbel_tau > 0, "gumbel_tau", "a positive number")
    need(cfg.gumbel_estimator in ("relaxed", "straight-through"), "gumbel_estimator", "relaxed or straight-through")
    need(cfg.eval_samples >= 1, "eval_samples", "at least 1")
    need(cfg.eval_every >= 0, "eval_every", "at least 0 (0: only before and after)")
    need(0 <= cfg.seed <= MAX_SEED, "seed", f"between 0 and {MAX_SEED}")
    need(cfg.checkpoint_every >= 0, "checkpoint_every", "at least 0 (0: only at the end)")
    need(cfg.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision", "no, bf16 or fp16")
    need(cfg.reward_errors in ("raise", "skip"), "reward_errors", "raise or skip")
    need(cfg.reward_timeout >= 0, "reward_timeout", "a number of seconds >= 0 (0: no limit)")
    for field in ("model", "reward", "method", "prompts", "eval_prompts"):
        need(bool(getattr(cfg, field).strip()), field, "a non-empty name")
    for field, kind in _field_types().items():
        if kind is int and field != "seed":  # no count of anything needs more than 31 bits
            need(getattr(cfg, field) <= MAX_INT, field, f"at most {MAX_INT}")
        if kind is float:  # after the ranges above, which NaN fails already: this names inf
            need(math.isfinite(getattr(cfg, field)), field, "a finite number")
    return errs


def validate(cfg: "FinetuneConfig") -> "FinetuneConfig":
    """``cfg`` when every field is in range; a UserError naming the first field that is not.

    Checks values only (names of models, rewards and methods are checked where they are
    looked up); called by :func:`build_config`, so every config read from a file or the
    command line, and every saved run's, passes through it.
    """
    errs = _range_errors(cfg)
    if errs:
        more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
        raise UserError(errs[0] + more)
    return cfg


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
    return validate(FinetuneConfig(**{k: _coerce(k, kinds[k], v) for k, v in merged.items()}))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> FinetuneConfig:
    """Read a YAML preset (or none) and apply overrides."""
    import yaml

    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"config file {p} is a directory, not a YAML file")
        if not p.is_file():
            raise UserError(f"config file not found: {p}")
        try:
            values = yaml.safe_load(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise UserError(f"config file {p} is not UTF-8 text (a binary file?)") from None
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not values:
            raise UserError(f"config file {p} is empty; a preset holds field: value lines (see configs/*.yaml)")
        if not isinstance(values, dict):
            raise UserError(f"config file {p} must hold a mapping of field: value")
    return build_config(values, overrides)
