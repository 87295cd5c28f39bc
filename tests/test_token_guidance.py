"""Inference-time methods on masked token models: identities with the base sampler, exact NFE,
moves toward a black-box reward, eta on the masked process, and what they refuse."""

from __future__ import annotations

import pytest
import torch

from rewardiff.errors import UserError
from rewardiff.guidance import guided_sample, make_method
from tests.helpers import count_twos, needs_shipped_molecules, tiny_masked


IDENTITY = [("best-of-n", {"width": 1}), ("svdd-pm", {"width": 1}), ("smc", {"width": 1}),
            ("dsearch", {"width": 1, "m": 1, "w": 1})]


@pytest.mark.parametrize(("name", "kw"), IDENTITY)
def test_width_one_gives_the_base_sampler_back(name, kw):
    m = tiny_masked(0)
    seeds = [3, 4, 5]
    base = m.generate([""] * 3, seeds, num_inference_steps=4, eta=1.0)
    x, info = guided_sample(m, make_method(name, count_twos(), **kw), [""] * 3, seeds, 4, guidance_scale=1.0, eta=1.0)
    assert torch.equal(x, base)
    assert info["nfe_per_sample"] == 4


def test_nfe_is_exact_on_token_ids(monkeypatch):
    from rewardiff.guidance.dsearch import DSearch

    m = tiny_masked(0)

    def nfe(name, **kw):
        _, info = guided_sample(m, make_method(name, count_twos(), **kw), [""] * 2, [0, 1], 4, guidance_scale=1.0, eta=1.0)
        assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]
        return info["nfe_per_sample"]

    assert nfe("best-of-n", width=3) == 4 * 3
    assert nfe("svdd-pm", width=3) == 1 + 3 * 3  # one call at x_T, then M look-aheads at steps 0..T-2
    assert nfe("smc", width=2) == 4 * 2
    monkeypatch.setattr(DSearch, "coins", lambda self, T: [False, True, True, False])
    # the two requests share one prompt (""), so one beam of B0 = 2 * 4 = 8 shrinking to b = 2:
    # n_i = max(2, floor(8 * (2/8) ** (i/3))) = 8, 5, 3, 2; expansions m = 2, then
    # int(1 * 2 * 8 / 5) = 3, int(1 * 2 * 8 / 3) = 5; the batch costs 8 + 8*2 + 5*3 + 3*5 = 54
    assert nfe("dsearch", width=4, m=2, w=1) == (8 + 8 * 2 + 5 * 3 + 3 * 5) / 2


@pytest.mark.parametrize("name", ["svdd-pm", "dsearch", "smc"])
def test_guidance_raises_a_black_box_reward_on_tokens(name):
    m = tiny_masked(2)
    seeds = list(range(24))
    reward = count_twos()
    base = m.generate([""] * 24, seeds, num_inference_steps=6, eta=1.0)
    kw = {"svdd-pm": {"width": 6}, "dsearch": {"width": 4, "m": 2, "w": 2}, "smc": {"width": 6, "alpha": 0.2}}[name]
    x, _ = guided_sample(m, make_method(name, reward, **kw), [""] * 24, seeds, 6, guidance_scale=1.0, eta=1.0)
    prompts = [""] * 24
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 0.5, (reward(x, prompts).mean(), reward(base, prompts).mean())


def test_svdd_mc_with_the_exact_value_equals_svdd_pm():
    """v(x_t) = r(argmax x0_hat(x_t)) computed by the net itself: MC makes PM's choices."""
    m = tiny_masked(3)
    reward = count_twos()

    def exact_value(x, t, cond):
        x0_hat, _ = m.process.split(m.net(x, torch.full((x.shape[0],), t), cond), x, t)
        return reward(x0_hat, [""] * x.shape[0])

    seeds = list(range(6))
    a, ia = guided_sample(m, make_method("svdd-pm", reward, width=3), [""] * 6, seeds, 5, guidance_scale=1.0)
    b, ib = guided_sample(m, make_method("svdd-mc", reward, width=3, value=exact_value), [""] * 6, seeds, 5, guidance_scale=1.0)
    assert torch.equal(a, b)
    assert ia["nfe_per_sample"] == 1 + 3 * 4 and ib["nfe_per_sample"] == 5


def test_free2guide_refuses_the_masked_process():
    """Free2Guide picks among Gaussian initial noises: on tokens it says so in one line."""
    from rewardiff.worlds.molecules.masked import molecules_model
    from rewardiff.rewards import get_reward

    needs_shipped_molecules()
    with pytest.raises(UserError, match="free2guide"):
        guided_sample(molecules_model(), make_method("free2guide", get_reward("qed"), width=2), [""], [0], 4,
                      guidance_scale=1.0, eta=1.0)


def test_check_asks_the_process_whether_eta_draws():
    from rewardiff.processes.gaussian import GaussianProcess
    from rewardiff.processes.masked import MaskedProcess

    svdd = make_method("svdd-pm", count_twos())
    svdd.check(0.0, MaskedProcess(8, 1))  # the masked process draws at every step: any eta
    for process in (None, GaussianProcess.from_config()):  # DDIM with eta = 0 draws nothing
        with pytest.raises(UserError, match="needs --eta > 0"):
            svdd.check(0.0, process)
    svdd.check(0.5, GaussianProcess.from_config())


