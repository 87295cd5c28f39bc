"""Inference-time methods: identities with the base sampler, exact NFE, moves toward a known
optimum on the 2-D closed-form toy, the rollout's particle selection, budgets and errors."""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.guidance import budget_plan, guided_sample, make_method
from rewardiff.guidance.smc import systematic
from rewardiff.models.base import DiffusionModel
from rewardiff.rewards.base import RewardFn
from rewardiff.types import Selection
from rewardiff.worlds import toy2d
from tests.conftest import tiny_net

PROMPTS = ["two red circles", "one blue square", "three green triangles"]
SEEDS = [5, 6, 7]


def _tiny() -> DiffusionModel:
    net = tiny_net(0)
    return DiffusionModel(net, net.process(), net.encode, (3, 32, 32), name="tiny")


def _brightness_like() -> RewardFn:
    return RewardFn("mean", True, None, "mean pixel", lambda x, p: x.flatten(1).mean(1))


# ----------------------------------------------------------------------------- identities

IDENTITY = [
    ("best-of-n", {"width": 1}),
    ("svdd-pm", {"width": 1}),
    ("free2guide", {"width": 1}),
    ("free2guide", {"width": 4, "lam": math.inf}),
    ("smc", {"width": 1}),
    ("dsearch", {"width": 1, "m": 1, "w": 1}),
    ("gradient", {"scale": 0.0}),
]


@pytest.mark.parametrize(("name", "kw"), IDENTITY)
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_width_one_and_zero_strength_give_the_base_sampler_back(name, kw, eta):
    if name in ("svdd-pm", "free2guide", "dsearch", "smc") and eta == 0.0:
        pytest.skip("stochastic-candidate methods need eta > 0")
    m = _tiny()
    base = m.generate(PROMPTS, SEEDS, num_inference_steps=4, guidance_scale=2.0, eta=eta)
    meth = make_method(name, _brightness_like(), **kw)
    x, info = guided_sample(m, meth, PROMPTS, SEEDS, 4, guidance_scale=2.0, eta=eta)
    assert torch.equal(x, base)
    assert info["nfe_per_sample"] == 4 * 2


def test_a_seed_names_the_same_stochastic_sample_in_any_batch():
    m = _tiny()
    both = m.generate(PROMPTS, SEEDS, num_inference_steps=3, eta=1.0)
    alone = m.generate(PROMPTS[1:2], SEEDS[1:2], num_inference_steps=3, eta=1.0)
    assert torch.allclose(both[1:2], alone, atol=1e-4)  # same noise; only batched float rounding differs


# ----------------------------------------------------------------------------- exact NFE


def _nfe(name: str, c_scale: float = 2.0, **kw) -> float:
    m = _tiny()
    meth = make_method(name, _brightness_like(), **kw)
    _, info = guided_sample(m, meth, PROMPTS, SEEDS, 4, guidance_scale=c_scale)
    assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]
    return info["nfe_per_sample"]


def test_nfe_is_exact_and_matches_hand_counts():
    # T = 4 steps, classifier-free guidance: c = 2 evaluations a denoiser call
    assert _nfe("best-of-n", width=3) == 2 * 4 * 3
    assert _nfe("best-of-n", c_scale=1.0, width=3) == 4 * 3  # no CFG: one evaluation a call
    # SVDD-PM: one call at x_T, then M look-aheads at steps 0..T-2 (reused by the next step)
    assert _nfe("svdd-pm", width=3) == 2 * (1 + 3 * 3)
    # Free2Guide n = 3, window 2 on this zero-SNR model (start = step): one call at x_T and 3
    # look-aheads at step 0, 3 look-aheads at step 1 (each kept output reused), one call at step 3
    assert _nfe("free2guide", width=3, window=2) == 2 * (1 + 3 + 3 + 1)
    assert _nfe("smc", width=2) == 2 * 4 * 2
    assert _nfe("gradient", scale=0.05) == 2 * 4  # plus one backward a step, not an NFE
    # SVDD-MC: the value net is not the denoiser: the base sampler's count
    value = lambda x, t, cond: x.flatten(1).mean(1)  # noqa: E731
    m = _tiny()
    _, info = guided_sample(m, make_method("svdd-mc", _brightness_like(), width=5, value=value), PROMPTS, SEEDS, 4)
    assert info["nfe_per_sample"] == 2 * 4


