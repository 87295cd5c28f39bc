"""The 3D shapes world: prompts, scenes, renders and the classical judge.

The judge is checked against the scenes' ground truth (each render's objects, known to the
generator) and against the renderer's own per-object masks (``object_masks``), which say how
much of each object a view shows, so occlusion is measured, never guessed from the judge.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch

from rewardiff.render import Camera
from rewardiff.worlds.shapes3d import data as world, judge as wjudge


# ----------------------------------------------------------------------------- prompts


def test_prompts_parse_and_round_trip():
    assert world.parse_prompt("a red sphere") == [(1, "red", "sphere")]
    assert world.parse_prompt("two red spheres and a blue cube") == [(2, "red", "sphere"), (1, "blue", "cube")]
    assert world.parse_prompt("a green cone and a yellow cube") == [(1, "green", "cone"), (1, "yellow", "cube")]
    prompts = world.all_prompts()
    assert len(prompts) == len(set(prompts)) == 12 + 78 + 364  # multisets of 1, 2, 3 of the 12 kinds
    rng = np.random.default_rng(0)
    for p in prompts:
        assert world.prompt_of_groups(world.parse_prompt(p)) == p
        assert world.prompt_of(world.random_scene(p, rng)) == p
    for bad in ("two red sphere", "a red spheres", "four red cubes", "a red cube and a red cube",
                "two red cubes and two blue cones", "a purple cube", "", "a red cube and"):
        with pytest.raises(ValueError):
            world.parse_prompt(bad)


def test_held_out_prompts_combine_kinds_never_seen_together():
    train, held = world.train_prompts(), world.held_out_prompts()
    assert not set(train) & set(held) and sorted(train + held) == sorted(world.all_prompts())
    assert 0.1 < len(held) / len(world.all_prompts()) < 0.3
    seen_pairs = {(a, b) for p in train for a in world.kinds_of(p) for b in world.kinds_of(p) if a != b}
    seen_kinds = {k for p in train for k in world.kinds_of(p)}
    assert len(seen_kinds) == 12  # every kind is trained on
    for p in held:  # ... but each held-out prompt pairs two kinds that no training prompt pairs
        kinds = world.kinds_of(p)
        assert any((a, b) not in seen_pairs for a in kinds for b in kinds if a != b), p
    assert world.tokenize(["two red spheres and a blue cube", ""]).shape == (2, world.MAX_TOKENS)


# ----------------------------------------------------------------------------- scenes and renders


def test_scenes_stand_apart_on_the_ground():
    rng = np.random.default_rng(1)
    for p in world.train_prompts()[::7]:
        scene = world.random_scene(p, rng)
        objs = scene.objects
        assert all(math.hypot(o.x, o.y) <= world.PLACE_RADIUS for o in objs)
        assert all(math.hypot(a.x - b.x, a.y - b.y) >= world.MIN_DISTANCE for i, a in enumerate(objs) for b in objs[i + 1:])
        for o in objs:
            means, stds, colors = world.primitive_gaussians(o)
            assert 30 <= len(means) <= 100  # a few dozen Gaussians an object
            assert means[:, 2].min() - stds.max() < 0.05 < means[:, 2].max()  # it stands on z = 0
            assert np.allclose(np.hypot(*(means[:, :2].mean(0) - [o.x, o.y])), 0, atol=0.05)
            assert (colors <= world.COLOR_RGB[o.color] + 1e-6).all()  # shading only darkens


def test_random_cameras_cover_the_stated_ranges():
    rng = np.random.default_rng(2)
    cams = [world.random_camera(rng) for _ in range(500)]
    az, el = np.array([c.azimuth for c in cams]), np.array([c.elevation for c in cams])
    assert az.min() >= 0 and az.max() < 360 and az.min() < 20 and az.max() > 340
    assert el.min() >= 10 and el.max() <= 40 and el.min() < 12 and el.max() > 38
    cam = world.random_camera(torch.Generator().manual_seed(0))
    assert 10 <= cam.elevation <= 40


def test_ground_is_a_grey_disc_under_a_white_sky():
    cam = Camera(0.0, 10.0)
    bg = world.ground(cam, 32)
    # the centre ray hits the origin: ground. The top row's centre is 15.5 px above the axis with
    # f = 16 / tan(20 deg) px, so its ray rises atan(15.5 / f) - 10 degrees above the horizon: sky
    up = math.degrees(math.atan(15.5 / (16 / math.tan(math.radians(20.0))))) - 10.0
    assert up > 0
    assert torch.allclose(bg[:, 16, 16], torch.tensor(world.GROUND_RGB))
    assert torch.allclose(bg[:, 0, 16], torch.ones(3))
    assert torch.allclose(world.ground(Camera(0.0, 89.0, distance=10.0), 32)[:, 16, 16], torch.tensor(world.GROUND_RGB))


def test_make_batch_is_deterministic_and_fast():
    t = time.perf_counter()
    images, prompts, cams, scenes = world.make_batch(64, seed=3)
    rate = 64 / (time.perf_counter() - t)
    print(f"shapes3d data: {rate:.0f} images/s at 32x32")
    assert images.shape == (64, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    assert prompts == [world.prompt_of(s) for s in scenes] and len(cams) == 64
    again, prompts2, _, _ = world.make_batch(64, seed=3)
    assert torch.equal(images, again) and prompts == prompts2
    counts = np.bincount([len(s.objects) for s in scenes], minlength=4)[1:]
    assert (counts > 10).all()  # one, two and three objects all common
    held, p_held, _, _ = world.make_batch(8, seed=4, prompts=world.held_out_prompts(), size=16)
    assert held.shape == (8, 3, 16, 16) and set(p_held) <= set(world.held_out_prompts())


# ----------------------------------------------------------------------------- the judge


def _disc(h: int, w: int, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def test_split_count_separates_overlapping_discs():
    assert wjudge.split_count(_disc(40, 40, 20, 20, 10), 2.0) == 1
    assert wjudge.split_count(np.ones((15, 15), bool), 2.0) == 1
    for gap in (16, 18):  # radius 10, centres 16-18 apart: the waist is 10 - sqrt(100 - (gap/2)^2) >= 4 narrower
        assert wjudge.split_count(_disc(40, 60, 20, 20, 10) | _disc(40, 60, 20, 20 + gap, 10), 2.0) == 2, gap
    assert wjudge.split_count(_disc(40, 60, 20, 20, 10) | _disc(40, 60, 20, 23, 10), 2.0) == 1  # nearly coincident


@pytest.fixture(scope="module")
def batch():
    images, prompts, cams, scenes = world.make_batch(300, seed=11)
    return images, prompts, cams, scenes, wjudge.judge(images, prompts)


def test_judge_is_calibrated_on_random_views(batch):
    images, prompts, cams, scenes, v = batch
    acc = float(v["correct"].mean())
    el = np.array([c.elevation for c in cams])
    print(f"shapes3d judge: {acc:.3f} correct on 300 random views ({v['count_ok'].mean():.3f} count); "
          f"elevation < 20: {v['correct'][el < 20].mean():.3f}, >= 20: {v['correct'][el >= 20].mean():.3f}")
    assert acc >= 0.95
    single = np.array([len(s.objects) == 1 for s in scenes])
    assert v["correct"][single].all()


def test_judge_rejects_renders_of_other_prompts(batch):
    images, prompts, cams, scenes, v = batch
    rng = np.random.default_rng(5)
    others = []
    for p in prompts:  # a different prompt: same objects with one colour changed, or one object more or less
        kinds = world.kinds_of(p)
        i = int(rng.integers(len(kinds)))
        if rng.uniform() < 0.5:
            c, s = kinds[i]
            kinds[i] = ((c + 1 + int(rng.integers(3))) % 4, s)
        elif len(kinds) > 1:
            kinds.pop(i)
        else:
            kinds.append(kinds[0])
        others.append(world.prompt_of(world.Scene(tuple(world.Primitive(s, c, 0, 0, 0.2) for c, s in kinds))))
    assert all(o != p for o, p in zip(others, prompts))
    wrong = wjudge.judge(images, others)["correct"]
    assert wrong[v["correct"]].mean() <= 0.02  # where it reads the truth, it refuses a different prompt


def test_occlusion_is_measured(batch):
    images, prompts, cams, scenes, v = batch
    visible = []
    for s, c in zip(scenes, cams):
        vis, alone = world.object_masks(s, c)
        visible.append((vis.sum((1, 2)) / np.maximum(alone.sum((1, 2)), 1)).min())
    visible = np.array(visible)
    clear = visible >= 0.5
    print(f"shapes3d judge: {v['correct'][clear].mean():.3f} on {clear.sum()} views where every object shows at "
          f"least half, {v['correct'][~clear].mean() if (~clear).any() else float('nan'):.3f} on the {(~clear).sum()} others")
    assert v["correct"][clear].mean() >= 0.96


def test_partial_occlusion_of_one_colour_is_split_or_measured():
    # two red spheres, one behind and above the other on screen: at elevation 25 their
    # silhouettes touch and overlap a little (one connected component); lower, the back one hides more
    scene = world.Scene((world.Primitive(0, 0, 0.7, 0.0, 0.22), world.Primitive(0, 0, -0.7, 0.12, 0.22)))
    cam = Camera(0.0, 25.0)
    vis, alone = world.object_masks(scene, cam)
    assert (alone[0] & alone[1]).any() and vis[1].sum() < alone[1].sum()  # truly overlapping
    img = world.render_scene(scene, [cam])[0]
    assert len(wjudge.components(world.to_uint8(img[None])[0])) == 1  # connected components alone read one
    assert wjudge.read(img).per_color == (2, 0, 0, 0)  # the neck split reads two
    assert wjudge.judge(img[None], ["two red spheres"])["correct"].all()
    for el in (12.0, 18.0, 21.0):  # deeper occlusion: measured, not asserted
        cam = Camera(0.0, el)
        vis, alone = world.object_masks(scene, cam)
        print(f"two red spheres in line at elevation {el:.0f}: back one {vis[1].sum() / alone[1].sum():.0%} visible, "
              f"judge reads {wjudge.read(world.render_scene(scene, [cam])[0]).per_color[0]}")


def test_multiview_consistency():
    rng = np.random.default_rng(6)
    scene = world.random_scene("a red sphere and a blue cube", rng)
    cams = [Camera(a, 35.0) for a in range(0, 360, 45)]
    views = world.render_scene(scene, cams)
    assert wjudge.multiview_consistency(views, "a red sphere and a blue cube") == 1.0
    other = world.render_scene(world.random_scene("a green cone", rng), cams[:2])
    mixed = torch.cat([views[:6], other])
    assert wjudge.multiview_consistency(mixed) == pytest.approx(6 / 8)
    m = wjudge.multiview(mixed, "a red sphere and a blue cube")
    assert m == {"consistency": 0.75, "accuracy": 0.75, "majority_correct": 1.0}
    assert wjudge.multiview(mixed, "a green cone")["majority_correct"] == 0.0
