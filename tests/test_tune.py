"""rewardiff tune: regret on a bank, the resumable bank, agents ranked by regret, privacy reported, user errors."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest

from rewardiff.bandits import Arms
from rewardiff.cli import main
from rewardiff.errors import UserError
from rewardiff.tune import (
    Bank,
    Setting,
    Stream,
    TuneConfig,
    arm_features,
    arm_grid,
    build_bank,
    load_cell_images,
    make_stream,
    play,
    run_streams,
    run_tune,
    simple_regret,
    spread,
    to_unit,
)
from rewardiff.tune_report import reference_arm

SMALL = TuneConfig(prompts=4, guidance_scales=(1.5, 3.0), widths=(2, 4), samples=3, rounds=240, seeds=(0, 1),
                   epsilons=(1.0, 4.0), explore=80)


class FakeSampler:
    """A bank cell without a model: ratings fixed by (prompt, arm, seeds), a smooth function of the
    arm plus per-sample jitter, so that a kernel agent can learn it; a judge verdict from the rating.
    ``stop_after`` raises KeyboardInterrupt on that call (a build stopped by Ctrl-C)."""

    world = "shapes"
    value_range = (-4.0, 0.0)

    def __init__(self, stop_after: int | None = None) -> None:
        self.calls, self.stop_after = 0, stop_after

    def mean(self, prompt: str, arm: Setting) -> float:
        count = ["one", "two", "three", "four"].index(prompt.split()[0]) + 1
        # wider search helps more for larger counts; high guidance helps a little
        return -3.0 + 0.4 * math.log2(arm.width) * count / 2 + 0.2 * (arm.guidance_scale > 2) + 0.1 * (arm.method == "smc")

    def __call__(self, prompt: str, arm: Setting, seeds: list[int]):
        self.calls += 1
        if self.stop_after is not None and self.calls == self.stop_after:
            raise KeyboardInterrupt
        rng = np.random.default_rng([seeds[0], arm.width, int(arm.guidance_scale * 10), len(arm.method)])
        ratings = np.clip(self.mean(prompt, arm) + 0.2 * rng.standard_normal(len(seeds)), -4, 0)
        images = rng.integers(0, 256, (len(seeds), 4, 4, 3), dtype=np.uint8)
        return images, ratings, {"judge_count": float((ratings > -2.0).mean())}


def _bank(means: np.ndarray, k: int = 2, jitter: float = 0.0) -> Bank:
    """A bank whose K ratings of each cell are its mean -jitter and +jitter (so the mean is exact)."""
    p, a = means.shape
    signs = np.array([-((-1) ** s) for s in range(k)], dtype=float) if k % 2 == 0 else np.zeros(k)
    ratings = means[:, :, None] + jitter * signs
    arms = [Setting("base", 1, float(g)) for g in range(a)]
    return Bank([f"p{i}" for i in range(p)], arms, ratings, {"judge_count": np.zeros((p, a))}, (-1.0, 1.0), 0.0)


class Scripted:
    """Plays a fixed list of arms and records what it is told."""

    def __init__(self, arms: list[int]) -> None:
        self.arms, self.seen = list(arms), []

    def act(self, context):
        return self.arms[len(self.seen)]

    def update(self, context, arm, reward):
        self.seen.append((tuple(context), arm, reward))


def test_regret_against_a_hand_computed_bank():
    # means: p0 = (0, 0.5, 1), p1 = (1, 0, 0.5); ratings are mean -/+ 0.25 (K = 2)
    bank = _bank(np.array([[0.0, 0.5, 1.0], [1.0, 0.0, 0.5]]), k=2, jitter=0.25)
    stream = Stream(np.array([0, 1, 1, 0]), np.array([0, 1, 0, 1]), np.array([0.0, 0.1, -0.1, 0.0]))
    agent = Scripted([0, 0, 1, 2])
    contexts = np.array([[1.0, 0.0], [0.0, 1.0]])
    regret = play(agent, bank, contexts, stream)
    # best per prompt is 1 for both: 1 - 0, 1 - 1, 1 - 0, 1 - 1
    assert regret.tolist() == [1.0, 0.0, 1.0, 0.0]
    # what the users said: rating draw + noise; bank (p0,a0,d0) = 0 - 0.25, (p1,a0,d1) = 1 + 0.25 + 0.1,
    # (p1,a1,d0) = 0 - 0.25 - 0.1, (p0,a2,d1) = 1 + 0.25; the range (-1, 1) maps to itself
    assert [round(r, 12) for _, _, r in agent.seen] == [-0.25, 1.35, -0.35, 1.25]
    assert agent.seen[1][0] == (0.0, 1.0)  # the context of prompt 1
    # simple regret of picks (1, 2): ((1 - 0.5) + (1 - 0.5)) / 2 = 0.5; of the best picks: 0
    assert simple_regret(bank, np.array([1, 2])) == pytest.approx(0.5)
    assert simple_regret(bank, np.array([2, 0])) == 0.0
    assert to_unit(-2.0, (-4.0, 0.0)) == 0.0 and to_unit(0.0, (-4.0, 0.0)) == 1.0


def test_arm_grid_features_and_prompt_spread():
    arms = arm_grid(TuneConfig())
    assert [a.name for a in arms[:3]] == ["base g1.5", "base g3", "best-of-n x2 g1.5"] and len(arms) == 2 + 3 * 2 * 2
    f = arm_features(arms)
    # one-hot of 4 methods, log2 width / log2 4, guidance (g - 1.5) / 1.5
    assert f[0].tolist() == [1, 0, 0, 0, 0, 0] and f[1].tolist() == [1, 0, 0, 0, 0, 1]
    assert f[-1].tolist() == [0, 0, 0, 1, 1, 1] and f[2].tolist() == [0, 1, 0, 0, 0.5, 0]
    assert len(arm_grid(TuneConfig(arms=5))) == 5
    items = list(range(42))
    picked = spread(items, 8)
    assert len(set(picked)) == 8 and picked == sorted(picked) and spread(items, 0) == items


def _cells(out):
    state = json.loads((out / "bank" / "bank.json").read_text())
    return {k: {"ratings": c["ratings"], "judge": c["judge"]} for k, c in state["cells"].items()}


def test_bank_interrupted_and_resumed_equals_an_uninterrupted_one(tmp_path):
    prompts, arms = ["one red circle", "four blue squares"], arm_grid(SMALL)[:5]
    whole = build_bank(tmp_path / "whole", SMALL, prompts, arms, FakeSampler())
    with pytest.raises(KeyboardInterrupt):
        build_bank(tmp_path / "cut", SMALL, prompts, arms, FakeSampler(stop_after=4))
    assert len(_cells(tmp_path / "cut")) == 3  # the cells finished before the stop are kept
    again = FakeSampler()
    resumed = build_bank(tmp_path / "cut", SMALL, prompts, arms, again)
    assert again.calls == 2 * 5 - 3  # only the missing cells were sampled
    assert _cells(tmp_path / "cut") == _cells(tmp_path / "whole")
    assert np.array_equal(resumed.ratings, whole.ratings) and resumed.ratings.shape == (2, 5, 3)
    assert all(np.array_equal(load_cell_images(tmp_path / "cut", i, j), load_cell_images(tmp_path / "whole", i, j))
               for i in range(2) for j in range(5))
    finished = FakeSampler()
    build_bank(tmp_path / "cut", SMALL, prompts, arms, finished)
    assert finished.calls == 0  # a finished bank samples nothing
    with pytest.raises(UserError, match="--out: the bank in .* was built with other settings"):
        build_bank(tmp_path / "cut", SMALL, prompts[:1], arms, FakeSampler())


class Worst:
    """Always the arm with the lowest bank mean for the user's prompt (a broken agent)."""

    def __init__(self, bank: Bank, contexts: np.ndarray) -> None:
        self.worst = {tuple(c): int(np.argmin(bank.means[i])) for i, c in enumerate(contexts)}

    def act(self, context):
        return self.worst[tuple(context)]

    def update(self, context, arm, reward):
        pass