def test_dsearch_nfe_by_hand(monkeypatch):
    from rewardiff.guidance.dsearch import DSearch

    monkeypatch.setattr(DSearch, "coins", lambda self, T: [False, True, True, False])
    meth = make_method("dsearch", _brightness_like(), width=4, m=2, w=1)
    # beams floor(4 ** (1 - i/3)) = 4, 2, 1, 1; expansions: step 0 no search -> m = 2,
    # step 1 searches -> int(1 * 2 * 4 / 2) = 4, step 2 searches -> int(1 * 2 * 4 / 1) = 8
    assert meth.beams(4) == [4, 2, 1, 1] and meth.expansions(4) == [2, 4, 8]
    m = _tiny()
    _, info = guided_sample(m, meth, PROMPTS, SEEDS, 4)
    assert info["nfe_per_sample"] == 2 * (4 + 4 * 2 + 2 * 4 + 1 * 8)


# ----------------------------------------------------------------------------- the toy with a known optimum


@pytest.fixture(scope="module")
def toy():
    return toy2d.toy2d_model()


TOY_METHODS = [
    ("best-of-n", {"width": 8}, False),
    ("svdd-pm", {"width": 8}, False),
    ("dsearch", {"width": 4, "m": 2, "w": 2}, False),
    ("dsearch-r", {"width": 4, "m": 2, "w": 2}, False),
    ("free2guide", {"width": 8, "window": 4}, False),
    ("free2guide", {"width": 8, "window": 4, "lam": 0.1}, False),
    ("smc", {"width": 8, "alpha": 0.5}, False),
    ("gradient", {"scale": 0.1, "normalize": False}, True),
]


@pytest.mark.parametrize(("name", "kw", "differentiable"), TOY_METHODS)
def test_methods_move_toy_samples_toward_the_reward_maximum(toy, name, kw, differentiable):
    """Base samples sit on 8 modes, 1/8 of them at the target mode; steering must raise that share."""
    n = 256
    prompts, seeds = [""] * n, list(range(n))
    reward = toy2d.target_reward() if differentiable else toy2d.target_reward_blackbox()
    meth = make_method(name, reward, **kw)
    eta = 1.0
    base = toy.generate(prompts, seeds, num_inference_steps=20, eta=eta)
    x, _ = guided_sample(toy, meth, prompts, seeds, 20, guidance_scale=1.0, eta=eta)
    near = lambda z: float(((z - torch.tensor(toy2d.TARGET)).norm(dim=1) < 0.6).float().mean())  # noqa: E731
    assert near(base) < 0.2
    assert near(x) > 2 * near(base), (near(base), near(x))
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 1.0


def test_svdd_mc_with_the_exact_value_equals_svdd_pm(toy):
    """With v(x_t) = r(E[x0 | x_t]) computed exactly, MC and PM make the same choices."""
    reward = toy2d.target_reward_blackbox()
    net, proc = toy.net, toy.process

    def exact_value(x, t, cond):
        out = net(x, torch.full((x.shape[0],), t), cond)
        return reward(proc.split(out, x, t)[0], [""] * x.shape[0])

    prompts, seeds = [""] * 64, list(range(64))
    a, ia = guided_sample(toy, make_method("svdd-pm", reward, width=6), prompts, seeds, 10, guidance_scale=1.0)
    b, ib = guided_sample(toy, make_method("svdd-mc", reward, width=6, value=exact_value), prompts, seeds, 10, guidance_scale=1.0)
    assert torch.allclose(a, b, atol=1e-5)
    assert ia["nfe_per_sample"] == 1 + 6 * 9 and ib["nfe_per_sample"] == 10


def test_soft_selection_is_between_base_and_argmax(toy):
    reward = toy2d.target_reward_blackbox()
    prompts, seeds = [""] * 256, list(range(256))
    means = []
    for lam in (math.inf, 1.0, 0.0):
        x, _ = guided_sample(toy, make_method("svdd-pm", reward, width=6, alpha=lam), prompts, seeds, 10, guidance_scale=1.0)
        means.append(float(reward(x, prompts).mean()))
    assert means[0] < means[1] < means[2]


# ----------------------------------------------------------------------------- the rollout's selections


