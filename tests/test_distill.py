"""``rewardiff distill`` end to end: SDS pulls a scene onto what a perfect view-conditioned prior
knows, a sign-flipped SDS does not, runs resume bit for bit, the VP3D terms act, and latent
models distil through their VAE.

The perfect prior: for the prompt "TEXT | view:AZ,EL" its data is a point mass at the render of
a fixed target scene from that camera, and its denoiser is that point mass's ideal one in
closed form. Distilling it must recover the target's renders from every view.
"""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch
from torch import nn

from rewardiff import conditions
from rewardiff.distill.config import DistillConfig, load_config
from rewardiff.distill.run import distill, make_scene, view_prompt
from rewardiff.errors import Stopped, UserError
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess
from rewardiff.render import Camera, Gaussians, render_views

SIZE = 16


def target_scene() -> Gaussians:
    means = torch.tensor([[0.5, 0.0, 0.4], [-0.5, 0.3, 0.4], [0.0, -0.5, 0.3]])
    colors = torch.tensor([[0.9, 0.1, 0.1], [0.1, 0.2, 0.9], [0.1, 0.8, 0.2]])
    return Gaussians.from_tensors(means, torch.full((3, 3), 0.3), colors, torch.full((3,), 0.95))


class PointMassNet(nn.Module):
    """epsilon-prediction of the point mass at ``cond`` (images [B, 3, H, W])."""

    def __init__(self, process):
        super().__init__()
        self.process = process
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_t, t, cond):
        a = self.process.alpha_bar(t).view(-1, 1, 1, 1)
        return (x_t - a.sqrt() * cond) / (1 - a).sqrt()


def camera_of(prompt: str, cfg: DistillConfig) -> Camera:
    _, ref = conditions.split(prompt)
    az, el = (float(v) for v in ref.partition(":")[2].split(","))
    return Camera(az, el, distance=cfg.distance, fov=cfg.fov)


def perfect_prior(cfg: DistillConfig) -> DiffusionModel:
    scene = target_scene()
    process = GaussianProcess.from_config("cosine", 1000, False, "epsilon")

    @torch.no_grad()
    def encode(prompts):
        return render_views(scene, [camera_of(p, cfg) for p in prompts], SIZE)

    model = DiffusionModel(PointMassNet(process), process, encode, (3, SIZE, SIZE), name="perfect",
                           unconditional=lambda ps: [conditions.unconditional(p) for p in ps])
    model.view_conditioned = True
    return model


def config(**kw) -> DistillConfig:
    base = dict(prompt="a scene", steps=80, gaussians=48, views=4, size=SIZE, guidance_scale=1.0, lr=0.02,
                init_radius=0.5, init_height=0.3, init_flatten=1.0, init_opacity=0.5, warmup=0, checkpoint_every=10, turntable=6)
    base.update(kw)
    return DistillConfig(**base)


def multiview_error(scene: Gaussians, cfg: DistillConfig) -> float:
    cams = [Camera(az, 25.0, distance=cfg.distance, fov=cfg.fov) for az in (15.0, 100.0, 200.0, 290.0)]  # not the training draws
    with torch.no_grad():
        return float((render_views(scene, cams, SIZE) - render_views(target_scene(), cams, SIZE)).pow(2).mean())


def final_scene(out) -> Gaussians:
    from safetensors.torch import load_file

    return Gaussians.from_state_dict(load_file(str(out / "scene.safetensors")))


def test_sds_recovers_the_perfect_priors_scene_and_flipped_sds_does_not(tmp_path, monkeypatch):
    cfg = config()
    before = multiview_error(make_scene(cfg), cfg)
    summary = distill(cfg, tmp_path / "ok", progress=False, model=perfect_prior(cfg), judge=lambda v, t: {"views": int(v.shape[0])})
    after = multiview_error(final_scene(tmp_path / "ok"), cfg)
    assert after < 0.35 * before, (before, after)
    assert summary["judge"] == {"views": 6}
    for name in ("turntable.png", "turntable.gif", "report.html", "summary.json", "metrics.jsonl"):
        assert (tmp_path / "ok" / name).is_file()

    import rewardiff.distill.run as run

    real = run.sds_gradient

    def flipped(*a, **k):
        g, s = real(*a, **k)
        return -g, s

    monkeypatch.setattr(run, "sds_gradient", flipped)
    distill(cfg, tmp_path / "flipped", progress=False, model=perfect_prior(cfg), judge=lambda v, t: {})
    assert multiview_error(final_scene(tmp_path / "flipped"), cfg) > 0.8 * before


def test_a_stopped_run_resumes_bit_for_bit(tmp_path, monkeypatch):
    cfg = config(steps=14, checkpoint_every=5)
    distill(cfg, tmp_path / "whole", progress=False, model=perfect_prior(cfg), judge=lambda v, t: {})

    import rewardiff.distill.run as run

    calls = {"n": 0}
    real_cameras = run.cameras

    def cameras(cfg_, g, n):
        calls["n"] += 1
        if calls["n"] == 8:
            os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C: the step finishes, a checkpoint is written
        return real_cameras(cfg_, g, n)

    monkeypatch.setattr(run, "cameras", cameras)
    with pytest.raises(Stopped):
        distill(cfg, tmp_path / "split", progress=False, model=perfect_prior(cfg), judge=lambda v, t: {})
    assert json.loads((tmp_path / "split" / "checkpoint" / "state.json").read_text())["step"] == 8
    monkeypatch.setattr(run, "cameras", real_cameras)
    with pytest.raises(UserError, match="--resume"):
        distill(cfg, tmp_path / "split", progress=False, model=perfect_prior(cfg), judge=lambda v, t: {})
    distill(cfg, tmp_path / "split", resume=True, progress=False, model=perfect_prior(cfg), judge=lambda v, t: {})
    a, b = final_scene(tmp_path / "whole"), final_scene(tmp_path / "split")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    rows = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 15))


