"""Free2Guide's reward ensembles (normalized sum, consensus), rewards on key frames, and every
inference-time method on video-shaped samples [B, C, F, H, W].

Mutation checks (each fails a test here):
- a guidance method that drops its candidate groups when scoring (``group=None``): the spy
  reward sees the wrong group size (test_every_method_scores_its_own_candidate_groups), and a
  normalized sum over the whole batch picks another candidate (test_normalized_sum_is_per_group);
- Borda points counted from the top (rank 0 the best): test_borda_hand_values;
- key frames taken as channels (x[:, idx]) instead of frames: test_keyframes_average_the_frames.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rewardiff.errors import UserError
from rewardiff.guidance.sample import guided_sample, make_method
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess
from rewardiff.report.grid import BACKGROUND, filmstrip, save_gif, to_uint8_hwc
from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.ensemble import Consensus, KeyFrames, NormalizedSum, borda, key_frame_indices, minmax
from rewardiff.rewards.registry import get_reward


def _table(values: list[float], name: str) -> RewardFn:
    """A reward that reads row i's value from ``values`` by the id stored in x[i, 0, 0, 0]."""
    table = torch.tensor(values, dtype=torch.float64)
    return RewardFn(name, False, None, name, lambda x, p: table[x[:, 0, 0, 0].long()].float())


def _ids(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2).clone()


def test_minmax_and_borda_hand_values():
    v = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert minmax(v, 4).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert borda(v, 4).tolist() == [3.0, 0.0, 1.5, 1.5]  # 2 and 2 share ranks 1 and 2
    assert borda(v, 2).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert minmax(torch.tensor([5.0, 5.0]), 2).tolist() == [0.0, 0.0]  # a constant orders nothing


def test_borda_hand_values():
    r1, r2 = _table([0.0, 1.0, 0.9], "r1"), _table([1.0, 0.0, 0.5], "r2")
    x = _ids(3)
    # r1 ranks: 0, 2, 1; r2 ranks: 2, 0, 1 -> Borda totals 2, 2, 2 with weights 1; with r1 twice as heavy:
    c = Consensus([(2.0, r1), (1.0, r2)])
    assert c(x, [""] * 3).tolist() == [2.0, 4.0, 3.0]
    assert c.relative and not c.differentiable


def test_normalized_sum_is_per_group():
    # group A (rows 0-2): r1 [0, 1, 0.9], r2 [1, 0, 0.5]; group B (rows 3-5): r2 spans 0 .. 100
    r1 = _table([0.0, 1.0, 0.9, 0.0, 0.5, 1.0], "r1")
    r2 = _table([1.0, 0.0, 0.5, 0.0, 50.0, 100.0], "r2")
    s = NormalizedSum([(1.0, r1), (1.0, r2)])
    x = _ids(6)
    per_group = s(x, [""] * 6, group=3)
    torch.testing.assert_close(per_group[:3], torch.tensor([1.0, 1.0, 1.4]))
    assert int(per_group[:3].argmax()) == 2
    whole = s(x, [""] * 6)  # one group of six: r2's range is B's, and A's order changes
    assert int(whole[:3].argmax()) == 1
    assert s.value_range == (0.0, 2.0)
    with pytest.raises(ValueError, match="groups of 4"):
        s(x, [""] * 6, group=4)


def test_specs_build_the_ensembles():
    n = get_reward("normalized(0.75*brightness, 0.25*saturation)")
    assert isinstance(n, NormalizedSum) and [w for w, _ in n.parts] == [0.75, 0.25]
    c = get_reward("consensus(brightness, saturation)")
    assert isinstance(c, Consensus)
    mixed = get_reward("0.5*consensus(brightness, saturation)+brightness")
    assert mixed.relative
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    expected = 0.5 * c(x, [""] * 4, group=2) + get_reward("brightness")(x, [""] * 4)
    torch.testing.assert_close(mixed(x, [""] * 4, group=2), expected)
    for bad, match in [("consensus()", "at least one"), ("vote(brightness)", "unknown reward function"),
                       ("normalized(brightness", "unbalanced"), ("keyframes(brightness, x)", "frame numbers")]:
        with pytest.raises(UserError, match=match):
            get_reward(bad)


