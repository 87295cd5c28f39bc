"""The settings of ``rewardiff distill``: one dataclass, read from YAML and ``--set key=value``."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from rewardiff.errors import UserError

VIEW_PROMPTS = ("auto", "view", "suffix", "none")


@dataclass
class DistillConfig:
    """Text-to-3D by score distillation, optionally with VP3D's visual prompt and rewards.

    The defaults are the 3D shapes world's (its view-conditioned prior, 32x32 renders). SDS
    alone is ``consistency_weight = text_reward_weight = 0``; SDS + visual prompt sets
    ``visual_prompt`` and ``consistency_weight``; VP3D adds ``text_reward`` with its weight.
    """

    model: str = "shapes-3d"  # any rewardiff model: a world's name, diffusers:DIR, a model folder
    prompt: str = "a red sphere"  # the text (a view-conditioned prior gets "TEXT | view:AZ,EL" per camera)
    steps: int = 200  # optimisation steps
    seed: int = 0
    # the scene: a blob of 3D Gaussians
    gaussians: int = 256
    init_radius: float = 1.2  # the initial means fill a ball of this radius around (0, 0, init_height) ...
    init_height: float = 0.3
    init_flatten: float = 0.3  # ... squashed vertically by this factor (the scene stands on the ground)
    init_opacity: float = 0.15  # low, so that SDS turns on the Gaussians it needs
    # cameras drawn each step
    views: int = 4  # renders per step (the SDS batch)
    size: int | None = None  # render side in pixels (None: the model's image size)
    elevation_min: float = 10.0
    elevation_max: float = 40.0
    distance: float = 4.0
    fov: float = 40.0
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)  # RGB behind the scene, for priors without a world of their own
    view_prompt: str = "auto"  # auto | view (the prior reads the camera) | suffix (", front view" ...) | none
    # SDS
    guidance_scale: float = 20.0  # SDS needs large scales (DreamFusion: 100; 10-30 on the 3D world's small prior)
    t_min: float = 0.02
    t_max: float = 0.98
    anneal_to: float | None = 0.5  # the upper end of t's range falls linearly to this over the run (None: fixed)
    weighting: str = "sds"  # sds (DreamFusion's w = sigma_t^2) | uniform
    sds_weight: float = 1.0
    # optimiser: Adam, one learning rate scaled per parameter group
    lr: float = 0.01
    lr_means: float = 5.0  # positions move fast enough to leave the centre
    lr_scales: float = 1.0
    lr_colors: float = 5.0
    lr_opacity: float = 5.0
    # VP3D: the visual prompt and the rewards, joining after a warm-up of SDS alone
    visual_prompt: str | None = None  # "generate" (the model samples it from the text) or an image file
    visual_prompt_view: tuple[float, float] = (0.0, 20.0)  # (azimuth, elevation) the visual prompt shows
    visual_prompt_steps: int = 30  # sampling steps of a generated visual prompt
    visual_prompt_guidance: float = 3.0
    consistency: str = "mse"  # the visual-consistency distance: mse | lpips-shapes | dists-shapes | lpips:DIR | dists:DIR
    consistency_weight: float = 0.0
    text_reward: str | None = None  # a differentiable reward of renders and the text (shapes3d-count, clip-score, ...)
    text_reward_weight: float = 0.0
    warmup: int = 40  # steps of SDS alone before the visual prompt and the rewards join (VP3D's schedule)
    # output
    checkpoint_every: int = 50
    turntable: int = 12  # views of the final turntable
    grad_log_every: int = 25  # log each term's gradient norm on the scene every this many steps (0: never)


def _convert(name: str, value: Any, like: Any, kind: str) -> Any:
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and "None" in kind):
        return None
    try:
        if "tuple" in kind:
            items = value if isinstance(value, (list, tuple)) else [v for v in str(value).split(",") if v.strip()]
            out = tuple(float(v) for v in items)
            if like is not None and len(out) != len(like):
                raise ValueError(f"{len(like)} numbers")
            return out
        if "int" in kind and "float" not in kind:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("an integer")
            return int(value)
        if "float" in kind:
            return float(value)
        if "str" in kind:
            return str(value)
    except (TypeError, ValueError) as e:
        raise UserError(f"distill config field {name}: cannot read {value!r} ({e})") from None
    return value


def load_config(path: Path | None = None, overrides: dict[str, Any] | None = None) -> DistillConfig:
    """The config of a YAML file (optional) updated by ``overrides``; a UserError names a wrong field."""
    data: dict[str, Any] = {}
    if path is not None:
        import yaml

        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise UserError(f"cannot read the distill config {path}: {str(e).splitlines()[0]}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise UserError(f"the distill config {path} is not a mapping of fields")
        data.update(loaded or {})
    data.update(overrides or {})
    known = {f.name: f for f in fields(DistillConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise UserError(f"unknown distill config field {unknown[0]!r}; fields: {', '.join(known)}")
    defaults = DistillConfig()
    values = {k: _convert(k, v, getattr(defaults, k), str(known[k].type)) for k, v in data.items()}
    cfg = DistillConfig(**values)
    check(cfg)
    return cfg


def check(cfg: DistillConfig) -> None:
    """A UserError naming the first field whose value cannot be run."""
    def need(ok: bool, field: str, what: str) -> None:
        if not ok:
            raise UserError(f"distill config field {field}={getattr(cfg, field)!r}: {what}")

    need(cfg.steps >= 1, "steps", "must be at least 1")
    need(cfg.gaussians >= 1, "gaussians", "must be at least 1")
    need(0.0 < cfg.init_opacity < 1.0, "init_opacity", "must lie strictly between 0 and 1")
    need(cfg.init_radius > 0 and cfg.init_flatten >= 0, "init_radius", "init_radius must be positive and init_flatten not negative")
    need(cfg.views >= 1, "views", "must be at least 1")
    need(cfg.size is None or cfg.size >= 8, "size", "must be at least 8 pixels")
    need(0.0 <= cfg.t_min < cfg.t_max <= 1.0, "t_max", "need 0 <= t_min < t_max <= 1")
    need(cfg.anneal_to is None or cfg.t_min <= cfg.anneal_to <= cfg.t_max, "anneal_to", "must lie in [t_min, t_max]")
    need(cfg.weighting in ("sds", "uniform"), "weighting", "sds or uniform")
    need(cfg.view_prompt in VIEW_PROMPTS, "view_prompt", " | ".join(VIEW_PROMPTS))
    need(cfg.elevation_min <= cfg.elevation_max, "elevation_max", "must be at least elevation_min")
    need(cfg.lr > 0, "lr", "must be positive")
    need(cfg.checkpoint_every >= 1, "checkpoint_every", "must be at least 1")
    need(cfg.turntable >= 1, "turntable", "must be at least 1")
    need(cfg.grad_log_every >= 0, "grad_log_every", "must be 0 (never) or more")
    need(cfg.consistency_weight == 0 or cfg.visual_prompt is not None, "consistency_weight",
         "needs a visual_prompt (generate, or an image file)")
    need(cfg.text_reward_weight == 0 or cfg.text_reward is not None, "text_reward_weight", "needs a text_reward")
    need(0 <= cfg.warmup <= cfg.steps, "warmup", "must lie in [0, steps]")
