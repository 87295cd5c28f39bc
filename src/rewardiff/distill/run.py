"""``rewardiff distill``: text-to-3D by score distillation from any rewardiff model, with VP3D's terms.

The parameters optimised are a scene's (3D Gaussians, :mod:`rewardiff.render`); the diffusion
model is a frozen prior. Each step draws ``views`` cameras, renders the scene, and descends

    sds_weight * L_SDS                                   (DreamFusion; :mod:`rewardiff.distill.sds`)
  + consistency_weight * d(render from the visual prompt's view, visual prompt)   (after warm-up)
  - text_reward_weight * mean reward(renders, text)                               (after warm-up)

VP3D (Chen et al., CVPR 2024, arXiv 2403.17001) first samples a visual prompt from the text with
a 2D model, then optimises SDS alone for a warm-up and adds the visual-consistency and
text-alignment (human-feedback reward) terms after it. Deviations from the paper, by design of
this small setting: the visual prompt acts through the consistency term only (VP3D also feeds it
to the prior through an image-prompt adapter, which rewardiff's priors do not have); the scene
is a few hundred Gaussians splatted at 32-64 px, not a NeRF/DMTet at 512 px.

Everything a step draws (cameras, noise levels, noise) comes from a generator seeded by
(seed, step), and a checkpoint holds the scene and Adam's state, so a run stopped at any step
(Ctrl-C, SIGTERM) resumes bit for bit from its last checkpoint.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.distill.config import DistillConfig
from rewardiff.distill.sds import sds_gradient, sds_loss, t_range_at
from rewardiff.errors import Stopped, UserError
from rewardiff.io import atomic_write, atomic_write_text, truncate_jsonl

VIEW_SCHEME = "view"  # a view-conditioned prior's prompts: "TEXT | view:AZ,EL"


# ----------------------------------------------------------------------------- prompts of views


def view_prompt(text: str, azimuth: float, elevation: float, mode: str) -> str:
    """The prompt the prior reads for a render from (azimuth, elevation), by ``mode``:

    - ``view``: ``"TEXT | view:AZ,EL"`` (degrees), for priors conditioned on the camera;
    - ``suffix``: DreamFusion's view-dependent text, ``"TEXT, front view"`` (azimuth within 45
      degrees of 0), ``side view``, ``back view`` (within 45 of 180), ``overhead view`` (elevation > 60);
    - ``none``: the text alone.
    """
    if mode == "view":
        return f"{text} | {VIEW_SCHEME}:{azimuth:.1f},{elevation:.1f}"
    if mode == "suffix":
        a = azimuth % 360.0
        if elevation > 60:
            side = "overhead"
        elif a <= 45 or a >= 315:
            side = "front"
        elif 135 <= a <= 225:
            side = "back"
        else:
            side = "side"
        return f"{text}, {side} view"
    return text


def resolve_view_mode(model: Any, mode: str) -> str:
    """``auto``: ``view`` for a model that reads cameras (``model.view_conditioned``), else ``none``."""
    if mode == "auto":
        return "view" if getattr(model, "view_conditioned", False) else "none"
    if mode == "view" and not getattr(model, "view_conditioned", False):
        raise UserError(f"view_prompt=view: model {model.name!r} does not read cameras; use suffix or none")
    return mode


# ----------------------------------------------------------------------------- the model's image space


def background(model: Any, cfg: DistillConfig):
    """What the scene is rendered over: the world's own ground and sky where the prior was trained
    on them (``model.render_background(camera, size)``), else the config's plain colour."""
    return getattr(model, "render_background", None) or tuple(cfg.background)


def render_size(model: Any, cfg: DistillConfig) -> int:
    """The side of the renders: the config's, or the size of the images the model makes."""
    if cfg.size is not None:
        return int(cfg.size)
    return int(getattr(model, "image_size", model.shape[-1]))


