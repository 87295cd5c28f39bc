"""The 3D world's view-conditioned prior and its text-alignment reward."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.worlds.shapes.denoiser import ShapesModelConfig
from rewardiff.worlds.shapes3d import prior
from rewardiff.worlds.shapes3d.prior import ViewDenoiser, camera_features, split_view, unconditional, with_view

SMALL = ShapesModelConfig(block_out_channels=(8, 16, 16), cross_attention_dim=16, attention_head_dim=4, prompts="shapes3d")


def test_prompts_carry_the_camera():
    assert split_view("two red spheres | view:30,15") == ("two red spheres", (30.0, 15.0))
    assert split_view("a red cube") == ("a red cube", None)
    assert split_view(with_view("a red cube", 12.5, 20.0)) == ("a red cube", (12.5, 20.0))
    assert unconditional([with_view("a red cube", 10.0, 20.0)]) == [" | view:10.0,20.0"]
    for bad in ("a red cube | view:30", "a red cube | view:a,b", "a red cube | file:x.png", "a red cube | view:0,95"):
        with pytest.raises(UserError, match="view:AZ,EL"):
            split_view(bad)


def test_camera_features_are_the_angles():
    f = camera_features([(90.0, 30.0), None])
    torch.testing.assert_close(f[0], torch.tensor([1.0, 0.0, 0.5, math.sqrt(3) / 2, 1.0]), atol=1e-6, rtol=0)
    assert torch.equal(f[1], torch.zeros(5))


def test_the_camera_token_changes_the_condition_and_the_output():
    torch.manual_seed(0)
    net = ViewDenoiser(SMALL).eval()
    c = net.encode([with_view("a red sphere", 0.0, 20.0), with_view("a red sphere", 180.0, 20.0), "a red sphere"])
    assert c.shape == (3, 12, 16)  # 11 text tokens and the camera
    torch.testing.assert_close(c[0, :11], c[1, :11])  # the same text
    assert not torch.allclose(c[0, 11], c[1, 11])  # another camera
    x = torch.randn(3, 3, 32, 32)
    out = net(x, torch.tensor([500, 500, 500]), c)
    assert not torch.allclose(out[0], out[1])
    with pytest.raises(UserError, match="unknown word"):
        net.check_prompts(["a red teapot | view:0,20"])


def test_saved_prior_loads_as_a_view_conditioned_model(tmp_path):
    torch.manual_seed(1)
    net = ViewDenoiser(SMALL)
    net.save(tmp_path / "m")
    assert prior.is_shapes3d_dir(tmp_path / "m") and not prior.is_shapes3d_dir(tmp_path)
    model = prior.shapes3d_model(tmp_path / "m")
    assert model.view_conditioned and model.world == "shapes3d"
    for a, b in zip(net.state_dict().values(), model.net.state_dict().values()):
        assert torch.equal(a, b)
    assert model.unconditional([with_view("a red cube", 5.0, 20.0)]) == [" | view:5.0,20.0"]
    x = model.generate([with_view("a red cube", 5.0, 20.0)], [0], num_inference_steps=2, guidance_scale=3.0)
    assert x.shape == (1, 3, 32, 32)
    with pytest.raises(UserError, match="rewardiff pretrain shapes-3d"):
        prior.shapes3d_model(tmp_path / "none")


def test_training_prompts_drop_text_and_camera_as_configured():
    from rewardiff.render import Camera
    from rewardiff.worlds.shapes3d.pretrain import PretrainConfig, training_prompts

    cams = [Camera(30.0, 20.0)] * 4
    g = torch.Generator().manual_seed(0)
    keep = training_prompts(["a red cube"] * 4, cams, g, PretrainConfig(text_dropout=0.0, view_dropout=0.0))
    assert keep == ["a red cube | view:30.0,20.0"] * 4
    no_text = training_prompts(["a red cube"] * 4, cams, g, PretrainConfig(text_dropout=1.0, view_dropout=0.0))
    assert no_text == [" | view:30.0,20.0"] * 4
    no_view = training_prompts(["a red cube"] * 4, cams, g, PretrainConfig(text_dropout=0.0, view_dropout=1.0))
    assert no_view == ["a red cube"] * 4


# ----------------------------------------------------------------------------- the reward model


def test_ordinal_count_probabilities_sum_to_one_and_peak_at_the_count():
    from rewardiff.worlds.shapes3d.reward_model import Shapes3DRM

    net = Shapes3DRM((8, 8, 8))
    with torch.no_grad():
        net.log_sharpness.fill_(1.0)
    net.counts = lambda x: torch.tensor([[0.0, 1.0, 2.0, 3.4]])  # type: ignore[method-assign]
    logp = net(torch.zeros(1, 3, 32, 32))
    torch.testing.assert_close(logp.exp().sum(-1), torch.ones(1, 4))
    assert logp[0].argmax(-1).tolist() == [0, 1, 2, 3]


def test_asked_counts_read_the_prompt():
    from rewardiff.worlds.shapes3d.reward_model import asked_counts

    # colours: red, green, blue, yellow
    assert asked_counts(["a red sphere and a blue cube", "two green cones | view:10,20"]).tolist() == [[1, 0, 1, 0], [0, 2, 0, 0]]
    with pytest.raises(UserError, match="3D shapes world"):
        asked_counts(["two red circles"])


def test_count_reward_is_highest_for_the_asked_counts():
    from rewardiff.worlds.shapes3d.reward_model import LOG_FLOOR, Shapes3DRM, count_reward

    net = Shapes3DRM((8, 8, 8))
    with torch.no_grad():
        net.log_sharpness.fill_(1.0)
    net.counts = lambda x: torch.tensor([[1.0, 0.0, 1.0, 0.0], [2.0, 0.0, 0.0, 1.0]])  # type: ignore[method-assign]
    x = torch.zeros(2, 3, 32, 32, requires_grad=True)
    r = count_reward(net, x, ["a red sphere and a blue cube"] * 2)
    assert r[0] > r[1]
    assert r[1] >= 4 * LOG_FLOOR
    # by hand: log(0.02 + 0.98 p) summed over the colours, p the asked count's probability
    p = net(x).exp().gather(-1, torch.tensor([[1, 0, 1, 0]] * 2)[..., None])[..., 0]
    torch.testing.assert_close(r, torch.log(0.02 + 0.98 * p).sum(-1))


def test_shipped_reward_model_reads_fresh_renders():
    """The shipped weights count each colour right on most renders of held-out prompts (a data
    distribution they were not trained on: training used the training prompts only)."""
    from rewardiff.worlds.shapes3d import data
    from rewardiff.worlds.shapes3d.reward_model import WEIGHTS_DIR, asked_counts, load

    if not (WEIGHTS_DIR / "model.safetensors").is_file():
        pytest.skip("shapes3d-rm weights not shipped")
    x, prompts, _, _ = data.make_batch(96, 4242, prompts=data.held_out_prompts())
    with torch.no_grad():
        pred = load()(x).argmax(-1)
    right = (pred == asked_counts(prompts)).all(-1).float().mean()
    assert right > 0.8, float(right)
