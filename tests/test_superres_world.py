"""The super-resolution world: its data, its judge of hallucination, rewards, evaluation hook, model and pretraining."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rewardiff.errors import UserError
from rewardiff.worlds.shapes import data as shapes
from rewardiff.worlds.superres import data as sr, judge as J
from tests.helpers import assert_pretraining_resumes_bit_identically

HELD = [f"held-out/{i}" for i in range(sr.HELD_OUT_SIZE)]


def _image(objs: list[sr.Obj]) -> np.ndarray:
    return sr.paint(objs).image


# ----------------------------------------------------------------------------- data


def test_scenes_and_inputs_are_deterministic_by_key_and_splits_differ():
    a_lr, a_gt = sr.low_res("held-out/5"), sr.ground_truth("held-out/5")
    sr.scene.cache_clear()
    sr._low_res.cache_clear()
    assert torch.equal(a_lr, sr.low_res("held-out/5")) and torch.equal(a_gt, sr.ground_truth("held-out/5"))
    assert a_lr.shape == (3, 8, 8) and a_gt.shape == (3, 32, 32)
    assert not torch.equal(sr.ground_truth("train/5"), a_gt)
    assert sr.seed_of("train/5") != sr.seed_of("held-out/5")
    hr, lr, prompts = sr.make_batch(4, 11)
    hr2, lr2, prompts2 = sr.make_batch(4, 11)
    assert prompts == prompts2 and torch.equal(hr, hr2) and torch.equal(lr, lr2)
    assert all(p.startswith("shapes-sr:train/") for p in prompts)
    for bad in ("held-out/256", "valid/3", "train/x", "train"):
        with pytest.raises(UserError):
            sr.low_res(bad)


def test_degradation_is_a_gaussian_blur_and_block_mean_plus_small_noise():
    from scipy.ndimage import gaussian_filter

    gt = sr.ground_truth("held-out/9").numpy()
    blurred = np.stack([gaussian_filter(c, sr.BLUR_SIGMA, mode="nearest", truncate=3.0 / sr.BLUR_SIGMA) for c in gt])
    expected = blurred.reshape(3, 8, 4, 8, 4).mean((2, 4))
    got = sr.degrade(torch.from_numpy(gt)[None])[0].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    clean = torch.stack([sr.degrade(sr.ground_truth(k)[None])[0] for k in HELD[:32]])
    noisy = torch.stack([sr.low_res(k) for k in HELD[:32]])
    inside = (clean > -1 + 5 * sr.NOISE) & (clean < 1 - 5 * sr.NOISE)  # away from the clamp at -1 and 1
    residual = (noisy - clean)[inside].numpy()
    assert len(residual) > 500 and torch.equal(noisy.clamp(-1, 1), noisy)
    assert abs(residual.std() - sr.NOISE) < 0.005 and abs(residual.mean()) < 0.005


def test_small_objects_are_ambiguous_at_low_resolution():
    circle, square = [sr.Obj(0, 0, 12.3, 14.6, 2.2)], [sr.Obj(1, 0, 12.3, 14.6, 2.2)]
    hr_a, hr_b = shapes.to_tensor(np.stack([_image(circle), _image(square)]))
    assert (hr_a - hr_b).abs().max() > 1.0  # different truths ...
    lr_gap = (sr.degrade(hr_a[None]) - sr.degrade(hr_b[None])).abs().max()
    assert lr_gap < 4 * sr.NOISE  # ... whose inputs differ by about the inputs' noise


def test_held_out_scenes_hold_small_objects_and_near_pairs():
    small = near = 0
    for k in HELD[:64]:
        s = sr.scene(k)
        small += any(o.r <= sr.SMALL[1] for o in s.objects)
        gaps = [min(np.hypot(*(np.argwhere(a)[:, None] - np.argwhere(b)[None]).transpose(2, 0, 1)).min() for b in s.masks[:i])
                for i, a in enumerate(s.masks) if i]
        near += bool(gaps) and min(gaps) <= 3.0
    assert small >= 16 and near >= 16


# ----------------------------------------------------------------------------- the judge


def test_judge_reads_the_drawn_objects_of_every_held_out_scene():
    from rewardiff.worlds.shapes.judge import objects

    kinds = []
    for k in HELD:
        s = sr.scene(k)
        seen = objects(s.image)
        assert sorted(o.color for o in seen) == sorted(o.color for o in s.objects), k
        for o, m in zip(s.objects, s.masks):
            if m.sum() >= J.KIND_MIN_AREA:
                (match,) = [x for x in seen if np.hypot(x.centroid[0] - o.cx, x.centroid[1] - o.cy) < 1.5]
                kinds.append(match.shape == o.shape)
    assert len(kinds) > 400 and np.mean(kinds) > 0.99


def test_ground_truth_has_no_hallucination_for_either_judge():
    prompts = [sr.ref(k) for k in HELD]
    truth = torch.stack([sr.ground_truth(k) for k in HELD])
    assert J.judge(truth, prompts)["count"].sum() == 0
    assert J.judge_low_res(truth, prompts)["count"].sum() == 0


def _free_spot(occupied: np.ndarray, r: float) -> tuple[float, float]:
    for cy in np.arange(r + 1, 32 - r - 1, 1.0):
        for cx in np.arange(r + 1, 32 - r - 1, 1.0):
            if not (shapes._dilate(shapes._shape_mask(1, cy, cx, r), 3) & occupied).any():
                return float(cy), float(cx)
    raise LookupError


def _edits(key: str) -> list[tuple[str, np.ndarray]]:
    """(the one hallucination each edit makes, the edited image) for scene ``key``."""
    s = sr.scene(key)
    objs, occupied = s.objects, np.any(s.masks, axis=0)
    big = max(range(len(objs)), key=lambda i: s.masks[i].sum())
    out = []
    try:
        cy, cx = _free_spot(occupied, 4.0)
        out.append(("extra", _image(objs + [sr.Obj(1, 2, cy, cx, 4.0)])))
    except LookupError:
        pass
    out.append(("missing", _image(objs[:big] + objs[big + 1:])))
    recolour = objs[big]._replace(color=(objs[big].color + 1) % len(shapes.COLORS))
    out.append(("recoloured", _image(objs[:big] + [recolour] + objs[big + 1:])))
    if objs[big].r >= 4.0:
        kind = objs[big]._replace(shape=1 if objs[big].shape != 1 else 0)
        out.append(("wrong_kind", _image(objs[:big] + [kind] + objs[big + 1:])))
    return out


def _edit_check(compare_images) -> bool:
    """Whether ``compare_images(output, reference) -> counts`` counts every edit of 24 scenes exactly."""
    checked = 0
    for key in HELD[:24]:
        truth = sr.scene(key).image
        for kind, image in _edits(key):
            expected = {t: int(t == kind) for t in J.TYPES}
            if compare_images(image, truth) != expected:
                return False
            checked += 1
    return checked >= 72


def _compare_images(output: np.ndarray, reference: np.ndarray) -> dict[str, int]:
    return J.compare(J.objects_with_masks(reference), J.objects_with_masks(output))


def test_judge_counts_an_added_removed_recoloured_or_reshaped_object_exactly():
    assert _edit_check(_compare_images)


def test_a_judge_blind_to_colour_fails_the_edit_check(monkeypatch):
    real = J.objects_with_masks
    monkeypatch.setattr(J, "objects_with_masks", lambda im: [(o._replace(color=0), m) for o, m in real(im)])
    assert not _edit_check(_compare_images)


def test_judge_counts_a_merged_pair_and_a_split_object():
    two = [sr.Obj(1, 0, 10.0, 8.0, 3.0), sr.Obj(1, 0, 10.0, 14.5, 3.0), sr.Obj(0, 2, 24.0, 22.0, 4.5)]
    truth = _image(two)
    merged = truth.copy()
    merged[8:13, 10:13] = truth[10, 8]  # the gap between the squares filled in their colour
    assert _compare_images(merged, truth) == {t: int(t == "merged") for t in J.TYPES}
    one = [sr.Obj(1, 3, 12.0, 12.0, 5.0)]
    whole = _image(one)
    cut = whole.copy()
    cut[:, 12] = 0  # a black line through the square
    assert _compare_images(cut, whole) == {t: int(t == "split") for t in J.TYPES}


def test_low_resolution_judge_sees_an_added_and_a_removed_object():
    key = "held-out/3"
    edits = dict(_edits(key))
    prompts = [sr.ref(key)] * 2
    v = J.judge_low_res(shapes.to_tensor(np.stack([edits["extra"], edits["missing"]])), prompts)
    assert v["extra"][0] >= 1 and v["missing"][0] == 0
    assert v["missing"][1] >= 1 and v["extra"][1] == 0


# ----------------------------------------------------------------------------- rewards and evaluation


def test_rewards_through_get_reward_are_minus_the_judges_counts():
    from rewardiff.rewards.registry import get_reward

    edits = dict(_edits("held-out/3"))
    x = shapes.to_tensor(np.stack([sr.scene("held-out/3").image, edits["extra"], edits["recoloured"], sr.scene("held-out/4").image]))
    prompts = ["shapes-sr:held-out/3", "shapes-sr:held-out/3", "three shapes | shapes-sr:held-out/3", "shapes-sr:held-out/3"]
    r = get_reward("sr-hallucination")
    assert not r.differentiable
    expected = -torch.as_tensor(J.judge_images(x, torch.stack([sr.ground_truth("held-out/3")] * 4))["count"]).float()
    got = r(x, prompts)
    assert torch.equal(got, expected) and got[0] == 0 and got[1] == -1 and got[2] == -1 and got[3] < 0
    lr = get_reward("sr-hallucination-lr")(x, prompts)
    assert lr[0] == 0 and lr[1] <= -1 and not get_reward("sr-hallucination-lr").differentiable
    with pytest.raises(UserError):
        r(x[:1], ["shapes-sr:held-out/999"])


def test_evaluation_hook_reports_rates_types_and_psnr():
    from rewardiff import plugins

    hook = plugins.resolve(plugins.EVALUATIONS, "superres", "evaluation hook")
    keys = HELD[:8]
    prompts = [sr.ref(k) for k in keys]
    truth = torch.stack([sr.ground_truth(k) for k in keys])
    bicubic = torch.stack([F.interpolate(sr.low_res(k)[None], scale_factor=4, mode="bicubic", align_corners=False)[0].clamp(-1, 1)
                           for k in keys])
    ev = hook(None, bicubic, prompts, "sr-hallucination")
    mse = ((bicubic - truth) ** 2).flatten(1).mean(1).numpy()
    assert ev.metrics["psnr"] == pytest.approx(float(np.mean(10 * np.log10(4 / mse))), rel=1e-5)
    counts = J.judge_images(bicubic, truth)["count"]
    assert ev.metrics["hallucination_rate"] == pytest.approx(float(np.mean(counts > 0)))
    assert ev.metrics["hallucination_count"] == pytest.approx(sum(ev.metrics[f"hallucination_{t}"] for t in J.TYPES))
    assert hook(None, truth, prompts).metrics["hallucination_rate"] == 0
    # sharpness is relative to the truth: 1 for the truth itself, below 1 for bicubic's blur
    assert hook(None, truth, prompts).metrics["sharpness"] == pytest.approx(1.0)
    assert hook(None, truth, prompts).metrics["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert ev.metrics["sharpness"] < 0.9
    assert hook(None, truth, ["two red circles"] * 8) is None


def test_sharpness_by_hand():
    from rewardiff.worlds.superres.evaluate import sharpness

    x = torch.zeros(1, 1, 3, 3)
    x[..., :, 2] = 1.0  # a vertical edge: forward differences of 1 on the two pixels left of column 2's top rows
    # the 2x2 top-left block of gradient magnitudes: |dx| = (0, 1) per row, dy = 0
    assert float(sharpness(x)) == pytest.approx(0.5)


def test_prompt_sets_name_the_worlds_scenes():
    from rewardiff import conditions, plugins

    held = plugins.resolve(plugins.PROMPT_SETS, "sr-held-out", "prompt set")()
    train = plugins.resolve(plugins.PROMPT_SETS, "sr-train", "prompt set")()
    assert len(held) == sr.HELD_OUT_SIZE and len(train) >= 1000 and not set(held) & set(train)
    assert torch.equal(conditions.low_res(held[17]), sr.low_res("held-out/17"))
    assert torch.equal(conditions.ground_truth("x | " + train[2]), sr.ground_truth("train/2"))


# ----------------------------------------------------------------------------- model and pretraining


def test_model_reads_the_upsampled_input_as_extra_channels_and_samples_by_seed(tmp_path):
    from rewardiff.models.registry import base_model
    from rewardiff.worlds.superres.model import SRDenoiser, SRModelConfig, wrap

    torch.manual_seed(0)
    net = SRDenoiser(SRModelConfig(block_out_channels=(8, 16, 16))).eval()
    assert net.unet.conv_in.in_channels == 6 and net.unet.conv_out.out_channels == 3
    prompts = ["shapes-sr:held-out/1", "shapes-sr:held-out/2"]
    cond = net.encode(prompts + [""])
    lows = torch.stack([sr.low_res("held-out/1"), sr.low_res("held-out/2")])
    assert torch.allclose(cond[:2], F.interpolate(lows, size=32, mode="bicubic", align_corners=False).clamp(-1, 1))
    assert torch.equal(cond[2], torch.zeros(3, 32, 32))
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([500, 500])
    direct = net.unet(torch.cat([x, cond[:2]], 1), t, encoder_hidden_states=None).sample
    assert torch.equal(net(x, t, cond[:2]), direct)
    model = wrap(net)
    assert model.world == "superres" and model.name == "shapes-sr"
    a = model.generate(prompts, seeds=[3, 4], num_inference_steps=3)
    b = model.generate(prompts[:1], seeds=[3], num_inference_steps=3)
    c = model.generate(prompts[1:], seeds=[3], num_inference_steps=3)
    assert a.shape == (2, 3, 32, 32) and a.abs().max() <= 1
    assert torch.allclose(a[:1], b, atol=1e-5) and not torch.allclose(b, c, atol=1e-3)  # the input conditions the sample
    net.save(tmp_path / "m")
    again = base_model(str(tmp_path / "m"))
    assert again.name == "shapes-sr" and torch.allclose(again.generate(prompts[:1], seeds=[3], num_inference_steps=3), b, atol=1e-5)


def test_pretraining_resumes_bit_identically(tmp_path):
    from rewardiff.worlds.superres.pretrain import SRPretrainConfig, pretrain_sr

    def cfg(steps: int) -> SRPretrainConfig:
        return SRPretrainConfig(steps=steps, batch_size=4, warmup=2, checkpoint_every=2, block_out_channels=(8, 16, 16))

    assert_pretraining_resumes_bit_identically(pretrain_sr, cfg, tmp_path)


def test_shipped_model_super_resolves_better_than_bicubic_upsampling():
    from rewardiff.models.registry import base_model

    model = base_model("shapes-sr")
    keys = HELD[:8]
    prompts = [sr.ref(k) for k in keys]
    images = model.generate(prompts, seeds=list(range(8)), num_inference_steps=10, guidance_scale=1.0)
    truth = torch.stack([sr.ground_truth(k) for k in keys])
    bicubic = torch.stack([sr.upsample(sr.low_res(k)[None])[0] for k in keys])
    assert J.psnr(images, truth).mean() > J.psnr(bicubic, truth).mean() + 1.0
    assert J.judge(images, prompts)["count"].sum() < J.judge(bicubic, prompts)["count"].sum()
