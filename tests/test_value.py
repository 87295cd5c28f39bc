"""Learned value models (SVDD-MC): the network, training on base-model rollouts, the file format, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.rewards.value import LearnedValue, ValueNet, load_value, pool_cond, save_value, train_value
from rewardiff.worlds.shapes.denoiser import shapes_model
from rewardiff.types import ValueFn

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
TINY_WIDTHS = (8, 16, 16)


def test_value_net_images_and_vectors(scrambled_value):
    """Images of any size pool to one value per row; vectors use the MLP; gradients reach x_t."""
    default = ValueNet((3, 32, 32), 64)
    assert 100_000 <= sum(p.numel() for p in default.parameters()) <= 300_000

    net = scrambled_value(ValueNet((3, 16, 24), 16, widths=TINY_WIDTHS))
    x = torch.randn(5, 3, 16, 24, requires_grad=True)
    tokens = torch.randn(5, 4, 16)
    v = net(x, 500, tokens)
    assert v.shape == (5,)
    assert torch.allclose(v, net(x, torch.full((5,), 500), pool_cond(tokens)))  # [B, L, D] pools to its token mean
    assert not torch.allclose(net(x, 900, tokens), v)  # the timestep matters
    v.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    vec = scrambled_value(ValueNet((2,), 1))
    y = vec(torch.randn(7, 2), 10, torch.randn(7, 1))
    assert y.shape == (7,) and torch.isfinite(y).all()
    assert torch.allclose(vec(torch.ones(3, 2), 10, torch.zeros(3)), vec(torch.ones(3, 2), 10, torch.zeros(3, 1)))


def test_dict_conditions_pool_each_part_in_key_order():
    """An SDXL-style condition: token states are averaged, vectors kept, parts joined by key."""
    hidden, pooled, time_ids = torch.randn(2, 5, 4), torch.randn(2, 3), torch.randn(2, 6)
    got = pool_cond({"time_ids": time_ids, "hidden": hidden, "pooled": pooled})
    want = torch.cat([hidden.mean(1), pooled, time_ids], dim=1)  # keys sorted: hidden, pooled, time_ids
    torch.testing.assert_close(got, want)


def test_an_image_condition_pools_onto_a_4x4_grid_by_hand():
    """The x4 upscaler's low-res input [B, C, H, W]: each channel's mean over each of 4 x 4 cells,
    channel-major, so that a value can tell where in the input things are."""
    img = torch.arange(2 * 2 * 8 * 8, dtype=torch.float32).reshape(2, 2, 8, 8)
    got = pool_cond(img)
    assert got.shape == (2, 2 * 16)
    cell = img[1, 1, 2:4, 4:6].mean()  # row 1, column 2 of channel 1 of sample 1
    assert float(got[1, 16 + 4 * 1 + 2]) == pytest.approx(float(cell))
    moved = img.clone()
    moved[:, :, :4] = img[:, :, 4:]  # the same pixels elsewhere: a mean over the image would not see it
    assert not torch.allclose(pool_cond(moved), got)


def test_save_load_round_trip_gives_identical_predictions(tmp_path, scrambled_value):
    net = scrambled_value(ValueNet((3, 32, 32), 16, widths=TINY_WIDTHS))
    card = save_value(net, {"reward": "brightness", "model": "tiny", "metrics": {}}, tmp_path / "v")
    assert (tmp_path / "v" / "value.safetensors").is_file()
    assert json.loads((tmp_path / "v" / "value.json").read_text()) == card
    x, cond = torch.randn(6, 3, 32, 32), torch.randn(6, 4, 16)
    for path in (tmp_path / "v", tmp_path / "v" / "value.safetensors"):
        value = load_value(path)
        assert isinstance(value, LearnedValue) and isinstance(value, ValueFn)
        assert value.reward == "brightness" and value.config["widths"] == list(TINY_WIDTHS)
        assert not value.net.training
        with torch.no_grad():
            assert torch.equal(value(x, 333, cond), net(x, 333, cond))
    xg = x.clone().requires_grad_(True)  # eval mode, frozen weights, but gradients still reach x_t
    value(xg, 333, cond).sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0

    vec = scrambled_value(ValueNet((2,), 1))
    save_value(vec, {"reward": "toy"}, tmp_path / "vec")
    z, c = torch.randn(4, 2), torch.randn(4, 1)
    assert torch.equal(load_value(tmp_path / "vec")(z, 7, c), vec(z, 7, c))


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """A value for brightness, fitted on 256 four-step rollouts of the tiny random model (about 10 s)."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("value")
    card = train_value(
        shapes_model(tiny_model_dir), "brightness", out, trajectories=256, steps=300, batch_size=64, lr=3e-3,
        num_inference_steps=4, widths=TINY_WIDTHS, progress=False,
    )
    return out, card