def to_net_space(model: Any, images: Tensor) -> Tensor:
    """Renders in [-1, 1] -> the space the model denoises: the VAE's latents for a latent model
    (``model.encode_images``), the images themselves for a pixel model (resized to its shape)."""
    enc = getattr(model, "encode_images", None)
    if enc is not None:
        return enc(images)
    if tuple(images.shape[1:]) != tuple(model.shape):
        if len(model.shape) != 3 or model.shape[0] != images.shape[1]:
            raise UserError(f"model {model.name!r} denoises samples of shape {tuple(model.shape)}, not images; "
                            "score distillation needs an image model")
        images = F.interpolate(images, size=tuple(model.shape[1:]), mode="bilinear", align_corners=False)
    return images


# ----------------------------------------------------------------------------- visual consistency


def consistency_metric(spec: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The visual-consistency distance by name, (x [B,3,H,W], y [B,3,H,W]) -> [B], 0 for equal images:
    ``mse`` (pixels), a world's (``rewardiff.plugins.FEATURE_DISTANCES``: ``lpips-shapes`` /
    ``dists-shapes`` over the shapes reward model's features), ``lpips:DIR`` / ``dists:DIR``
    (LPIPS v0.1 / DISTS weights in DIR)."""
    if spec == "mse":
        return lambda x, y: (x - y.to(x)).pow(2).flatten(1).mean(1)
    from rewardiff import plugins

    if spec in plugins.FEATURE_DISTANCES:
        return plugins.load(plugins.FEATURE_DISTANCES[spec])()
    kind, sep, folder = spec.partition(":")
    if sep and kind in ("lpips", "dists"):
        from rewardiff.rewards import perceptual

        return perceptual.lpips_metric(Path(folder)) if kind == "lpips" else perceptual.dists_metric(Path(folder))
    raise UserError(f"unknown consistency {spec!r}; mse, {', '.join(plugins.FEATURE_DISTANCES)}, lpips:DIR or dists:DIR")


def load_visual_prompt(cfg: DistillConfig, model: Any, size: int, mode: str, out: Path) -> Tensor | None:
    """The visual prompt [3, size, size] in [-1, 1], saved to ``out/visual_prompt.png``: the model's
    own sample of the text from ``visual_prompt_view`` (``generate``; VP3D's first stage), or an image file."""
    if cfg.visual_prompt is None:
        return None
    saved = out / "visual_prompt.safetensors"
    if saved.is_file():  # a resumed run keeps the visual prompt it started with
        from safetensors.torch import load_file

        return load_file(str(saved))["image"]
    if cfg.visual_prompt == "generate":
        az, el = cfg.visual_prompt_view
        prompt = view_prompt(cfg.prompt, az, el, mode)
        with torch.no_grad():
            img = model.generate([prompt], [cfg.seed], num_inference_steps=cfg.visual_prompt_steps,
                                 guidance_scale=cfg.visual_prompt_guidance)[0].float().cpu()
    else:
        from rewardiff.conditions import read_image

        path = Path(cfg.visual_prompt)
        if not path.is_file():
            raise UserError(f"visual_prompt {cfg.visual_prompt!r}: no such image file (or 'generate')")
        img = read_image(str(path))
    if img.shape[-1] != size or img.shape[-2] != size:
        img = F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False)[0]
    from safetensors.torch import save_file

    atomic_write(saved, lambda p: save_file({"image": img.contiguous()}, str(p)))
    from rewardiff.report.grid import save_grid

    save_grid(img[None], out / "visual_prompt.png", nrow=1, scale=8)
    return img


# ----------------------------------------------------------------------------- checkpoints


def _save_checkpoint(out: Path, step: int, scene, opt) -> None:
    from safetensors.torch import save_file

    ckpt = out / "checkpoint"
    state = {k: v.detach().contiguous() for k, v in scene.state_dict().items()}
    atomic_write(ckpt / "scene.safetensors", lambda p: save_file(state, str(p)))
    atomic_write(ckpt / "optimizer.pt", lambda p: torch.save(opt.state_dict(), p))
    atomic_write_text(ckpt / "state.json", json.dumps({"step": step}))  # last: its step names a whole checkpoint


def _load_checkpoint(out: Path, scene, opt) -> int:
    from safetensors.torch import load_file

    ckpt = out / "checkpoint"
    if not (ckpt / "state.json").is_file():
        return 0
    scene.load_state_dict(load_file(str(ckpt / "scene.safetensors")))
    opt.load_state_dict(torch.load(ckpt / "optimizer.pt", weights_only=True))
    return int(json.loads((ckpt / "state.json").read_text())["step"])


def _check_resumable(out: Path, cfg: DistillConfig, resume: bool) -> None:
    saved = out / "config.json"
    if not saved.is_file():
        return
    if not resume:
        raise UserError(f"{out} already holds a distillation run; pass --resume to continue it, or choose another --out")
    old = json.loads(saved.read_text())
    new = json.loads(json.dumps(asdict(cfg)))
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k) and k != "steps")
    if diff:
        raise UserError(f"{out} was distilled with another config ({diff[0]}: {old.get(diff[0])!r} there, "
                        f"{new.get(diff[0])!r} now); resume with the same config")


