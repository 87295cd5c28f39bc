"""The one sampling loop: NFE, gradient windows, checkpointing, hooks, a pinned full loop, and
the Process protocol it needs."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from rewardiff.models.base import DiffusionModel
from rewardiff.processes.gaussian import GaussianProcess, make_betas
from rewardiff.rollout import last_k, rollout
from tests.conftest import tiny_net
from tests.helpers import ScaleDenoiser, count_twos, linear_ddim_gradient, tiny_masked

PROMPTS = ["two red circles", "one blue square"]


def _model(seed: int = 0) -> DiffusionModel:
    net = tiny_net(seed)
    return DiffusionModel(net, net.process(), net.encode, (3, 32, 32))


def _grads(net) -> list[torch.Tensor]:
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in net.parameters()]


def test_nfe_counts_cfg_twice():
    m = _model()
    with torch.no_grad():
        assert m.sample(PROMPTS, [0, 1], 5).nfe == 2 * 5  # B = 2, T = 5, one call a step
        assert m.sample(PROMPTS, [0, 1], 5, guidance_scale=3.0).nfe == 2 * 5 * 2  # CFG: 2 per element


def test_no_grad_window_builds_no_graph():
    m = _model()
    traj = m.sample(PROMPTS, [0, 1], 4)
    assert traj.x0.grad_fn is None


def test_full_window_with_checkpointing_equals_plain_backprop():
    m = _model()
    grads = []
    for ckpt in (True, False):
        m.net.zero_grad()
        m.sample(PROMPTS, [0, 1], 4, guidance_scale=2.0, grad_steps=last_k(4, 4), checkpoint=ckpt).x0.square().mean().backward()
        grads.append(_grads(m.net))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_k1_gradient_comes_from_the_last_step_only():
    """K = 1 equals differentiating the last step alone from the detached state x_1."""
    m = _model()
    T = 4
    m.net.zero_grad()
    m.sample(PROMPTS, [0, 1], T, grad_steps=last_k(T, 1)).x0.square().mean().backward()
    got = _grads(m.net)
    with torch.no_grad():
        states = m.sample(PROMPTS, [0, 1], T, keep_states=True).xs
    ts = m.process.timesteps(T)
    m.net.zero_grad()
    cond = m.encode(PROMPTS)
    out = m.net(states[T - 1], torch.full((2,), ts[-1]), cond)
    m.process.step(out, ts[-1], -1, states[T - 1]).prev.square().mean().backward()
    for a, b in zip(got, _grads(m.net)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_gradient_windows_match_the_closed_form_of_a_linear_denoiser():
    """out = w x_t, four deterministic DDIM steps of the real process: x_0 and dL/dw of
    L = mean ||x_0 - c||^2 written out by the chain rule (tests.helpers.linear_ddim_gradient)
    against the rollout's backward pass, with K = T (full backprop, with and without
    checkpointing) and K = 1 (only the last step's factor differentiated)."""
    proc = GaussianProcess(make_betas("linear"), "sample", final_alpha_one=False)
    net = ScaleDenoiser(0.9)
    m = DiffusionModel(net, proc, lambda p: torch.zeros(len(p), 1), (4,), output_range=None)
    T, seeds, c = 4, [1, 2, 3], torch.tensor([0.5, -0.2, 0.1, 0.3])
    x_T, ts = m.noise(seeds), proc.timesteps(T)
    for k, ckpt in ((T, True), (T, False), (1, True)):
        net.zero_grad()
        x0 = m.sample([""] * 3, seeds, T, grad_steps=last_k(T, k), checkpoint=ckpt).x0
        ((x0 - c) ** 2).sum(1).mean().backward()
        want_x0, want_grad = linear_ddim_gradient(proc, ts, 0.9, x_T, c, k)
        torch.testing.assert_close(x0.detach().double(), want_x0, rtol=1e-5, atol=1e-6)
        assert float(net.w.grad) == pytest.approx(want_grad, rel=1e-4), (k, ckpt)
    _, full = linear_ddim_gradient(proc, ts, 0.9, x_T, c, T)
    _, last = linear_ddim_gradient(proc, ts, 0.9, x_T, c, 1)
    assert abs(full - last) > 0.1 * abs(full)  # the two windows are told apart


def test_k1_differs_from_k_equal_t():
    m = _model()
    T = 3
    m.net.zero_grad()
    m.sample(PROMPTS, [0, 1], T, grad_steps=last_k(T, T)).x0.sum().backward()
    a = _grads(m.net)
    m.net.zero_grad()
    m.sample(PROMPTS, [0, 1], T, grad_steps=last_k(T, 1)).x0.sum().backward()
    assert any((x - y).abs().max() > 1e-6 for x, y in zip(a, _grads(m.net)))  # K = 1 differs from K = T


def test_pinned_loop_equals_diffusers_ddim_loop():
    """Our loop and a plain diffusers DDIMScheduler loop over the same net agree."""
    m = _model()
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction",
                          rescale_betas_zero_snr=True, timestep_spacing="trailing", clip_sample=False)
    sched.set_timesteps(5)  # diffusers steps to t - 1000 // n, which is the next timestep only when n divides 1000
    x = m.noise([0, 1])
    cond = m.encode(PROMPTS)
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(m.net(x, t.expand(2), cond), t, x).prev_sample
        ours = m.sample(PROMPTS, [0, 1], 5).x0
    torch.testing.assert_close(ours, x, atol=1e-5, rtol=1e-5)


