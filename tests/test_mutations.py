"""Every method against a deliberately broken copy of itself: the check must tell them apart.

Each test here applies its mutation inside the test (``monkeypatch``, undone afterwards) and
asserts that the correct method passes a behavioural check that the mutated one fails. Where a
test elsewhere already catches a mutation (checked by editing the source, running, reverting),
it is named instead.

Fine-tuning (one optimizer step or a few, on a one-parameter model or a tiny token model):

- draft: the reward's sign in the objective flipped (``draft._objective`` returns +r) ->
  ``test_draft_gradient_matches_the_closed_form_and_a_flipped_sign_does_not`` here; the same
  edit in the source fails tests/test_finetune.py::test_draft_and_draft_k_gradients_match_the_closed_form.
- draft-k: the gradient window one step too long (``draft.last_k(T, k)`` -> ``last_k(T, k + 1)``)
  -> ``test_draft_k_gradient_window_off_by_one_is_caught``; in the source (``last_k(T, k + 1)``
  in ``_window_loss``) it fails tests/test_finetune.py::test_draft_and_draft_k_gradients_match_the_closed_form.
- draft-lv: the copies re-noised to the level of the step before the last (``add_noise`` at
  ``ts[-2]``) -> ``test_draft_lv_renoising_at_the_wrong_level_is_caught``, the closed form of
  tests/test_finetune.py::test_draft_lv_gradient_matches_closed_form at w = 1.2. That test
  itself (w = 0.8) passes with ``t_last = timesteps(T)[-2]`` in the source: there the two
  levels' gradients differ by 2 %, inside its Monte Carlo tolerance.
- alignprop: the drawn truncation mirrored (the window of the last T + 1 - K steps instead of
  the last K that ``truncation_k`` drew) -> ``test_alignprop_uses_the_drawn_window``; the same
  edit in the source passes every test in tests/test_finetune.py.
- refl: the reward's sign flipped (``draft._objective``) -> ``test_refl_gradient_matches_the_closed_form``;
  the same flip in the source (``r = -reward_fn(...)`` in ``refl``) passes tests/test_finetune.py.
- ddpo: the probability ratio inverted (pi_old / pi_theta, ``ppo_loss`` handed 1 / ratio) ->
  ``test_ddpo_raises_the_reward_and_an_inverted_ratio_does_not``; the same edit in the source
  (``torch.exp(old - lp)``) fails tests/test_ddpo.py::test_ddpo_raises_a_black_box_reward_on_a_toy.
- vard: the value term's sign flipped (the value model read as -V_phi in ``VARD._step_loss``
  only; its regression on the rewards unchanged) -> ``test_vard_raises_the_reward_and_a_flipped_value_lowers_it``.
  No other test catches it: with ``v.mean()`` for ``-v.mean()`` in the source every test in
  tests/test_vard.py passes (they check that weights move, the KL and resume).
- grpo: the group advantages' sign flipped (``grpo.group_advantages`` returning -A) ->
  ``test_grpo_raises_the_reward_and_flipped_advantages_lower_it`` (the flow toy: velocity x_t / 2 + b,
  black-box reward x0[0]); the KL of the means against its closed form in
  tests/test_grpo.py::test_grpo_kl_term_matches_the_closed_form.
- nft: the optimality inverted (r read as 1 - r: ``nft.optimality``) ->
  ``test_nft_raises_the_reward_and_a_flipped_optimality_lowers_it``; the loss's direction also by
  hand in tests/test_grpo.py::test_nft_gradient_pulls_toward_good_samples_and_away_from_bad.
- gumbel, autoregressive: the reward's sign flipped in the loss (the method handed -r) ->
  ``test_gumbel_autoregressive_raises_the_reward_and_a_flipped_sign_lowers_it``; the same edit
  in the source (``loss = r.mean() + ...``) fails
  tests/test_gumbel.py::test_ar_finetuning_raises_the_surrogate_reward_and_moves_away_from_the_base.
- gumbel, masked: the reward's sign flipped -> tests/test_gumbel.py::test_masked_finetuning_raises_the_reward_and_a_flipped_sign_lowers_it
  (it runs the flipped variant itself).

Guidance (the 2-D toy world: exact mixture denoiser, reward -||x - (2, 0)||^2, 128 samples,
10 steps, eta = 1; the check: the steered samples' mean reward beats the base sampler's at the
same seeds by at least 2, where the base mean is about -8 and the target mode scores 0):

- best-of-n: the selection inverted (argmin: ``best_of_n.pick_per_parent`` handed -values) ->
  ``test_guidance_beats_the_base_and_its_mutation_does_not[best-of-n]``; in the source it also
  fails tests/test_guidance.py::test_methods_move_toy_samples_toward_the_reward_maximum[best-of-n-kw0-False].
- svdd-pm: the selection inverted (``svdd.pick_per_parent`` handed -values) -> ``[svdd-pm]``; in
  the source it also fails test_guidance.py::test_methods_move_toy_samples_toward_the_reward_maximum[svdd-pm-kw1-False]
  and tests/test_token_guidance.py::test_guidance_raises_a_black_box_reward_on_tokens[svdd-pm].
- svdd-mc: the value's sign flipped (the exact value r(E[x0 | x_t]) negated) -> ``[svdd-mc]``.
- smc: the resampling weights inverted (the potentials exp(-v / alpha): alpha negated after
  construction), final particle drawn by weight -> ``[smc]``; the increments' sign flipped in
  the source also fails test_guidance.py::test_methods_move_toy_samples_toward_the_reward_maximum[smc-kw6-False]
  and tests/test_token_guidance.py::test_guidance_raises_a_black_box_reward_on_tokens[smc].
- gradient: the step taken down the gradient (scale negated after construction) -> ``[gradient]``;
  ``prev - scale * g`` in the source also fails
  test_guidance.py::test_methods_move_toy_samples_toward_the_reward_maximum[gradient-kw7-True].
- dsearch, dsearch-r, free2guide: through the public API only (``make_method`` +
  ``guided_sample``), the selection inverted by handing the method the negated reward ->
  ``[dsearch]``, ``[dsearch-r]``, ``[free2guide]``, so that the tests hold for any rewrite of
  their internals. The same check also fails when their internal selection is inverted instead
  (``pick_per_parent`` handed -values, ``topk`` taking the smallest: gains -6 to -10). The
  behavioural check does not tell apart DSearch-R's replacement draws with inverted softmax
  weights (gain 7.93 against 7.99; the beam selection dominates); the unit test
  test_dsearch.py::test_dsearch_r_replaces_the_worst_by_draws_weighted_toward_high_values
  does (softmax(-v) in ``DSearch._replace_worst`` fails it).

The flow process (each test below applies its mutation itself, ``monkeypatch`` on
``rewardiff.processes.flow``, and asserts that the correct step passes and the broken one fails):

- flow-grpo SDE mean: the sign of the score correction on x_t flipped (``flow_grpo_mean`` with
  1 - std_t^2 dt / (2 s)) -> tests/test_flow_process.py::test_sde_step_log_prob_matches_scipy_and_a_flipped_mean_does_not
  (mean and density against scipy: error 1.6 against 3e-7) and
  tests/test_flow_process.py::test_a_flipped_sde_mean_breaks_the_moments_and_the_marginals (the
  one-Gaussian moments, and the mixture: covariance 191 SE off, modes 5.7 times too wide).
- cps: the noise estimate's coefficient sigma' instead of sqrt(sigma'^2 - std^2) (``cps_mean``) ->
  tests/test_flow_process.py::test_cps_keeps_the_noise_level_and_an_off_coefficient_does_not (the
  variance of x_{t'} - (1 - sigma') x0 about 350 SE above sigma'^2) and
  tests/test_flow_process.py::test_an_off_cps_coefficient_breaks_the_moments.
- Checked by editing the source, running, reverting: the flow-grpo std without sqrt(-dt)
  (``std_t * (s - s_next)`` in ``FlowProcess._std``) fails seven tests of test_flow_process.py
  and test_flow_rollout.py (scipy's density, the moments, the marginals, the gradient windows,
  DRaFT-K, the KL to the base); DRaFT-LV re-noising a flow at the level before the last
  (``timesteps(T)[-2]``) fails tests/test_flow_rollout.py::test_draft_lv_renoises_a_flow_at_the_last_level.
"""