# ----------------------------------------------------------------------------- the loop


def term_gradient_norms(terms: dict[str, Tensor], params: list[Tensor]) -> dict[str, float]:
    """The norm of each weighted loss term's gradient on the scene's parameters (``grad_TERM``):
    how hard each term pulls, to weigh SDS against the rewards (one extra backward a term)."""
    out = {}
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        out[f"grad_{name}"] = float(torch.sqrt(sum((g.detach() ** 2).sum() for g in grads if g is not None)))
    return out


def make_scene(cfg: DistillConfig):
    """The initial scene, seeded by the config: ``gaussians`` Gaussians uniform in a ball of
    ``init_radius`` squashed vertically by ``init_flatten`` around (0, 0, init_height), at
    ``init_opacity`` (3D Gaussian text-to-3D starts so: a faint cloud SDS carves objects from)."""
    from rewardiff.render import Gaussians

    g = torch.Generator().manual_seed(cfg.seed)
    scene = Gaussians.random(cfg.gaussians, g, cfg.init_radius, opacity=cfg.init_opacity)
    with torch.no_grad():
        scene.means[:, 2] = scene.means[:, 2] * cfg.init_flatten + cfg.init_height
    return scene


def cameras(cfg: DistillConfig, g: torch.Generator, n: int):
    """n cameras: azimuth uniform in [0, 360), elevation uniform in the config's range."""
    from rewardiff.render import Camera

    u = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return [Camera(float(360.0 * a), float(cfg.elevation_min + (cfg.elevation_max - cfg.elevation_min) * e),
                   distance=cfg.distance, fov=cfg.fov) for a, e in u.tolist()]


def turntable_cameras(cfg: DistillConfig, n: int, elevation: float | None = None):
    """n cameras evenly round the scene at the middle elevation (or ``elevation``)."""
    from rewardiff.render import Camera

    el = 0.5 * (cfg.elevation_min + cfg.elevation_max) if elevation is None else elevation
    return [Camera(360.0 * k / n, el, distance=cfg.distance, fov=cfg.fov) for k in range(n)]


def _param_groups(scene, cfg: DistillConfig) -> list[dict]:
    scale = {"means": cfg.lr_means, "log_scales": cfg.lr_scales, "color_logits": cfg.lr_colors, "opacity_logits": cfg.lr_opacity}
    groups = []
    for name, p in scene.named_parameters():
        groups.append({"params": [p], "lr": cfg.lr * scale.get(name.split(".")[-1], 1.0), "name": name})
    return groups