def test_seeds_name_samples_independently_of_batch():
    m = _model()
    with torch.no_grad():
        both = m.sample(PROMPTS, [3, 4], 3).x0
        one = m.sample(PROMPTS[1:], [4], 3).x0
    torch.testing.assert_close(both[1:], one, atol=1e-5, rtol=1e-5)


class _Shift:
    nfe = 0

    def __init__(self, delta: float):
        self.delta, self.calls = delta, 0

    def __call__(self, ctx):
        self.calls += 1
        return None if self.delta == 0 else ctx.out.prev + self.delta


def test_hook_zero_is_identity_and_replacement_is_used():
    m = _model()
    with torch.no_grad():
        base = m.sample(PROMPTS, [0, 1], 3).x0
        h = _Shift(0.0)
        assert torch.equal(m.sample(PROMPTS, [0, 1], 3, hook=h).x0, base) and h.calls == 3
        shifted = m.sample(PROMPTS, [0, 1], 3, hook=_Shift(0.1)).x0
    assert not torch.allclose(shifted, base)


def test_reference_penalty_is_zero_against_itself_and_counts_nfe():
    m = _model()
    m.reference = m.net
    traj = m.sample(PROMPTS, [0, 1], 3, grad_steps=last_k(3, 2), kl=True)
    assert torch.allclose(traj.kl, torch.zeros(2))
    assert traj.nfe == 2 * 3 + 2 * 2  # 3 steps, plus the reference on the 2 gradient steps
    m.reference = _model(seed=1).net
    assert (m.sample(PROMPTS, [0, 1], 3, grad_steps=last_k(3, 2), kl=True).kl > 0).all()


def test_stochastic_rollout_is_reproducible_and_logs_probabilities():
    m = _model()
    with torch.no_grad():
        a = m.sample(PROMPTS, [0, 1], 4, eta=1.0)
        b = m.sample(PROMPTS, [0, 1], 4, eta=1.0)
    assert torch.equal(a.x0, b.x0)
    assert a.log_probs.shape == (2, 4) and (a.log_probs[:, :-1] != 0).all()


def test_rollout_without_steps_in_window_matches_direct_call():
    m = _model()
    cond = m.encode(PROMPTS)
    ts = m.process.timesteps(3)
    with torch.no_grad():
        t1 = rollout(m.net, m.process, m.noise([0, 1]), cond, ts)
    assert t1.log_probs.shape == (2, 3) and t1.nfe == 6


class _OnlyProtocol:
    """A process that exposes exactly the members of ``rewardiff.types.Process`` (and counts calls)."""

    def __init__(self, process):
        from rewardiff.types import Process

        self._process, self.calls = process, set()
        for name in [n for n in vars(Process) if not n.startswith("_")]:
            setattr(self, name, self._wrap(name))

    def _wrap(self, name):
        def call(*args, **kwargs):
            self.calls.add(name)
            return getattr(self._process, name)(*args, **kwargs)

        return call


