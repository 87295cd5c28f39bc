"""DSearch: the beam schedules by hand, one beam per prompt group (never crossing groups), exact
NFE of mixed groups, identities with the base sampler, the budget planner, and a reward that
rises on the 2-D toy with the paper's setting."""

from __future__ import annotations

import pytest
import torch

from rewardiff.guidance import budget_plan, guided_sample, make_method
from rewardiff.guidance.dsearch import DSearch, beam_width
from rewardiff.models.base import DiffusionModel
from rewardiff.rewards.base import RewardFn
from rewardiff.worlds import toy2d
from tests.conftest import tiny_net


def _tiny() -> DiffusionModel:
    net = tiny_net(0)
    return DiffusionModel(net, net.process(), net.encode, (3, 32, 32), name="tiny")


A, B, C = "two red circles", "one blue square", "three green triangles"


def _mean() -> RewardFn:
    return RewardFn("mean", True, None, "mean pixel", lambda x, p: x.flatten(1).mean(1))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        # b = 2, o = 3: B0 = 6, T = 4, u = i / 3
        ("exp", [6, 4, 2, 2]),  # floor(6 * (1/3) ** u) = 6, 4.16, 2.88, 2
        ("linear", [6, 4, 3, 2]),  # floor(6 - 4 u) = 6, 4.67, 3.33, 2
        ("quadratic", [6, 3, 2, 2]),  # floor(2 + 4 (1 - u) ** 2) = 6, 3.78, 2.44, 2
        ("sigmoid", [6, 5, 2, 2]),  # logistic 10 (u - 1/2) normalised to 1 .. 0: 0.846, 0.154
    ],
)
def test_the_beam_shrinks_from_b_times_oversample_to_b_by_the_formula(schedule, expected):
    assert [beam_width(2, 3, i, 4, schedule) for i in range(4)] == expected
    meth = DSearch(_mean(), oversample=3, schedule=schedule)
    assert meth.beams(4, group=2) == expected


def test_expansions_and_the_nfe_of_mixed_prompt_groups_by_hand(monkeypatch):
    monkeypatch.setattr(DSearch, "coins", lambda self, T: [False, True, True, False])
    meth = make_method("dsearch", _mean(), width=3, m=2, w=1)
    # group "a" (2 requests): beams 6, 4, 2, 2; e = M = 2, int(1*2*6/4) = 3, int(1*2*6/2) = 6
    assert meth.expansions(4, group=2) == [2, 3, 6]
    # group "b" (1 request): beams floor(3 ** (1 - u)) = 3, 2, 1, 1; e = 2, int(2*3/2) = 3, int(2*3/1) = 6
    assert meth.beams(4) == [3, 2, 1, 1] and meth.expansions(4) == [2, 3, 6]
    calls = (6 + 6 * 2 + 4 * 3 + 2 * 6) + (3 + 3 * 2 + 2 * 3 + 1 * 6)  # 42 + 21
    _, info = guided_sample(_tiny(), meth, [A, B, A], [1, 2, 3], 4, guidance_scale=2.0)
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"] == 2 * calls / 3
    assert meth.bound(4, 2) >= 2 * calls / 3 and meth.cost(4, 2) == 2 * 21


class _Spy(DSearch):
    """DSearch that records every step's particle prompts and the selections it returns."""

    def step(self, ctx):
        answer = super().step(ctx)
        self.log.append((list(ctx.prompts), answer))
        return answer


def test_particles_never_cross_prompt_groups():
    """A reward that pays 100 for prompt B would pull every survivor into B's group if the
    beam were one for the batch; each group keeps its own beam and its own prompt."""
    reward = RewardFn("b-pays", False, None, "", lambda x, p: x.flatten(1).mean(1) + 100.0 * torch.tensor([q == B for q in p]))
    meth = _Spy(reward, oversample=3, m=2, w=2)
    meth.log = []
    prompts = [A, B, A, C]
    _tiny_model = _tiny()
    guided_sample(_tiny_model, meth, prompts, [1, 2, 3, 4], 5, guidance_scale=1.0)
    T, sizes = 5, {A: 2, B: 1, C: 1}
    for i, (before, answer) in enumerate(meth.log[:-1]):
        after = [before[int(p)] for p in answer.parents] if answer is not None else before
        for q, b in sizes.items():  # every group holds its own beam n_{i+1}, of its own prompt
            assert after.count(q) == meth.beams(T, b)[i + 1], (i, q, after)
    before, answer = meth.log[-1]
    final = [before[int(p)] for p in answer.parents] if answer is not None else before
    assert final == prompts  # one sample per request, of the request's prompt, in request order