def distill(cfg: DistillConfig, out: Path, resume: bool = False, progress: bool = True,
            model: Any = None, judge: Callable[[Tensor, str], dict] | None = None) -> dict:
    """Run the distillation into ``out`` (resumable), then write the turntable, summary and report.

    Args:
        cfg: the settings.
        out: the run folder (``config.json``, ``checkpoint/``, ``metrics.jsonl``, ``scene.safetensors``,
            ``turntable.png`` / ``.gif``, ``summary.json``, ``report.html``).
        resume: continue the run in ``out`` (same config; ``steps`` may grow).
        model: the prior, already loaded (None: ``cfg.model`` by name).
        judge: ``judge(views [V,3,H,W], text) -> dict of figures`` read on the final turntable
            (None: the world's, when the model belongs to a world with a 3D judge).

    Returns:
        The summary (also ``out/summary.json``).
    """
    from tqdm import tqdm

    from rewardiff.finetune.trainer import StopSignals
    from rewardiff.render import render_views

    out = Path(out)
    _check_resumable(out, cfg, resume)
    if model is None:
        from rewardiff.sampling import load_model

        model = load_model(cfg.model)
    net = model.net
    net.requires_grad_(False)
    mode = resolve_view_mode(model, cfg.view_prompt)
    if getattr(model, "check_prompts", None) is not None:
        model.check_prompts([view_prompt(cfg.prompt, 0.0, 20.0, mode)])
    size = render_size(model, cfg)
    text_reward = None
    if cfg.text_reward is not None and cfg.text_reward_weight != 0:
        from rewardiff.rewards import get_reward

        text_reward = get_reward(cfg.text_reward)
        if not getattr(text_reward, "differentiable", False):
            raise UserError(f"text_reward {cfg.text_reward!r} is not differentiable; distillation pushes its gradient into the scene")
    metric = consistency_metric(cfg.consistency) if cfg.consistency_weight != 0 else None

    if cfg.visual_prompt not in (None, "generate") and not Path(cfg.visual_prompt).is_file() and not resume:
        raise UserError(f"visual_prompt {cfg.visual_prompt!r}: no such image file (or 'generate')")  # before anything is written
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.json", json.dumps(asdict(cfg), indent=2))
    vp = load_visual_prompt(cfg, model, size, mode, out)
    scene = make_scene(cfg)
    opt = torch.optim.Adam(_param_groups(scene, cfg), eps=1e-15)
    start = _load_checkpoint(out, scene, opt)
    truncate_jsonl(out / "metrics.jsonl", start)
    bg = background(model, cfg)

    with StopSignals() as stop, (out / "metrics.jsonl").open("a") as log:
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress, desc="distill")
        for step in bar:
            t0 = time.time()
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            cams = cameras(cfg, g, cfg.views)
            images = render_views(scene, cams, size, background=bg)
            prompts = [view_prompt(cfg.prompt, c.azimuth, c.elevation, mode) for c in cams]
            x = to_net_space(model, images)
            lo, hi = t_range_at(step, cfg.steps, cfg.t_min, cfg.t_max, cfg.anneal_to)
            tau = lo + (hi - lo) * torch.rand(cfg.views, generator=g, dtype=torch.float64)
            noise = torch.randn(x.shape, generator=g).to(x)
            with torch.no_grad():
                cond = model.encode(prompts)
                uncond = model.encode(model.unconditional(prompts)) if cfg.guidance_scale != 1.0 else None
            grad, stats = sds_gradient(model, x, cond, uncond, tau, noise, cfg.guidance_scale, cfg.weighting)
            terms = {"sds": cfg.sds_weight * sds_loss(x, grad)}
            row: dict[str, Any] = {"step": step + 1, "t": stats["t"], "sds_grad_norm": stats["grad_norm"]}
            if step >= cfg.warmup:
                if metric is not None and vp is not None:
                    from rewardiff.render import Camera

                    az, el = cfg.visual_prompt_view
                    front = render_views(scene, [Camera(az, el, distance=cfg.distance, fov=cfg.fov)], size, background=bg)
                    d = metric(front, vp[None].to(front)).mean()
                    terms["consistency"] = cfg.consistency_weight * d
                    row["consistency"] = float(d.detach())
                if text_reward is not None:
                    r = text_reward(images, [cfg.prompt] * len(cams)).mean()
                    terms["text_reward"] = -cfg.text_reward_weight * r
                    row["text_reward"] = float(r.detach())
            if cfg.grad_log_every and (step % cfg.grad_log_every == 0 or (step == cfg.warmup and len(terms) > 1)):
                row.update(term_gradient_norms(terms, list(scene.parameters())))
            opt.zero_grad(set_to_none=True)
            sum(terms.values()).backward()
            opt.step()
            row["seconds"] = time.time() - t0
            log.write(json.dumps(row) + "\n")
            bar.set_postfix(t=f"{stats['t']:.2f}", **({"reward": f"{row['text_reward']:.3f}"} if "text_reward" in row else {}))
            done = step + 1
            if done % cfg.checkpoint_every == 0 or done == cfg.steps or stop.signum is not None:
                log.flush()
                _save_checkpoint(out, done, scene, opt)
            if stop.signum is not None and done < cfg.steps:
                raise Stopped(stop.signum, f"stopped at step {done}; checkpoint in {out / 'checkpoint'} "
                                           f"(continue with rewardiff distill --out {out} --resume)")
    return finish(cfg, out, scene, model, mode, size, vp, judge)