def _regrets(cfg, bank, contexts, arms, extra=None):
    """Cumulative regret of each agent on the first stream, the extra agent's included."""
    out = {n: float(r["regret"][0].sum()) for n, r in run_streams(cfg, bank, contexts, arms).items()}
    if extra is not None:
        out["extra"] = float(play(extra, bank, contexts, make_stream(cfg.seeds[0], cfg.rounds, len(bank.prompts), cfg.samples, cfg.noise)).sum())
    return out


def _learns(regrets: dict, name: str) -> bool:
    """The check a learning agent must pass: below half of uniform's cumulative regret."""
    return regrets[name] < 0.5 * regrets["uniform"]


def test_the_worst_arm_agent_has_the_largest_regret_and_fails_the_learning_check(tmp_path):
    from rewardiff.worlds.shapes.data import prompt_features

    cfg = TuneConfig(prompts=4, samples=2, rounds=300, seeds=(0,), epsilons=(4.0,), explore=100, noise=0.05)
    prompts = ["one red circle", "two green squares", "three blue triangles", "four yellow circles"]
    settings = arm_grid(cfg)
    bank = build_bank(tmp_path, cfg, prompts, settings, FakeSampler())
    contexts, arms = prompt_features(prompts), Arms(arm_features(settings))
    worst = Worst(bank, contexts)
    regrets = _regrets(cfg, bank, contexts, arms, worst)
    gaps = bank.means.max(1) - bank.means.min(1)
    stream_prompts = make_stream(0, 300, 4, 2, 0.05).prompts
    assert regrets["extra"] == pytest.approx(gaps[stream_prompts].sum())  # the gap, every round
    assert regrets["extra"] == max(regrets.values())
    assert _learns(regrets, "gp-ucb")  # the check a correct agent passes ...
    assert not _learns(regrets, "extra")  # ... and the broken one fails