from __future__ import annotations

import math

import pytest
import torch

from rewardiff.finetune import draft as draft_module
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.draft import alignprop, draft, draft_k, draft_lv, refl, truncation_k
from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess, make_betas
from rewardiff.rewards.base import RewardFn
from tests.helpers import AffineDenoiser, ScaleDenoiser, linear_ddim_gradient

C = torch.tensor([0.5, -0.2, 0.1, 0.3])  # the target of the reward -||x - C||^2


def _target(x, prompts):
    return -((x - C) ** 2).sum(1)


def _scale_model(w: float, final_alpha_one: bool = False) -> tuple[DiffusionModel, ScaleDenoiser]:
    proc = GaussianProcess(make_betas("linear"), "sample", final_alpha_one=final_alpha_one)
    net = ScaleDenoiser(w)
    return DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (4,), output_range=None), net


def _grad(fn, model, net, cfg, seeds, gen_seed=0):
    out = fn(model, _target, [""] * len(seeds), seeds, cfg, torch.Generator().manual_seed(gen_seed))
    out.loss.backward()
    return float(net.w.grad), out


def _flip_objective(monkeypatch):
    """The reward's sign flipped in the shared objective: maximize -r."""
    monkeypatch.setattr(draft_module, "_objective", lambda r, kl, cfg: r.mean() + cfg.kl_weight * kl.mean())