# ----------------------------------------------------------------------------- the end of a run


def finish(cfg: DistillConfig, out: Path, scene, model: Any, mode: str, size: int, vp: Tensor | None,
           judge: Callable[[Tensor, str], dict] | None) -> dict:
    """The final scene, its turntable (PNG strip and GIF), the judge's figures, summary and report."""
    from safetensors.torch import save_file

    from rewardiff.render import render_views
    from rewardiff.report.grid import save_gif, save_grid
    from rewardiff.report.strict import write_json

    state = {k: v.detach().contiguous() for k, v in scene.state_dict().items()}
    atomic_write(out / "scene.safetensors", lambda p: save_file(state, str(p)))
    with torch.no_grad():
        views = render_views(scene, turntable_cameras(cfg, cfg.turntable), size, background=background(model, cfg))
    save_grid(views, out / "turntable.png", nrow=cfg.turntable, scale=4)
    save_gif(views.permute(1, 0, 2, 3), out / "turntable.gif", scale=4, fps=6)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    secs = sorted(r["seconds"] for r in metrics if "seconds" in r)
    summary: dict[str, Any] = {"prompt": cfg.prompt, "model": cfg.model, "steps": cfg.steps, "view_prompt": mode,
                               "seconds_per_step": secs[len(secs) // 2] if secs else None}
    for key in ("consistency", "text_reward"):
        vals = [r[key] for r in metrics if key in r]
        if vals:
            summary[f"{key}_last"] = sum(vals[-10:]) / len(vals[-10:])
    if judge is None:
        judge = world_judge(model)
    if judge is not None:
        summary["judge"] = judge(views, cfg.prompt)
    write_json(out / "summary.json", summary)
    _report(cfg, out, summary, metrics, vp is not None)
    return summary


def world_judge(model: Any) -> Callable[[Tensor, str], dict] | None:
    """The 3D judge of the model's world (``rewardiff.plugins.JUDGES_3D``), or None."""
    from rewardiff import plugins

    target = getattr(plugins, "JUDGES_3D", {}).get(getattr(model, "world", None) or "")
    return plugins.load(target) if target else None


def _report(cfg: DistillConfig, out: Path, summary: dict, metrics: list[dict], has_vp: bool) -> None:
    from rewardiff.report.html import Section, write_report
    from rewardiff.report.plots import column, plot_curves

    series = {k: column(metrics, k) for k in ("sds_grad_norm", "consistency", "text_reward") if any(k in r for r in metrics)}
    plots = []
    for key, points in series.items():
        path = out / f"{key}.png"
        plot_curves({key: points}, path, ylabel=key, title=key.replace("_", " "))
        plots.append(path)
    rows = [["figure", "value"]] + [[k, v] for k, v in summary.items() if not isinstance(v, dict)]
    rows += [[f"judge {k}", v] for k, v in (summary.get("judge") or {}).items()]
    sections = [Section("Turntable", images=[out / "turntable.png", out / "turntable.gif"]),
                *([Section("Visual prompt", images=[out / "visual_prompt.png"])] if has_vp else []),
                Section("Figures", table=rows),
                Section("Curves", images=plots)]
    meta = {"prompt": cfg.prompt, "model": cfg.model, "steps": cfg.steps, "seed": cfg.seed, "guidance scale": cfg.guidance_scale,
            "visual prompt": cfg.visual_prompt or "none", "text reward": cfg.text_reward or "none"}
    write_report(out, f"distill: {cfg.prompt}", sections, meta=meta)