def test_trained_value_predicts_the_reward_from_late_states(trained):
    """Held-out R^2 is clearly positive on the late, low-noise states and well above the early ones.

    The tiny model is an untrained random network, so its samples' brightness comes from the
    sampling noise: from x_T (pure noise, and eta = 1 adds fresh noise at every step) it is
    close to unpredictable, while from the last states (t = 249, little noise left) it is read
    off nearly linearly (a least-squares fit on channel means reaches R^2 ~ 0.85). A value
    network that ignored x_t, or leaked held-out chains into training, would fail one of the
    two checks. Measured over training seeds 0-5: late 0.52 .. 0.96, early -1.3 .. 0.19.
    """
    out, card = trained
    m = card["metrics"]
    assert card["reward"] == "brightness" and card["timesteps"] == [999, 749, 499, 249]
    assert m["heldout_trajectories"] == 26 and m["train_trajectories"] == 230
    assert m["buckets"] == {"early": [999, 749], "middle": [499], "late": [249]}
    assert m["r2_late"] > 0.3, m
    assert m["r2_late"] > m["r2_early"] + 0.3, m
    assert len(m["r2_by_step"]) == 4
    assert json.loads((out / "value.json").read_text())["metrics"] == m


def test_trained_value_loads_and_answers_in_reward_units(trained, tiny_model_dir):
    out, card = trained
    value = load_value(out)
    model = shapes_model(tiny_model_dir)
    prompts = ["two red circles", "one blue square"]
    with torch.no_grad():
        traj = model.sample(prompts, [5, 6], 4, eta=1.0, guidance_scale=2.0, keep_states=True)
        v = value(traj.xs[-2], traj.timesteps[-1], model.encode(prompts))
    assert v.shape == (2,)
    spread = 5 * card["metrics"]["reward_std"]
    assert ((v - card["target_mean"]).abs() < spread).all(), (v, card["target_mean"], spread)


def test_train_value_is_deterministic(tiny_model_dir, tmp_path):
    model = shapes_model(tiny_model_dir)
    kw = dict(trajectories=6, steps=3, batch_size=4, num_inference_steps=2, widths=(4, 8, 8), progress=False)
    a = train_value(model, "brightness", tmp_path / "a", seed=1, **kw)
    b = train_value(model, "brightness", tmp_path / "b", seed=1, **kw)
    c = train_value(model, "brightness", tmp_path / "c", seed=2, **kw)
    assert a == b
    assert (tmp_path / "a" / "value.safetensors").read_bytes() == (tmp_path / "b" / "value.safetensors").read_bytes()
    assert (tmp_path / "a" / "value.safetensors").read_bytes() != (tmp_path / "c" / "value.safetensors").read_bytes()


def test_train_value_rejects_bad_arguments(tiny_model_dir, tmp_path):
    model = shapes_model(tiny_model_dir)
    with pytest.raises(UserError, match="--trajectories must be at least 2"):
        train_value(model, "brightness", tmp_path, trajectories=1)
    with pytest.raises(UserError, match="--eta must be in"):
        train_value(model, "brightness", tmp_path, eta=2.0)
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        train_value(model, "nope", tmp_path, trajectories=4, steps=1)


def test_load_value_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match="nowhere"):
        load_value(missing)
    with pytest.raises(UserError, match="expected value.safetensors and value.json"):
        load_value(tmp_path)

    d = tmp_path / "v"
    save_value(ValueNet((2,), 1), {"reward": "toy"}, d)
    (d / "value.json").write_text("{not json")
    with pytest.raises(UserError, match="malformed value model config"):
        load_value(d)

    save_value(ValueNet((2,), 1), {"reward": "toy"}, d)
    (d / "value.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot load value weights"):
        load_value(d)

    save_value(ValueNet((2,), 1), {"reward": "toy"}, d)
    cfg = json.loads((d / "value.json").read_text())
    (d / "value.json").write_text(json.dumps({**cfg, "widths": [64, 64]}))  # does not fit the saved tensors
    with pytest.raises(UserError, match="cannot load value weights"):
        load_value(d)


def test_cli_bad_reward_is_one_line_with_status_2(tmp_path):
    res = subprocess.run([sys.executable, "-m", "rewardiff", "train-value", "--reward", "nope", "--out", str(tmp_path / "v")],
                         capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown reward 'nope'" in lines[0], res.stderr
    assert not (tmp_path / "v").exists()
