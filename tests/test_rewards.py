"""Rewards: registry, plain image rewards, weighted sums and the shapes reward model."""

from __future__ import annotations

import io
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from rewardiff.errors import UserError
from rewardiff.rewards import RewardFn, get_reward, list_rewards
from rewardiff.rewards.ensemble import WeightedSum, parse_weighted
from rewardiff.worlds.shapes.reward_model import WEIGHTS_DIR
from rewardiff.worlds.shapes import data as shapes

BUILTIN = {"brightness", "saturation", "jpeg-compressibility", "jpeg-incompressibility", "shapes-count", "shapes-color"}
HAVE_WEIGHTS = (WEIGHTS_DIR / "model.safetensors").is_file()
needs_weights = pytest.mark.skipif(not HAVE_WEIGHTS, reason=f"no shipped reward weights at {WEIGHTS_DIR}; run `rewardiff train-reward`")


def _flat(value: float, b: int = 2) -> torch.Tensor:
    return torch.full((b, 3, 32, 32), value)


def _noise(b: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# ----------------------------------------------------------------------------- registry


def test_list_rewards_names_flags_and_descriptions():
    rows = {name: (diff, desc) for name, diff, desc in list_rewards()}
    assert BUILTIN <= set(rows)
    assert rows["brightness"][0] and rows["shapes-count"][0] and rows["shapes-color"][0]
    assert not rows["jpeg-compressibility"][0] and not rows["jpeg-incompressibility"][0]
    assert all(desc and "\n" not in desc for _, desc in rows.values())


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as e:
        get_reward("brightnes")
    assert "brightnes" in str(e.value) and "brightness" in str(e.value) and "jpeg-compressibility" in str(e.value)


def test_module_function_spec_loads_user_function(tmp_path, monkeypatch):
    (tmp_path / "my_rewards_mod.py").write_text(textwrap.dedent('''
        import torch

        def redness(x, prompts):
            """Mean of the red channel."""
            return x[:, 0].mean(dim=(1, 2))

        def smooth(x, prompts):
            return x.mean(dim=(1, 2, 3))
        smooth.differentiable = True

        def factory(scale=2.0):
            from rewardiff.rewards import RewardFn
            return RewardFn("scaled", True, None, "scaled mean", lambda x, p: scale * x.mean(dim=(1, 2, 3)))
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    x = _noise()
    red = get_reward("my_rewards_mod:redness")
    assert red.name == "my_rewards_mod:redness" and not red.differentiable
    torch.testing.assert_close(red(x, ["", ""]), x[:, 0].mean(dim=(1, 2)))
    assert get_reward("my_rewards_mod:smooth").differentiable
    scaled = get_reward("my_rewards_mod:factory", scale=3.0)
    torch.testing.assert_close(scaled(x, ["", ""]), 3.0 * x.mean(dim=(1, 2, 3)))
    sys.modules.pop("my_rewards_mod", None)


def test_bad_module_and_attribute_errors(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="no_such_module_xyz"):
        get_reward("no_such_module_xyz:f")
    (tmp_path / "my_empty_mod.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError, match="has no attribute 'missing'"):
        get_reward("my_empty_mod:missing")
    with pytest.raises(UserError, match="not a reward"):
        get_reward("my_empty_mod:X")
    sys.modules.pop("my_empty_mod", None)


def test_reward_fn_checks_output_shape():
    bad = RewardFn("bad", True, None, "wrong shape", lambda x, p: x.mean(dim=(2, 3)))
    with pytest.raises(UserError, match="shape"):
        bad(_noise(), ["", ""])


# ----------------------------------------------------------------------------- plain rewards


def test_brightness_hand_values():
    r = get_reward("brightness")
    torch.testing.assert_close(r(_flat(1.0), ["", ""]), torch.ones(2))
    torch.testing.assert_close(r(_flat(-1.0), ["", ""]), torch.zeros(2))
    red = torch.full((1, 3, 4, 4), -1.0)
    red[:, 0] = 1.0  # pure red: luminance 0.299
    torch.testing.assert_close(r(red, [""]), torch.tensor([0.299]))


def test_saturation_hand_values():
    r = get_reward("saturation")
    red = torch.full((1, 3, 4, 4), -1.0)
    red[:, 0] = 1.0
    torch.testing.assert_close(r(red, [""]), torch.ones(1))
    torch.testing.assert_close(r(_flat(0.3, 1), [""]), torch.zeros(1))  # gray: no saturation


def _pil_jpeg_kb(x: torch.Tensor) -> list[float]:
    """JPEG sizes computed here, independently of the library: [-1, 1] -> uint8 -> PIL, q = 95."""
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    sizes = []
    for im in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(im), "RGB").save(buf, format="JPEG", quality=95)
        sizes.append(len(buf.getvalue()) / 1000)
    return sizes


def test_jpeg_compressibility_prefers_flat_and_matches_pil():
    x = torch.cat([_flat(0.2, 1), _noise(1)])
    comp = get_reward("jpeg-compressibility")(x, ["", ""])
    incomp = get_reward("jpeg-incompressibility")(x, ["", ""])
    assert comp[0] > comp[1]
    expected = torch.tensor(_pil_jpeg_kb(x))
    torch.testing.assert_close(comp, -expected)
    torch.testing.assert_close(incomp, expected)


def test_gradients_flow_as_declared():
    for name in ("brightness", "saturation", "jpeg-compressibility"):
        r = get_reward(name)
        x = _noise().requires_grad_(True)
        out = r(x, ["", ""])
        assert out.requires_grad == r.differentiable, name
        if r.differentiable:
            out.sum().backward()
            assert x.grad is not None and x.grad.abs().sum() > 0 and torch.isfinite(x.grad).all(), name


def test_saturation_gradient_is_bounded_on_black():
    x = torch.full((1, 3, 8, 8), -1.0, requires_grad=True)
    get_reward("saturation")(x, [""]).sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().max() < 1.0


# ----------------------------------------------------------------------------- weighted sums


def test_parse_weighted():
    assert parse_weighted("0.7*shapes-count+0.3*brightness") == [(0.7, "shapes-count"), (0.3, "brightness")]
    assert parse_weighted("brightness + -2*saturation") == [(1.0, "brightness"), (-2.0, "saturation")]
    with pytest.raises(UserError):
        parse_weighted("0.5*+brightness")


def test_weighted_sum_equals_hand_sum():
    x = _noise(3)
    p = ["", "", ""]
    s = get_reward("0.7*brightness+0.3*saturation")
    assert isinstance(s, WeightedSum) and s.differentiable
    expected = 0.7 * get_reward("brightness")(x, p) + 0.3 * get_reward("saturation")(x, p)
    torch.testing.assert_close(s(x, p), expected)
    assert s.value_range == pytest.approx((0.0, 1.0))
    mixed = get_reward("brightness+-0.5*jpeg-compressibility")
    assert not mixed.differentiable and mixed.value_range is None
    expected = get_reward("brightness")(x, p) - 0.5 * get_reward("jpeg-compressibility")(x, p)
    torch.testing.assert_close(mixed(x, p), expected)


def test_weighted_sum_unknown_part():
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        get_reward("0.5*brightness+0.5*nope")


# ----------------------------------------------------------------------------- shapes reward model


def test_missing_weights_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="rewardiff train-reward") as e:
        get_reward("shapes-count", path=tmp_path)
    assert str(tmp_path) in str(e.value)


@needs_weights
def test_shapes_count_prefers_true_count():
    x, prompts, specs = shapes.make_batch(48, seed=123, prompts=shapes.held_out_prompts() + shapes.train_prompts())
    wrong = [shapes.Spec(s.count % 4 + 1, s.color, s.shape).prompt for s in specs]
    r = get_reward("shapes-count")
    assert r.differentiable and r.value_range[1] == 0.0
    right, bad = r(x, prompts), r(x, wrong)
    # the asked count is at least 4.5x likelier than the wrong one on average (margin e^1.5),
    # and the true prompt wins on nearly every image
    assert right.mean() > -0.5 and right.mean() > bad.mean() + 1.5
    assert (right > bad).float().mean() >= 0.95
    assert (right >= r.value_range[0]).all() and (bad >= r.value_range[0] - 1e-6).all()


@needs_weights
def test_shapes_color_prefers_true_color():
    x, prompts, specs = shapes.make_batch(32, seed=7)
    wrong = [shapes.Spec(s.count, (s.color + 1) % 4, s.shape).prompt for s in specs]
    r = get_reward("shapes-color")
    assert r(x, prompts).mean() > r(x, wrong).mean() + 2.0


@needs_weights
def test_shapes_reward_gradient_reaches_image_not_weights():
    x, prompts, _ = shapes.make_batch(4, seed=1)
    x.requires_grad_(True)
    r = get_reward("shapes-count")
    r(x, prompts).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    from rewardiff.worlds.shapes.reward_model import load_reward_model

    assert all(p.grad is None and not p.requires_grad for p in load_reward_model().parameters())


@needs_weights
def test_shapes_reward_rejects_foreign_prompts():
    with pytest.raises(UserError, match="shapes-world prompts"):
        get_reward("shapes-count")(_noise(1), ["a photo of a cat"])


def test_tiny_training_run_writes_weights_and_card(tmp_path, monkeypatch):
    import json

    from rewardiff.worlds.shapes import reward_training as shapes_rm

    x, prompts, _ = shapes.make_batch(24, seed=5)
    monkeypatch.setattr(shapes_rm, "base_model_samples", lambda n, seed: (x[:n], prompts[:n]))
    card = shapes_rm.train_with_base_samples(tmp_path, 2, 0, 24, batch_size=16, pool_size=64)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.tmp"))
    on_disk = json.loads((tmp_path / "card.json").read_text())
    assert on_disk["steps"] == 2 and on_disk["params"] == card["params"] and "extra_images_source" in on_disk
    assert on_disk["train_images"]["extra_with_degraded_copies"] == 2 * 21  # 90 % kept, each with a degraded copy
    assert "count_reward_judge_right" in on_disk["eval"]["extra_held_out"]
    r = get_reward("shapes-count", path=tmp_path)
    assert r(x[:2], prompts[:2]).shape == (2,)


# ----------------------------------------------------------------------------- standardized rewards


SIX = ("shapes-count", "shapes-color", "jpeg-compressibility", "jpeg-incompressibility", "brightness", "saturation")


def _shipped_stats() -> dict:
    """The shipped statistics file read here, independently of ``rewardiff.worlds.shapes.stats``."""
    import json

    from rewardiff.worlds.shapes.stats import STATS_FILE

    return json.loads(STATS_FILE.read_text())["rewards"]


def test_shipped_stats_file_has_the_six_rewards():
    stats = _shipped_stats()
    for name in SIX:
        e = stats[name]
        assert e["std"] > 0 and np.isfinite(e["mean"]), name
        assert e["n"] == 512 and e["num_inference_steps"] == 15 and e["eta"] == 0.0 and e["guidance_scale"] == 2.0, name
        assert e["model"] == "shapes-base" and e["prompts"] == "train", name
        assert e["min"] <= e["mean"] <= e["max"], name
    assert stats["jpeg-compressibility"]["mean"] == pytest.approx(-stats["jpeg-incompressibility"]["mean"])


def test_z_equals_hand_standardization():
    from rewardiff.rewards.ensemble import Normalized

    e = _shipped_stats()["brightness"]
    x, p = _noise(3), ["", "", ""]
    z = get_reward("z(brightness)")
    assert isinstance(z, Normalized) and z.name == "z(brightness)" and z.differentiable
    torch.testing.assert_close(z(x, p), (get_reward("brightness")(x, p) - e["mean"]) / e["std"])
    assert z.value_range == pytest.approx(((0 - e["mean"]) / e["std"], (1 - e["mean"]) / e["std"]))
    from rewardiff.types import Reward

    assert isinstance(z, Reward)
    jz = get_reward(" z( jpeg-compressibility ) ")
    assert jz.name == "z(jpeg-compressibility)" and not jz.differentiable and jz.value_range is None


def test_parse_mixed_specs():
    assert parse_weighted("0.7*z(shapes-count)+0.3*brightness+-0.5*z( my.mod:f )") == [
        (0.7, "z(shapes-count)"), (0.3, "brightness"), (-0.5, "z(my.mod:f)"),
    ]
    assert parse_weighted("z(brightness) + 2e-1*saturation") == [(1.0, "z(brightness)"), (0.2, "saturation")]
    for bad in ("z()", "z(brightness", "zz(brightness)", "0.5*z(z(brightness))", "z(0.5*brightness)", "z brightness"):
        with pytest.raises(UserError):
            parse_weighted(bad)
    x, p = _noise(2), ["", ""]
    e = _shipped_stats()["brightness"]
    s = get_reward("0.5*z(brightness)+-2*saturation")
    assert isinstance(s, WeightedSum) and s.differentiable and s.value_range is not None
    expected = 0.5 * (get_reward("brightness")(x, p) - e["mean"]) / e["std"] - 2 * get_reward("saturation")(x, p)
    torch.testing.assert_close(s(x, p), expected)


def test_z_without_stats_names_the_reward(tmp_path, monkeypatch):
    (tmp_path / "my_unmeasured_mod.py").write_text("def f(x, prompts):\n    return x.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for spec in ("z(my_unmeasured_mod:f)", "0.5*brightness+0.5*z(my_unmeasured_mod:f)"):
        with pytest.raises(UserError) as e:
            get_reward(spec)
        msg = str(e.value)
        assert "'my_unmeasured_mod:f'" in msg and "python -m rewardiff.worlds.shapes.stats" in msg and "\n" not in msg
    with pytest.raises(UserError, match="unknown reward 'nope'"):
        get_reward("z(nope)")
    sys.modules.pop("my_unmeasured_mod", None)


def test_gradient_flows_through_z_brightness():
    std = _shipped_stats()["brightness"]["std"]
    x = _noise().requires_grad_(True)
    get_reward("z(brightness)")(x, ["", ""]).sum().backward()
    x2 = _noise().requires_grad_(True)
    get_reward("brightness")(x2, ["", ""]).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    torch.testing.assert_close(x.grad, x2.grad / std)


def test_measure_and_save_reward_stats(tmp_path, tiny_model_dir):
    import json

    from rewardiff.worlds.shapes.denoiser import shapes_model
    from rewardiff.worlds.shapes.stats import load_reward_stats, measure_reward_stats, reward_stats, save_reward_stats, stats_prompts

    model = shapes_model(tiny_model_dir)
    got = measure_reward_stats(["brightness", "saturation"], n=5, seed=3, batch_size=2, model=model)
    prompts, seeds = stats_prompts(5, 3)
    assert set(prompts) <= set(shapes.train_prompts()) and len(set(seeds)) == 5
    x = model.generate(prompts, seeds, 5, num_inference_steps=15, eta=0.0, guidance_scale=2.0)
    r = get_reward("brightness")(x, prompts).double()
    assert got["brightness"]["mean"] == pytest.approx(float(r.mean()), rel=1e-5)
    assert got["brightness"]["std"] == pytest.approx(float(r.std()), rel=1e-4)
    assert got["brightness"]["n"] == 5 and got["brightness"]["seed"] == 3 and got["brightness"]["guidance_scale"] == 2.0
    path = tmp_path / "stats.json"
    save_reward_stats({"brightness": got["brightness"]}, path)
    save_reward_stats({"saturation": got["saturation"]}, path)  # merged, not replaced
    assert set(load_reward_stats(path)) == {"brightness", "saturation"} and not list(tmp_path.glob("*.tmp"))
    assert set(json.loads(path.read_text())["rewards"]) == {"brightness", "saturation"}
    assert reward_stats("saturation", path) == (got["saturation"]["mean"], got["saturation"]["std"])
    with pytest.raises(UserError, match="'shapes-count'"):
        reward_stats("shapes-count", path)


def test_shapes_ensemble_is_listed():
    rows = {name: (diff, desc) for name, diff, desc in list_rewards()}
    assert "shapes-ensemble" in rows and rows["shapes-ensemble"][0] is False and "z(shapes-count)" in rows["shapes-ensemble"][1]


@needs_weights
def test_shapes_ensemble_equals_hand_sum():
    stats = _shipped_stats()
    x, p = _noise(2, seed=4), ["two red circles", "four blue squares"]
    r = get_reward("shapes-ensemble")
    assert r.name == "shapes-ensemble" and not r.differentiable and r.value_range is None
    count, jpeg = stats["shapes-count"], stats["jpeg-compressibility"]
    expected = 0.7 * (get_reward("shapes-count")(x, p) - count["mean"]) / count["std"] + 0.3 * (
        get_reward("jpeg-compressibility")(x, p) - jpeg["mean"]
    ) / jpeg["std"]
    out = r(x, p)
    assert not out.requires_grad
    torch.testing.assert_close(out, expected.detach())
    torch.testing.assert_close(out, get_reward("0.7*z(shapes-count)+0.3*z(jpeg-compressibility)")(x, p))