# ----------------------------------------------------------------------------- reward backpropagation

T4, SEEDS3 = 4, [1, 2, 3]


def _draft_case(fn, k, monkeypatch=None, mutate=None):
    """(DL/dw of ``fn``, the closed form for a window of ``k``) on out = 0.9 x_t, 4 DDIM steps."""
    model, net = _scale_model(0.9)
    cfg = FinetuneConfig(num_inference_steps=T4, guidance_scale=1.0, eta=0.0, k=k)
    if mutate is not None:
        mutate(monkeypatch)
    got, _ = _grad(fn, model, net, cfg, SEEDS3)
    _, want = linear_ddim_gradient(model.process, model.process.timesteps(T4), 0.9, model.noise(SEEDS3), C, k)
    return got, want


def test_draft_gradient_matches_the_closed_form_and_a_flipped_sign_does_not(monkeypatch):
    got, want = _draft_case(draft, T4)
    assert got == pytest.approx(want, rel=1e-4)
    with monkeypatch.context() as mp:
        bad, _ = _draft_case(draft, T4, mp, _flip_objective)
    assert bad != pytest.approx(want, rel=0.5)  # it is -want


def test_draft_k_gradient_window_off_by_one_is_caught(monkeypatch):
    got, want = _draft_case(draft_k, 1)
    assert got == pytest.approx(want, rel=1e-4)
    orig = draft_module.last_k
    with monkeypatch.context() as mp:
        bad, _ = _draft_case(draft_k, 1, mp, lambda m: m.setattr(draft_module, "last_k", lambda T, k: orig(T, k + 1)))
    assert bad != pytest.approx(want, rel=0.05), (bad, want)


def test_alignprop_uses_the_drawn_window(monkeypatch):
    """AlignProp's gradient is DRaFT-K's for the K it draws (uniform in 1..T, the same
    generator), not that of the window mirrored to T + 1 - K."""
    cfg = FinetuneConfig(num_inference_steps=T4, guidance_scale=1.0, eta=0.0, truncation="uniform")

    def run(gen_seed):
        model, net = _scale_model(0.9)
        got, out = _grad(alignprop, model, net, cfg, SEEDS3, gen_seed)
        k = truncation_k(cfg, torch.Generator().manual_seed(gen_seed))
        _, want = linear_ddim_gradient(model.process, model.process.timesteps(T4), 0.9, model.noise(SEEDS3), C, k)
        return got, want

    for gen_seed in range(3):
        got, want = run(gen_seed)
        assert got == pytest.approx(want, rel=1e-4), gen_seed
    orig = draft_module._window_loss
    monkeypatch.setattr(draft_module, "_window_loss", lambda m, r, p, s, c, k: orig(m, r, p, s, c, c.num_inference_steps + 1 - k))
    results = [run(gen_seed) for gen_seed in range(3)]
    assert any(bad != pytest.approx(want, rel=0.05) for bad, want in results), results