def test_visual_prompt_consistency_pulls_the_front_view_onto_the_prompt_image(tmp_path):
    """With SDS switched off (sds_weight 0), the consistency term alone fits the render from the
    visual prompt's view to the visual prompt; before the warm-up ends it does nothing."""
    cfg0 = config()
    vp = render_views(target_scene(), [Camera(0.0, 20.0, distance=cfg0.distance, fov=cfg0.fov)], SIZE)[0]
    from rewardiff.report.grid import save_grid

    save_grid(vp[None], tmp_path / "vp.png", nrow=1, scale=1)
    cfg = config(sds_weight=0.0, visual_prompt=str(tmp_path / "vp.png"), consistency="mse", consistency_weight=1.0,
                 steps=80, warmup=20)
    distill(cfg, tmp_path / "run", progress=False, model=perfect_prior(cfg), judge=lambda v, t: {})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all("consistency" not in r for r in rows[:20])
    assert rows[0]["grad_sds"] == 0.0 and rows[20]["grad_consistency"] > 0  # SDS off; the term's pull logged as it joins
    cons = [r["consistency"] for r in rows[20:]]
    assert cons[-1] < 0.5 * cons[0], (cons[0], cons[-1])
    assert (tmp_path / "run" / "visual_prompt.png").is_file()


def test_view_prompts():
    assert view_prompt("a red sphere", 30.0, 15.0, "view") == "a red sphere | view:30.0,15.0"
    assert view_prompt("a cat", 10.0, 20.0, "suffix") == "a cat, front view"
    assert view_prompt("a cat", 180.0, 20.0, "suffix") == "a cat, back view"
    assert view_prompt("a cat", 90.0, 20.0, "suffix") == "a cat, side view"
    assert view_prompt("a cat", 90.0, 70.0, "suffix") == "a cat, overhead view"
    assert view_prompt("a cat", 90.0, 20.0, "none") == "a cat"


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(UserError, match="unknown distill config field 'stepz'"):
        load_config(None, {"stepz": 3})
    with pytest.raises(UserError, match="t_max"):
        load_config(None, {"t_min": 0.9, "t_max": 0.5})
    with pytest.raises(UserError, match="consistency_weight"):
        load_config(None, {"consistency_weight": 1.0})
    with pytest.raises(UserError, match="guidance_scale"):
        load_config(None, {"guidance_scale": "big"})
    assert load_config(None, {"anneal_to": "none", "visual_prompt_view": "30,10"}).visual_prompt_view == (30.0, 10.0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a list\n")
    with pytest.raises(UserError, match="not a mapping"):
        load_config(bad)


def test_latent_sd_model_distils_through_its_vae(tmp_path):
    """A tiny Stable Diffusion pipeline: renders go through the VAE encoder into latents, the SDS
    gradient comes back through it into every Gaussian parameter."""
    from rewardiff.models.sd import sd_model, tiny_pipeline

    from diffusers import AutoencoderKL

    d = tiny_pipeline(tmp_path / "sd")
    model = sd_model(str(d))
    x = torch.rand(2, 3, model.image_size, model.image_size) * 2 - 1
    z = model.encode_images(x)
    assert z.shape == (2, *model.shape)
    vae = AutoencoderKL.from_pretrained(str(d / "vae"))  # diffusers' own scaled latent mean
    with torch.no_grad():
        torch.testing.assert_close(z, vae.encode(x).latent_dist.mean * vae.config.scaling_factor, rtol=1e-4, atol=1e-4)
    cfg = config(steps=3, size=None, view_prompt="suffix", guidance_scale=7.5, checkpoint_every=3)
    distill(cfg, tmp_path / "run", progress=False, model=model, judge=lambda v, t: {})
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(r["sds_grad_norm"] > 0 for r in rows)
    start = make_scene(cfg)
    end = final_scene(tmp_path / "run")
    for name, p in start.state_dict().items():
        assert not torch.equal(p, end.state_dict()[name]), f"{name} did not move"


def test_a_2d_flow_model_distils_too(tmp_path):
    """The shipped 2-D shapes flow model (velocity prediction, no camera): the prompt alone, the
    gradient through the flow process; the world has no 3D judge, so none is read."""
    from rewardiff.sampling import load_model

    model = load_model("shapes-flow")
    cfg = config(prompt="two red circles", steps=3, size=None, guidance_scale=5.0, checkpoint_every=3)
    summary = distill(cfg, tmp_path / "run", progress=False, model=model)
    assert summary["view_prompt"] == "none" and "judge" not in summary
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["sds_grad_norm"] > 0 for r in rows)
    with pytest.raises(UserError, match="does not read cameras"):
        distill(config(view_prompt="view"), tmp_path / "bad", progress=False, model=model)