def test_key_frame_indices():
    assert key_frame_indices(16) == (0, 5, 10, 15)  # the paper's
    assert key_frame_indices(24) == (0, 5, 10, 15)
    assert key_frame_indices(8) == (0, 2, 5, 7)  # four evenly spaced
    assert key_frame_indices(3) == (0, 1, 2)
    assert key_frame_indices(8, (1, 6)) == (1, 6)
    with pytest.raises(UserError, match="outside a clip of 8 frames"):
        key_frame_indices(8, (0, 8))


def test_keyframes_average_the_frames():
    torch.manual_seed(0)
    v = torch.rand(2, 3, 8, 4, 4) * 2 - 1
    v[:, :, 5] = 1.0  # a white frame among the key frames
    r = get_reward("keyframes(brightness)")
    assert isinstance(r, KeyFrames) and r.differentiable
    b = get_reward("brightness")
    expected = torch.stack([b(v[:, :, f], ["", ""]) for f in (0, 2, 5, 7)], 1).mean(1)
    torch.testing.assert_close(r(v, ["", ""]), expected)
    only = get_reward("keyframes(brightness, 5)")
    torch.testing.assert_close(only(v, ["", ""]), torch.ones(2))
    with pytest.raises(UserError, match="scores videos"):
        r(torch.zeros(2, 3, 4, 4), ["", ""])
    # the gradient reaches the key frames only
    x = v.clone().requires_grad_(True)
    r(x, ["", ""]).sum().backward()
    touched = x.grad.abs().sum((0, 1, 3, 4)) > 0
    assert touched.tolist() == [f in (0, 2, 5, 7) for f in range(8)]


class _VideoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv3d(3, 3, 3, padding=1)

    def forward(self, x, t, cond):
        assert x.dim() == 5
        return 0.1 * self.conv(x) + cond.view(-1, 1, 1, 1, 1)


def _video_model() -> DiffusionModel:
    torch.manual_seed(0)
    process = GaussianProcess.from_config("cosine", 1000, True, "v_prediction")
    encode = lambda prompts: torch.tensor([0.0 if p == "" else 0.5 for p in prompts])  # noqa: E731
    return DiffusionModel(_VideoNet(), process, encode, (3, 6, 8, 8), name="toy-video")


class _Spy:
    """A relative reward that records the groups it is asked to compare."""

    name, differentiable, value_range, relative = "spy", False, None, True

    def __init__(self):
        self.groups: list[int | None] = []

    def __call__(self, x, prompts, group=None):
        assert x.dim() == 5
        self.groups.append(group)
        return x.mean((1, 2, 3, 4))


@pytest.mark.parametrize("method,width", [("best-of-n", 3), ("svdd-pm", 3), ("smc", 3), ("free2guide", 3)])
def test_every_method_scores_its_own_candidate_groups(method, width):
    spy = _Spy()
    x, info = guided_sample(_video_model(), make_method(method, spy, width=width), ["a", "b"], [0, 1], 5)
    assert x.shape == (2, 3, 6, 8, 8)
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]
    assert spy.groups and set(spy.groups) == {width}


@pytest.mark.parametrize("method,width", [("base", None), ("best-of-n", 2), ("svdd-pm", 2), ("smc", 2), ("free2guide", 2),
                                          ("dsearch", 2), ("gradient", None)])
def test_every_method_samples_videos_with_ensembles(method, width):
    spec = "keyframes(brightness)" if method == "gradient" else "consensus(keyframes(brightness), keyframes(saturation))"
    x, info = guided_sample(_video_model(), make_method(method, get_reward(spec), width=width), ["a", "b"], [0, 1], 4)
    assert x.shape == (2, 3, 6, 8, 8) and torch.isfinite(x).all()
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]