def _refl_want(model: DiffusionModel, w: float, seeds: list[int], s: int) -> float:
    """ReFL with out = w x_t: x_s = prod_{j < s} (p_j + q_j w) x_T by deterministic DDIM (no
    gradient), x0_hat = w x_s, loss = mean -r = mean ||w x_s - C||^2, so
    dL/dw = mean 2 (w x_s - C) . x_s."""
    proc, ts = model.process, model.process.timesteps(T4)
    x = model.noise(seeds).double()
    for t, tp in zip(ts[:s], ts[1 : s + 1]):
        a, ap = float(proc.alpha_bar(t)), float(proc.alpha_bar(tp))
        p = math.sqrt(1 - ap) / math.sqrt(1 - a)
        q = math.sqrt(ap) - math.sqrt(1 - ap) * math.sqrt(a) / math.sqrt(1 - a)
        x = (p + q * w) * x
    return float((2 * ((w * x - C.double()) * x).sum(1)).mean())


def test_refl_gradient_matches_the_closed_form(monkeypatch):
    cfg = FinetuneConfig(num_inference_steps=T4, guidance_scale=1.0, eta=0.0, refl_start=0.25)

    def run():
        model, net = _scale_model(0.9)
        got, out = _grad(refl, model, net, cfg, SEEDS3)
        return got, _refl_want(model, 0.9, SEEDS3, out.grad_from)

    got, want = run()
    assert got == pytest.approx(want, rel=1e-4)
    _flip_objective(monkeypatch)
    bad, want = run()
    assert bad != pytest.approx(want, rel=0.5)


def test_draft_lv_renoising_at_the_wrong_level_is_caught(monkeypatch):
    """The closed form of tests/test_finetune.py::test_draft_lv_gradient_matches_closed_form:
    for out = w x_t and x_1 = a x0 + s eps, dE[-r]/dw = 2 (w a x0 - C) . (a x0) + 2 w s^2 d,
    with a, s those of the last step. Re-noising to the level of the step before breaks it."""
    # w = 1.2 makes |x0| large enough for the level to matter (measured: 28.0 at the last level
    # t = 199, 15.5 at t = 399); with w = 0.8 the two differ by 2 %, inside the Monte Carlo tolerance
    T, w, d = 5, 1.2, 4

    def run(mutate: bool):
        proc = GaussianProcess(make_betas("linear"), "sample")
        net = ScaleDenoiser(w)
        model = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (4,))
        ts = proc.timesteps(T)
        if mutate:
            orig = proc.add_noise
            monkeypatch.setattr(proc, "add_noise", lambda x0, eps, t: orig(x0, eps, torch.tensor(ts[-2])))
        cfg = FinetuneConfig(num_inference_steps=T, lv_n=20000, guidance_scale=1.0)
        got, _ = _grad(draft_lv, model, net, cfg, [7])
        with torch.no_grad():
            x0 = model.sample(["p"], [7], T).x0[0]
        a2 = proc.alpha_bar(ts[-1])
        a, s = a2.sqrt(), (1 - a2).sqrt()
        return got, float(2 * ((w * a * x0 - C) * (a * x0)).sum() + 2 * w * s**2 * d)

    got, want = run(False)
    assert got == pytest.approx(want, rel=0.03, abs=1e-3)
    bad, want = run(True)
    assert bad != pytest.approx(want, rel=0.1), (bad, want)


# ----------------------------------------------------------------------------- black-box rewards: DDPO and VARD


def _affine_model() -> tuple[DiffusionModel, AffineDenoiser]:
    proc = GaussianProcess(make_betas("linear"), "sample")
    net = AffineDenoiser()
    return DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (2,), output_range=None), net


def _first_coordinate(x, prompts):
    """The black-box reward x[0] (values only)."""
    return x[:, 0].detach()