def test_masked_guidance_runs_at_eta_zero_and_eta_changes_nothing():
    """svdd-pm and smc on a masked model with eta = 0: accepted, and the same samples as eta = 1
    (the masked step ignores eta)."""
    model = tiny_masked()
    for name in ("svdd-pm", "smc"):
        a, ia = guided_sample(model, make_method(name, count_twos(), width=2), [""] * 3, [0, 1, 2], 4, guidance_scale=1.0, eta=0.0)
        b, _ = guided_sample(model, make_method(name, count_twos(), width=2), [""] * 3, [0, 1, 2], 4, guidance_scale=1.0, eta=1.0)
        assert torch.equal(a, b) and ia["eta"] == 0.0, name


def test_svdd_sampled_lookahead_scores_a_draw_of_the_clean_tokens_and_still_steers():
    """lookahead=sample: M = 1 is the base sampler; with M = 6 it raises the reward, as the
    argmax look-ahead does; it scores draws, so its choices differ from the argmax ones; and a
    model of continuous states is refused in one line."""
    m = tiny_masked(2)
    seeds, prompts = list(range(24)), [""] * 24
    reward = count_twos()
    base = m.generate(prompts, seeds, num_inference_steps=6, eta=1.0)
    one, _ = guided_sample(m, make_method("svdd-pm", reward, width=1, lookahead="sample"), prompts, seeds, 6, guidance_scale=1.0)
    assert torch.equal(one, base)
    drawn, info = guided_sample(m, make_method("svdd-pm", reward, width=6, lookahead="sample"), prompts, seeds, 6, guidance_scale=1.0)
    mean, _ = guided_sample(m, make_method("svdd-pm", reward, width=6), prompts, seeds, 6, guidance_scale=1.0)
    assert info["options"]["lookahead"] == "sample" and not torch.equal(drawn, mean)
    assert float(reward(drawn, prompts).mean()) > float(reward(base, prompts).mean()) + 0.5


def test_svdd_sampled_lookahead_refuses_continuous_states():
    from rewardiff.worlds.toy2d import target_reward_blackbox, toy2d_model

    with pytest.raises(UserError, match="lookahead=sample draws clean tokens"):
        guided_sample(toy2d_model(), make_method("svdd-pm", target_reward_blackbox(), width=2, lookahead="sample"),
                      [""] * 2, [0, 1], 4, guidance_scale=1.0)


def test_svdd_guided_from_a_later_step_costs_and_steers_as_stated():
    """guide_from = k: steps 0 .. k-1 unguided (k + 1 calls through step k), M look-aheads at each of
    the steps k .. T-2; k >= T - 1 guides nothing and gives the base sampler back; the early
    steps are the base sampler's own (the same tokens as base up to step k)."""
    m = tiny_masked(2)
    seeds, prompts = list(range(24)), [""] * 24
    reward = count_twos()
    base = m.generate(prompts, seeds, num_inference_steps=6, eta=1.0)

    def run(**kw):
        x, info = guided_sample(m, make_method("svdd-pm", reward, **kw), prompts, seeds, 6, guidance_scale=1.0)
        assert info["nfe_per_sample"] == info["expected_nfe_per_sample"]
        return x, info["nfe_per_sample"]

    assert run(width=4, guide_from=2)[1] == (2 + 1) + 4 * 3
    x, nfe = run(width=4, guide_from=5)
    assert nfe == 6 and torch.equal(x, base)
    x, _ = run(width=6, guide_from=2)
    assert float(reward(x, prompts).mean()) > float(reward(base, prompts).mean()) + 0.3
    with pytest.raises(UserError, match="guide_from must be >= 0"):
        make_method("svdd-pm", reward, width=2, guide_from=-1)


def test_svdd_final_selection_picks_the_best_final_draw_at_no_extra_nfe():
    """final=True: at the last step M draws of the final tokens, the best by the reward kept;
    NFE unchanged (they are final samples); the reward is at least the plain SVDD-PM's on
    average; a selection inverted by a negated reward does worse than the plain one."""
    from rewardiff.rewards import RewardFn

    m = tiny_masked(2)
    seeds, prompts = list(range(64)), [""] * 64
    reward = count_twos()
    flipped = RewardFn("minus-twos", False, None, "", lambda x, p: -reward(x, p))

    def run(r, **kw):
        x, info = guided_sample(m, make_method("svdd-pm", r, width=4, **kw), prompts, seeds, 6, guidance_scale=1.0)
        assert info["nfe_per_sample"] == info["expected_nfe_per_sample"] == 1 + 4 * 5
        return float(reward(x, prompts).mean())

    plain, final = run(reward), run(reward, final=True)
    assert final > plain + 0.05, (final, plain)  # measured: 1.83 against 1.70
    assert run(flipped, final=True) < run(flipped) + 1e-9  # steering away, the final choice steers further away