class _CopyFirst:
    """At step 1, replace every particle by a copy of particle 0."""

    nfe = 0

    def __call__(self, ctx):
        if ctx.index != 1:
            return None
        parents = torch.zeros(ctx.out.prev.shape[0], dtype=torch.long)
        return Selection(ctx.out.prev[parents], parents)


def test_selected_particles_carry_their_condition_and_get_fresh_noise():
    m = _tiny()
    with torch.no_grad():
        traj = m.sample(PROMPTS, SEEDS, 4, eta=1.0, hook=_CopyFirst(), keep_states=True)
        ref = m.sample(PROMPTS[:1], SEEDS[:1], 4, eta=1.0, keep_states=True)
    # the first copy keeps particle 0's noise stream: it is particle 0's own sample
    assert torch.allclose(traj.x0[0], ref.x0[0], atol=1e-4)
    # copies start from the same state but draw their own noise afterwards
    assert torch.equal(traj.xs[2][1], traj.xs[2][0]) and not torch.allclose(traj.x0[1], traj.x0[0])
    # the history follows the ancestry: every kept x_T is particle 0's
    assert torch.allclose(traj.xs[0][2], ref.xs[0][0])
    # and the condition too: no-CFG sampling from copy 1's state with prompt 0 is deterministic given noise,
    # so a deterministic run shows the copies' outputs equal when eta = 0
    with torch.no_grad():
        det = m.sample(PROMPTS, SEEDS, 4, eta=0.0, hook=_CopyFirst())
    assert torch.allclose(det.x0[1], det.x0[0], atol=1e-6) and torch.allclose(det.x0[2], det.x0[0], atol=1e-6)


def test_systematic_resampling_follows_the_weights():
    g = torch.Generator().manual_seed(0)
    w = torch.tensor([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.0, 0.0, 0.5]])
    idx = systematic(w, g)
    assert idx[0].tolist() == [1, 1, 1, 1]
    assert idx[1].tolist() == [0, 1, 2, 3]
    assert sorted(idx[2].tolist()) == [0, 0, 3, 3]


# ----------------------------------------------------------------------------- budgets and errors


@pytest.mark.parametrize("name", ["best-of-n", "svdd-pm", "dsearch", "free2guide", "smc"])
@pytest.mark.parametrize("budget", [8, 17, 40, 100])
def test_budget_sets_the_widest_setting_that_fits(name, budget):
    meth = make_method(name, _brightness_like())
    budget_plan(meth, budget, 4, 2.0)
    assert meth.cost(4, 2) <= budget
    if name != "dsearch":  # one wider would not fit
        w = getattr(meth, meth.width_name)
        meth.set_width(w + 1)
        assert meth.cost(4, 2) > budget


def test_budget_is_spent_as_planned():
    m = _tiny()
    meth = make_method("svdd-pm", _brightness_like())
    budget_plan(meth, 30, 4, 2.0)
    _, info = guided_sample(m, meth, PROMPTS, SEEDS, 4)
    assert info["nfe_per_sample"] <= 30 and meth.m == 4  # 2 * (1 + 4 * 3) = 26; m = 5 would cost 32


@pytest.mark.parametrize(
    ("call", "needle"),
    [
        (lambda r, b: budget_plan(make_method("best-of-n", r), 7, 4, 2.0), "cannot meet --nfe-budget 7"),
        (lambda r, b: make_method("best-of-n", r, width=-2), "at least 1"),
        (lambda r, b: make_method("svdd-pm", r, width=0), "at least 1"),
        (lambda r, b: make_method("gradient", b).check(0.0), "needs a differentiable reward"),
        (lambda r, b: make_method("svdd-pm", r).check(0.0), "needs --eta > 0"),
        (lambda r, b: make_method("smc", r).check(0.0), "needs --eta > 0"),
        (lambda r, b: make_method("svdd-mc", r), "needs a value model"),
        (lambda r, b: make_method("smc", r, beta=1), "has no option 'beta'"),
        (lambda r, b: make_method("nope", r), "unknown method 'nope'"),
        (lambda r, b: make_method("smc", None), "needs a reward"),
    ],
)
def test_bad_options_are_user_errors(call, needle):
    diff = _brightness_like()
    black = RewardFn("jpeg-like", False, None, "black box", lambda x, p: x.flatten(1).std(1))
    with pytest.raises(UserError, match=needle):
        call(diff, black)