def _train(method, model, net, cfg, steps: int, lr: float = 0.05) -> tuple[float, float]:
    """``steps`` trainer steps of a method that yields losses; (first batch's, last batch's) mean reward."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    rewards = []
    B = cfg.batch_size
    for step in range(steps):
        for out in method(model, _first_coordinate, [""] * B, list(range(step * B, step * B + B)), cfg,
                          torch.Generator().manual_seed(step)):
            out.loss.backward()
            if out.step:
                opt.step()
                opt.zero_grad()
        rewards.append(float(out.reward.mean()))
    return rewards[0], rewards[-1]


def test_ddpo_raises_the_reward_and_an_inverted_ratio_does_not(monkeypatch):
    """The toy of tests/test_ddpo.py: DDPO on the black-box reward x[0] pushes b[0] up; with the
    ratio pi_old / pi_theta the policy gradient points the other way and b[0] goes down."""
    from rewardiff.finetune import ddpo as ddpo_module

    cfg = FinetuneConfig(num_inference_steps=4, eta=1.0, guidance_scale=1.0, batch_size=32, ppo_minibatches=1, ppo_clip=0.2,
                         stat_min_count=10_000)

    def run():
        torch.manual_seed(0)
        model, net = _affine_model()
        first, last = _train(ddpo_module.DDPO(cfg), model, net, cfg, 12)
        return float(net.b[0].detach()), last - first

    b, gain = run()
    assert b > 0.2 and gain > 0.2, (b, gain)  # measured b[0] 0.57, gain 0.63
    orig = ddpo_module.ppo_loss
    monkeypatch.setattr(ddpo_module, "ppo_loss", lambda adv, ratio, clip: orig(adv, 1.0 / ratio, clip))
    b, gain = run()
    assert b < 0 and gain < 0, (b, gain)


def test_vard_raises_the_reward_and_a_flipped_value_lowers_it(monkeypatch):
    """VARD on the black-box reward x[0] of the affine toy: the value model, regressed on the
    rewards, learns V(x_t) ~ E[x0[0] | x_t], increasing in x_t[0]; ascending it through the
    step means raises b[0] and the reward. The mutation reads the value with the wrong sign in
    the fine-tuning loss only (the value's own regression unchanged): b[0] must go down."""
    from rewardiff.finetune import vard as vard_module

    cfg = FinetuneConfig(num_inference_steps=4, eta=1.0, guidance_scale=1.0, batch_size=32, vard_warmup=64,
                         vard_warmup_steps=100, vard_value_steps=8, vard_value_lr=3e-3, seed=0)

    def run():
        torch.manual_seed(0)
        model, net = _affine_model()
        first, last = _train(vard_module.VARD(cfg, model), model, net, cfg, 12)
        return float(net.b[0].detach()), last - first

    b, gain = run()
    assert b > 0.3 and gain > 0.3, (b, gain)  # measured b[0] 0.75 and gain 0.97 after 15 steps

    orig = vard_module.VARD._step_loss

    def flipped(self, *args, **kwargs):
        value = self.value
        self.value = lambda *a, **k: -value(*a, **k)
        try:
            return orig(self, *args, **kwargs)
        finally:
            self.value = value

    monkeypatch.setattr(vard_module.VARD, "_step_loss", flipped)
    b, gain = run()
    assert b < -0.3 and gain < -0.3, (b, gain)



def _flow_affine() -> tuple[DiffusionModel, AffineDenoiser]:
    """The affine toy as a flow: velocity x_t / 2 + b, the base model's velocity x_t / 2."""
    from rewardiff.processes.flow import FlowProcess

    net = AffineDenoiser()
    model = DiffusionModel(net, FlowProcess(), lambda p: torch.zeros(len(p), 1), (2,), output_range=None)
    model.reference = lambda x, t, c: x * 0.5
    return model, net


def _train_groups(method, model, net, cfg, steps: int = 12, lr: float = 0.05) -> tuple[float, float]:
    """``steps`` steps on groups of ``group_size`` prompts; the mean reward x0[0] of 64 fixed ODE
    samples after the first step and after the last."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    B = cfg.batch_size
    prompts = [f"p{i // cfg.group_size}" for i in range(B)]
    scores = []
    for step in range(steps):
        for out in method(model, _first_coordinate, prompts, list(range(step * B, step * B + B)), cfg,
                          torch.Generator().manual_seed(step)):
            out.loss.backward()
            if out.step:
                opt.step()
                opt.zero_grad()
        with torch.no_grad():
            x0 = model.sample(["p0"] * 64, list(range(100_000, 100_064)), cfg.num_inference_steps, eta=0.0).x0
        scores.append(float(x0[:, 0].mean()))
    return scores[0], scores[-1]


def test_grpo_raises_the_reward_and_flipped_advantages_lower_it(monkeypatch):
    """GRPO (flow SDE, a = 0.7, groups of 8) on the black-box reward x0[0] of the flow toy: the
    ODE samples' mean x0[0] rises; with the group advantages' sign flipped it falls."""
    from rewardiff.finetune import grpo as grpo_module

    cfg = FinetuneConfig(num_inference_steps=4, eta=0.7, guidance_scale=1.0, batch_size=32, group_size=8, ppo_minibatches=1,
                         ppo_clip=0.2)

    def run():
        torch.manual_seed(0)
        model, net = _flow_affine()
        first, last = _train_groups(grpo_module.GRPO(cfg), model, net, cfg)
        return last - first

    gain = run()
    assert gain > 0.25, gain  # measured 0.44 (0.14 -> 0.58)
    orig = grpo_module.group_advantages
    monkeypatch.setattr(grpo_module, "group_advantages", lambda p, r, g=True: (lambda a: (-a[0], a[1]))(orig(p, r, g)))
    gain = run()
    assert gain < -0.25, gain  # measured -0.44


def test_nft_raises_the_reward_and_a_flipped_optimality_lowers_it(monkeypatch):
    """DiffusionNFT (ODE samples, groups of 8, old weights = the current ones) on the same toy:
    the mean x0[0] rises; with r read as 1 - r (good samples pushed away, bad ones pulled
    toward) it falls."""
    from rewardiff.finetune import nft as nft_module

    cfg = FinetuneConfig(num_inference_steps=4, eta=0.0, guidance_scale=1.0, batch_size=32, group_size=8, ppo_minibatches=1,
                         nft_decay_rate=0.0, nft_decay_max=0.0)

    def run():
        torch.manual_seed(0)
        model, net = _flow_affine()
        first, last = _train_groups(nft_module.NFT(cfg, model), model, net, cfg)
        return last - first

    gain = run()
    assert gain > 0.25, gain  # measured 0.46 (0.14 -> 0.60)
    orig = nft_module.optimality
    monkeypatch.setattr(nft_module, "optimality", lambda adv, clip: 1 - orig(adv, clip))
    gain = run()
    assert gain < -0.25, gain

# ----------------------------------------------------------------------------- gumbel on tokens


def _ar_finetune(ar_dir, sign: float, steps: int = 10) -> tuple[float, float]:
    """Mean chem-rm-qed of 32 fixed samples before and after ``steps`` gumbel steps on ``sign`` * the reward."""
    from rewardiff.finetune.gumbel import gumbel
    from rewardiff.finetune.weights import attach_lora
    from rewardiff.models.registry import base_model
    from rewardiff.rewards import get_reward

    model = base_model(str(ar_dir))
    attach_lora(model, 0, 1.0)
    reward = get_reward("chem-rm-qed")
    cfg = FinetuneConfig(model=str(ar_dir), reward="chem-rm-qed", method="gumbel", batch_size=8, lora_rank=0, kl_weight=0.0,
                         gumbel_estimator="relaxed", seed=3)
    opt = torch.optim.Adam([p for p in model.net.parameters() if p.requires_grad], lr=3e-3)

    def score() -> float:
        with torch.no_grad():
            return float(reward(model.sample(list(range(100, 132))).tokens, [""] * 32).mean())

    model.net.eval()
    before = score()
    for step in range(steps):
        out = gumbel(model, lambda x, p: sign * reward(x, p), [""] * 8, list(range(8 * step, 8 * step + 8)), cfg, torch.Generator())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return before, score()


def test_gumbel_autoregressive_raises_the_reward_and_a_flipped_sign_lowers_it(ar_dir):
    before, up = _ar_finetune(ar_dir, 1.0)
    _, down = _ar_finetune(ar_dir, -1.0)
    assert up > before + 0.05, (before, up)  # measured 0.25 -> 0.36
    assert down < before - 0.05, (before, down)  # measured 0.25 -> -0.01


# ----------------------------------------------------------------------------- guidance on the 2-D toy

N_TOY, T_TOY = 128, 10


@pytest.fixture(scope="module")
def toy():
    from rewardiff.worlds import toy2d

    return toy2d.toy2d_model()


def _negated(reward: RewardFn) -> RewardFn:
    return RewardFn(f"minus-{reward.name}", reward.differentiable, None, f"minus {reward.name}", lambda x, p: -reward(x, p))


def _exact_value(toy, reward):
    """v(x_t) = r(E[x0 | x_t]), the exact posterior mean of the toy."""

    def value(x, t, cond):
        out = toy.net(x, torch.full((x.shape[0],), t), cond)
        return reward(toy.process.split(out, x, t)[0], [""] * x.shape[0])

    return value


def _invert_pick(module):
    orig = module.pick_per_parent
    return lambda mp: mp.setattr(module, "pick_per_parent", lambda v, m, temp, gen: orig(-v, m, temp, gen))


def _set(attr, fn):
    return lambda mp, meth: mp.setattr(meth, attr, fn(getattr(meth, attr)))


def _guidance_cases():
    from rewardiff.guidance import best_of_n, svdd

    return {
        # name: (options, differentiable reward, mutation of the module (mp), of the method (mp, meth), of the reward)
        "best-of-n": ({"width": 8}, False, _invert_pick(best_of_n), None, False),
        "svdd-pm": ({"width": 8}, False, _invert_pick(svdd), None, False),
        "svdd-mc": ({"width": 8}, False, None, _set("value", lambda v: (lambda x, t, c: -v(x, t, c))), False),
        "smc": ({"width": 8, "alpha": 0.5, "final": "sample"}, False, None, _set("alpha", lambda a: -a), False),
        "gradient": ({"scale": 0.1, "normalize": False}, True, None, _set("scale", lambda s: -s), False),
        "dsearch": ({"width": 4, "m": 2, "w": 2}, False, None, None, True),
        "dsearch-r": ({"width": 4, "m": 2, "w": 2}, False, None, None, True),
        "free2guide": ({"width": 8, "window": 4}, False, None, None, True),
    }


@pytest.mark.parametrize("name", ["best-of-n", "svdd-pm", "svdd-mc", "smc", "gradient", "dsearch", "dsearch-r", "free2guide"])
def test_guidance_beats_the_base_and_its_mutation_does_not(toy, monkeypatch, name):
    """Mean reward of the steered samples minus the base sampler's at the same seeds: above 2
    for the method (measured 6 to 8), below 0 for its mutation (measured -6 to -10)."""
    from rewardiff.guidance import guided_sample, make_method
    from rewardiff.worlds import toy2d

    options, differentiable, mutate_module, mutate_method, negate_reward = _guidance_cases()[name]
    reward = toy2d.target_reward() if differentiable else toy2d.target_reward_blackbox()
    prompts, seeds = [""] * N_TOY, list(range(N_TOY))
    base = float(reward(toy.generate(prompts, seeds, num_inference_steps=T_TOY, eta=1.0), prompts).mean())

    def gain(mutated: bool) -> float:
        steer = _negated(reward) if mutated and negate_reward else reward
        value = _exact_value(toy, reward) if name == "svdd-mc" else None
        meth = make_method(name, steer, value=value, **options)
        with monkeypatch.context() as mp:
            if mutated and mutate_module is not None:
                mutate_module(mp)
            if mutated and mutate_method is not None:
                mutate_method(mp, meth)
            x, _ = guided_sample(toy, meth, prompts, seeds, T_TOY, guidance_scale=1.0, eta=1.0)
        return float(reward(x, prompts).mean()) - base

    good, bad = gain(False), gain(True)
    assert good > 2.0, (good, bad)
    assert bad < 0.0, (good, bad)