def test_the_rollout_needs_only_the_process_protocol():
    """Both processes fit ``Process``; the rollout (with a selecting hook, which re-scores the
    kept particles through ``log_prob``) runs on a stand-in that has nothing else, and gives
    the real process's samples."""
    from rewardiff.guidance import make_method
    from rewardiff.processes.gaussian import GaussianProcess
    from rewardiff.processes.masked import MaskedProcess
    from rewardiff.rollout import rollout
    from rewardiff.types import Process

    assert isinstance(GaussianProcess.from_config(), Process) and isinstance(MaskedProcess(8, 1), Process)
    model = tiny_masked()
    seeds = [0, 1, 2, 3]
    x_T, cond, ts = model.noise(seeds), model.encode([""] * 4), model.process.timesteps(4)

    def run(process):
        hook = make_method("svdd-pm", count_twos(), width=3)  # M = 3 candidates a step, then a Selection
        hook.begin(4, model, 1.0)
        with torch.no_grad():
            return rollout(model.net, process, x_T, cond, ts, eta=1.0, hook=hook, generator=model.step_generators(seeds))

    stand_in = _OnlyProtocol(model.process)
    a, b = run(model.process), run(stand_in)
    assert torch.equal(a.x0, b.x0) and torch.equal(a.log_probs, b.log_probs)
    assert stand_in.calls == {"prev_timesteps", "is_stochastic", "noise_like", "step", "split", "log_prob"}


@pytest.mark.parametrize("k", [2, 4])
def test_checkpointed_window_gives_the_gradients_of_the_plain_one(k):
    """Every parameter's gradient, the text encoder's included (full fine-tuning: the condition
    carries a graph of its own), is the same with the window's steps recomputed (reentrant
    after the first step) as without; and the chain keeps one node a step, not a graph."""
    from rewardiff.models.base import DiffusionModel
    from rewardiff.rollout import last_k
    from rewardiff.worlds.shapes.denoiser import ShapesDenoiser
    from tests.conftest import TINY

    torch.manual_seed(0)
    net = ShapesDenoiser(TINY)
    model = DiffusionModel(net, net.process(), net.encode, (3, 32, 32))
    grads = []
    for checkpoint in (False, True):
        net.zero_grad(set_to_none=True)
        traj = model.sample(["two red circles", "one blue square"], [0, 1], 4, guidance_scale=2.0, grad_steps=last_k(4, k),
                            checkpoint=checkpoint)
        traj.x0.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any(n.startswith("text.") for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-4, atol=1e-7)


def _graph_nodes(t: torch.Tensor) -> int:
    seen, todo = set(), [t.grad_fn]
    while todo:
        f = todo.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        todo.extend(g for g, _ in f.next_functions)
    return len(seen)


def test_a_checkpointed_window_keeps_a_few_nodes_a_step_not_the_denoiser_graph():
    """What made full-chain backprop cost 2x the memory of K = 1: the non-reentrant variant
    recorded every operation of the denoiser for every step of the window."""
    from rewardiff.models.base import DiffusionModel
    from rewardiff.rollout import last_k
    from rewardiff.worlds.shapes.denoiser import ShapesDenoiser
    from tests.conftest import TINY

    torch.manual_seed(0)
    net = ShapesDenoiser(TINY)
    net.text.requires_grad_(False)  # LoRA-like: the condition carries no graph
    model = DiffusionModel(net, net.process(), net.encode, (3, 32, 32))

    def nodes(k: int, checkpoint: bool = True) -> int:
        traj = model.sample(["two red circles"], [0], 8, guidance_scale=2.0, grad_steps=last_k(8, k), checkpoint=checkpoint)
        return _graph_nodes(traj.x0)

    per_step = (nodes(8) - nodes(2)) / 6
    plain_per_step = (nodes(8, False) - nodes(2, False)) / 6
    assert per_step < 40 < 10 * 40 < plain_per_step, (per_step, plain_per_step)