def test_best_of_n_keeps_the_consensus_winner():
    """Best-of-3 under consensus keeps, per request, the sample with the most Borda points."""
    model = _video_model()
    spec = "consensus(keyframes(brightness), keyframes(saturation))"
    x, _ = guided_sample(model, make_method("best-of-n", get_reward(spec), width=3), ["a"], [0], 4)
    from rewardiff.guidance.sample import particle_seeds

    all3, _ = guided_sample(model, make_method("base", None), ["a"] * 3, particle_seeds(0, 3), 4)
    points = get_reward(spec)(all3, ["a"] * 3, group=3)
    torch.testing.assert_close(x[0], all3[int(points.argmax())])


def test_filmstrip_and_gif(tmp_path):
    v = torch.zeros(2, 3, 4, 5, 6)
    for f in range(4):
        v[:, :, f] = f / 4
    strip = filmstrip(v)
    assert strip.shape == (2, 3, 5, 4 * 6 + 3)
    torch.testing.assert_close(strip[..., 7:13], v[:, :, 1])  # frame 1 after frame 0 and one gap column
    arr = to_uint8_hwc(v)
    assert arr.shape == (2, 5, 27, 3) and tuple(arr[0, 0, 6]) == BACKGROUND
    save_gif(v[0] * 2 - 1, tmp_path / "a.gif")
    from PIL import Image

    with Image.open(tmp_path / "a.gif") as im:
        assert im.n_frames == 4


def test_video_frames_count_is_the_shapes_count_of_each_key_frame():
    from rewardiff.worlds.shapes import data
    from rewardiff.worlds.shapes.reward_model import WEIGHTS_DIR as RM_WEIGHTS
    from rewardiff.worlds.video.frame_rewards import still_prompt

    assert still_prompt("two red circles moving right") == "two red circles"
    assert still_prompt("two red circles") == "two red circles"
    if not (RM_WEIGHTS / "model.safetensors").is_file():
        pytest.skip("no shipped shapes reward model")
    x, prompts, _ = data.make_batch(4, seed=5)
    still = get_reward("shapes-count")(x, prompts)
    clip = torch.stack([x, -torch.ones_like(x)], 2).repeat_interleave(4, 2)  # frames 0-3 the image, 4-7 black
    r = get_reward("keyframes(video-frames-count, 0, 2)")
    torch.testing.assert_close(r(clip, [p + " moving up" for p in prompts]), still)
    black = get_reward("keyframes(video-frames-count, 5)")(clip, [p + " moving up" for p in prompts])
    assert (black < still - 1.0).all()  # an empty frame holds none of the asked shapes


def test_the_guard_passes_groups_to_relative_rewards():
    from rewardiff.rewards.guard import GuardedReward

    spec = "consensus(brightness, saturation)"
    x = torch.rand(6, 3, 4, 4) * 2 - 1
    guarded = GuardedReward(get_reward(spec))
    assert guarded.relative
    torch.testing.assert_close(guarded(x, [""] * 6, group=3), get_reward(spec)(x, [""] * 6, group=3))
    assert not torch.equal(guarded(x, [""] * 6, group=3), guarded(x, [""] * 6))


def test_sample_command_steers_a_diffusers_video_pipeline_with_an_ensemble(tmp_path):
    """``rewardiff sample`` on a text-to-video pipeline: Free2Guide with a consensus of key-frame
    rewards, filmstrips in the grid, one GIF per sample, the NFE of the formula."""
    import json

    from rewardiff.models.video import tiny_video_pipeline
    from rewardiff.sampling import sample_to_dir

    pipe = tiny_video_pipeline(tmp_path / "pipe", 0, 32, 4)
    out = tmp_path / "s"
    sample_to_dir(out, f"diffusers:{pipe}", None, ["a cat"], 2, 0, "consensus(keyframes(brightness), keyframes(saturation))",
                  3, 2.0, None, method="free2guide", width=2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["nfe_per_sample"] == summary["expected_nfe_per_sample"] == 2 * (3 + 1 * 2)
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["0000.gif", "0000.png", "0001.gif", "0001.png"]
    from PIL import Image

    with Image.open(out / "samples" / "0000.png") as im:
        assert im.size == (4 * 32 + 3, 32)  # four frames side by side, a gap between each