def test_run_tune_reports_privacy_regret_and_the_judge(tmp_path):
    summary = run_tune(SMALL, tmp_path, FakeSampler())
    agents = summary["agents"]
    assert set(agents) == {"private eps=1", "private eps=4", "gp-ucb", "uniform"}
    assert agents["private eps=1"]["privacy_spent"] == [(1.0, 1e-5)]
    assert agents["private eps=4"]["privacy_spent"] == [(4.0, 1e-5)]
    assert agents["gp-ucb"]["privacy_spent"] == [(math.inf, 1.0)]
    for a in agents.values():
        assert len(a["cumulative_regret"]["per_seed"]) == 2 and a["simple_regret"]["mean"] >= 0
        assert set(a["picks"]) == set(summary["prompts"]) and "judge_count" in a["picked"]
    assert summary["reference"]["base"]["arm"] == "base g1.5"
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved["agents"]["gp-ucb"]["privacy_spent"] == [[None, 1.0]]  # strict JSON: inf is null
    html = (tmp_path / "report.html").read_text()
    assert "private eps=1" in html and "(1, 1e-05)" in html and (tmp_path / "regret.png").stat().st_size > 1000
    assert (tmp_path / "grid.png").is_file()


def test_reference_arm_is_the_base_nearest_guidance_two():
    bank = _bank(np.zeros((1, 3)))
    bank = bank._replace(arms=[Setting("base", 1, 1.5), Setting("base", 1, 3.0), Setting("smc", 4, 2.0)])
    assert reference_arm(bank) == 0
    assert reference_arm(bank._replace(arms=[Setting("smc", 2, 2.0)])) is None


def _main(args, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["rewardiff", *args])
    with pytest.raises(SystemExit) as exit_:
        main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize(("args", "needle"), [
    (["--epsilon", "1,-2"], "--epsilon: need numbers > 0"),
    (["--epsilon", "one"], "--epsilon: 'one' is not a comma-separated list of floats"),
    (["--methods", "base,gradient"], "--methods: gradient; use some of base, best-of-n"),
    (["--widths", "0,2"], "--widths: need whole numbers >= 1"),
    (["--samples", "0"], "--samples must be at least 1"),
    (["--rounds", "100", "--explore", "200"], "--explore 200 is more than --rounds 100"),
    (["--rounds", "1"], "--rounds must be at least 2, got 1"),
    (["--kernel", "poly"], "--kernel: 'poly' is not one of rbf, matern"),
    (["--seeds", ""], "--seeds: empty list"),
    (["--noise", "nan"], "--noise must be a number >= 0"),
    (["--rating", "nope"], "--rating: unknown reward 'nope'"),
])
def test_bad_options_are_one_line_errors(tmp_path, monkeypatch, capsys, args, needle):
    code, err = _main(["tune", "--out", str(tmp_path / "run"), *args], monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "run").exists()


def test_a_real_bank_cell_is_what_rewardiff_sample_makes(tmp_path):
    """The bank's base cell of prompt 0 holds the samples and the reward `rewardiff sample` gives at the same seeds."""
    from PIL import Image

    from rewardiff.sampling import sample_to_dir
    from rewardiff.tune import ModelSampler

    cfg = TuneConfig(methods=("base", "best-of-n"), widths=(2,), guidance_scales=(1.5,), samples=2, steps=3)
    arms = arm_grid(cfg)
    bank = build_bank(tmp_path / "tune", cfg, ["two red circles"], arms, ModelSampler(cfg, arms))
    ref = sample_to_dir(tmp_path / "sample", "shapes", None, ["two red circles"], 2, 0, "shapes-count", 3, 1.5, None)
    images = load_cell_images(tmp_path / "tune", 0, 0)
    for k in range(2):
        assert np.array_equal(images[k], np.asarray(Image.open(tmp_path / "sample" / "samples" / f"{k:04d}.png")))
    assert bank.means[0, 0] == pytest.approx(ref["reward_mean"], abs=1e-6)
    assert bank.value_range == pytest.approx((math.log(0.02), 0.0))
    assert set(bank.judge) >= {"judge_count", "judge_both"}