@pytest.mark.parametrize("prompts", [[A, A, A], ["", "", B]])
def test_width_one_is_the_base_sampler_also_when_requests_share_a_prompt(prompts):
    m = _tiny()
    seeds = [5, 6, 7]
    base = m.generate(prompts, seeds, num_inference_steps=4, guidance_scale=2.0, eta=1.0)
    x, info = guided_sample(m, make_method("dsearch", _mean(), width=1, m=1, w=1), prompts, seeds, 4, guidance_scale=2.0)
    assert torch.equal(x, base) and info["nfe_per_sample"] == 8


def test_the_samples_of_a_group_are_distinct_particles_best_first():
    reward = toy2d.target_reward_blackbox()
    toy = toy2d.toy2d_model()
    for name in ("dsearch", "dsearch-r"):
        meth = make_method(name, reward, width=4, m=3, w=2, **({"replace": 0.3} if name == "dsearch-r" else {}))
        x, _ = guided_sample(toy, meth, [""] * 6, list(range(6)), 8, guidance_scale=1.0)
        assert len({tuple(v.tolist()) for v in x}) == 6  # distinct samples for the six requests


def test_paper_setting_by_name_and_the_budget_planner_narrows_the_beam_first():
    r = _mean()
    paper = make_method("dsearch", r)
    assert (paper.oversample, paper.m, paper.w) == (5, 5, 5) and paper.options()["setting"] == "paper"
    paper_r = make_method("dsearch-r", r)
    assert (paper_r.oversample, paper_r.m, paper_r.w, paper_r.replace) == (1, 5, 5, 0.03)
    assert paper_r.options()["setting"] == "paper"
    T, c = 4, 1
    generous = make_method("dsearch", r)
    budget_plan(generous, 10_000, T, c)
    assert (generous.m, generous.w) == (5, 5) and generous.oversample > 5  # M and w kept, wider beam
    # o = 1 at M = w = 5 costs at most 1 + sum(25 if search else 5): fits 100 without lowering M, w
    tight = make_method("dsearch", r)
    budget_plan(tight, int(tight._bound_at(1, T, c)), T, c)
    assert (tight.oversample, tight.m, tight.w) == (1, 5, 5) and tight.options()["setting"] == "budget"
    small = make_method("dsearch", r)
    budget_plan(small, 12, T, c)
    assert small.bound(T, c) <= 12 and (small.m, small.w) < (5, 5)


def test_dsearch_with_the_paper_setting_raises_the_toy_reward():
    toy = toy2d.toy2d_model()
    reward = toy2d.target_reward_blackbox()
    n = 48
    prompts, seeds = [""] * n, list(range(n))
    base = toy.generate(prompts, seeds, num_inference_steps=10, eta=1.0)
    x, info = guided_sample(toy, make_method("dsearch", reward), prompts, seeds, 10, guidance_scale=1.0)
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 1.0


def test_dsearch_r_replaces_the_worst_by_draws_weighted_toward_high_values():
    """_replace_worst: the best na - r of ``top`` (sorted best first) are kept in order, and the r
    replacements are softmax(v / temperature) draws over the pool, so with a small temperature
    they are the pool's highest values; weights inverted (softmax(-v)) would draw the lowest."""
    import torch

    from rewardiff.guidance.dsearch import DSearch

    d = DSearch(None, replace=0.5, temperature=0.05, seed=0)
    v = torch.arange(20, dtype=torch.float)  # value of pool row i is i
    pool = torch.arange(20)
    top = torch.tensor([19, 17, 15, 13, 11, 9, 7, 5, 3, 1])  # best first
    got = d._replace_worst(top, pool, v)
    assert len(got) == 10
    r = d.stats["replaced"]
    assert r in (5, 6) and torch.equal(got[: 10 - r], top[: 10 - r])  # the worst r went, the rest kept in order
    assert float(v[got[10 - r :]].mean()) >= 18.5  # draws concentrate on the highest values (19, then 18)
