"""rewardiff.bandits: kernels, environments, the private estimators' sensitivities, agents, audit."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate
from scipy.stats import norm

from rewardiff.bandits import (
    GPUCB,
    Arms,
    CovarianceEstimator,
    PrivateKernelBandit,
    RidgeOutputPerturbation,
    RKHSEnvironment,
    UniformAgent,
    audit,
    covariance_sensitivity,
    gaussian_delta,
    gaussian_sigma,
    joint,
    landmarks,
    matern,
    nystrom_features,
    rbf,
    ridge_sensitivity,
    worst_case_neighbours,
)

KERNELS = [rbf(0.3), matern(0.5, 0.3), matern(1.5, 0.3), matern(2.5, 0.3)]


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.label)
def test_gram_is_psd(kernel):
    x = np.random.default_rng(0).uniform(0, 1, (60, 3))
    k = kernel.gram(x)
    assert np.allclose(k, k.T)
    assert np.linalg.eigvalsh(k).min() >= -1e-9


def test_kernel_closed_forms():
    l = 0.7
    x, y = np.zeros((1, 2)), np.array([[0.6 * l, 0.8 * l]])  # r = l exactly
    s3, s5 = math.sqrt(3), math.sqrt(5)
    assert rbf(l).gram(x, y)[0, 0] == pytest.approx(math.exp(-0.5))
    assert matern(0.5, l).gram(x, y)[0, 0] == pytest.approx(math.exp(-1))
    # (1 + sqrt3) e^{-sqrt3} = 2.7320508 * 0.1769212 = 0.4833577
    assert matern(1.5, l).gram(x, y)[0, 0] == pytest.approx(0.4833577, abs=1e-7)
    # r = 2l for Matern 5/2: (1 + 2 sqrt5 + 20/3) e^{-2 sqrt5}
    assert matern(2.5, l).gram(x, 2 * y)[0, 0] == pytest.approx((1 + 2 * s5 + 20 / 3) * math.exp(-2 * s5))
    assert matern(1.5, l).gram(x)[0, 0] == 1.0


def test_nystrom_features_bounded_and_exact_on_landmarks():
    k = matern(2.5, 0.2)
    marks = np.random.default_rng(1).uniform(0, 1, (25, 2))
    phi = nystrom_features(k, marks)
    z = np.random.default_rng(2).uniform(-0.5, 1.5, (500, 2))
    assert np.linalg.norm(phi(z), axis=1).max() <= 1.0 + 1e-12
    f = phi(marks)
    assert np.allclose(f @ f.T, k.gram(marks), atol=1e-5)  # the Nystrom approximation is exact there


def test_environment_norm_regret_and_seeding():
    arms = Arms.grid(0, 1, 7)
    env = RKHSEnvironment(rbf(0.25), context_dim=2, arms=arms, rkhs_norm=2.0, seed=3)
    assert env.rkhs_norm_actual == pytest.approx(2.0)
    c = env.sample_context()
    best = env.best_action(c)
    assert env.regret(c, best) == pytest.approx(0.0, abs=1e-12)
    assert min(env.regret(c, a) for a in range(len(arms))) >= -1e-12
    again = RKHSEnvironment(rbf(0.25), context_dim=2, arms=arms, rkhs_norm=2.0, seed=3)
    assert np.allclose(again.coef, env.coef)
    cont = RKHSEnvironment(matern(1.5, 0.3), context_dim=1, arms=None, action_dim=1, seed=0, context_set=[[0.1], [0.9]])
    assert set(cont.sample_contexts(50)[:, 0].tolist()) == {0.1, 0.9}  # uniform over the finite set
    a = cont.best_action(np.array([0.1]))
    assert cont.regret(np.array([0.1]), a) == pytest.approx(0.0, abs=1e-12) and a.shape == (1,)


def test_covariance_sensitivity_by_hand():
    # Identity features on the unit disc (||phi|| <= 1), n = 3 records, R = 1.
    est = CovarianceEstimator(phi=lambda z: np.asarray(z, float), m=2, reward_bound=1.0)
    z = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    y = np.array([1.0, -1.0, 0.5])
    # the formula: (sqrt2 / n, 2R / n) = (0.4714045, 0.6666667)
    assert covariance_sensitivity(3, 3, 1.0) == pytest.approx((math.sqrt(2) / 3, 2 / 3))
    assert est.sensitivity(3) == pytest.approx((0.4714045, 0.6666667), abs=1e-7)
    s = est.statistics(z, y)  # (S11, S12, S22, b1, b2)
    assert s == pytest.approx([(1 + 0.36) / 3, 0.48 / 3, (1 + 0.64) / 3, (1 + 0.3) / 3, (-1 + 0.4) / 3])
    # Neighbour 1: the context moves to the orthogonal unit vector v = (0.8, -0.6), reward -1.
    # ||u u^T - v v^T||_F^2 = 1 + 1 - 2 (u.v)^2 = 2, so dSigma_F = sqrt2/3 (the bound is attained);
    # db = (-v - 0.5 u) / 3 = (-1.1, 0.2) / 3, norm sqrt(1.25)/3 = 0.3726780 <= 2/3.
    z2, y2 = z.copy(), y.copy()
    z2[2], y2[2] = [0.8, -0.6], -1.0
    d = est.statistics(z2, y2) - s
    sig = np.array([[d[0], d[1]], [d[1], d[2]]])
    assert np.linalg.norm(sig) == pytest.approx(math.sqrt(2) / 3)
    assert np.linalg.norm(d[:3]) <= math.sqrt(2) / 3 + 1e-12  # the released upper triangle
    assert np.linalg.norm(d[3:]) == pytest.approx(math.sqrt(1.25) / 3)
    # Neighbour 2: only the reward changes, 1 -> -1 at a unit context: db = 2u/3, the bound exactly.
    y3 = y.copy()
    y3[2] = -1.0
    z3 = z.copy()
    y4 = y.copy()
    y4[2] = 1.0
    d = est.statistics(z3, y3) - est.statistics(z3, y4)
    assert np.allclose(d[:3], 0) and np.linalg.norm(d[3:]) == pytest.approx(2 / 3)


def test_ridge_sensitivity_by_hand_and_randomised():
    # phi(z) = z in [-1, 1], n = 2, lam = ridge / n = 0.25 (epsilon = inf: no noise, lam = lam0 / n).
    est = RidgeOutputPerturbation(phi=lambda z: np.asarray(z, float).reshape(-1, 1), m=1, epsilon=math.inf,
                                  ridge=0.5, reward_bound=1.0)
    assert est.regulariser(2) == 0.25
    # theta = (sum z y / n) / (sum z^2 / n + lam): D = {(1, 1), (1, 1)} -> 1 / 1.25 = 0.8; D' = {(1, 1), (1, -1)} -> 0
    t0 = est.statistics(np.array([[1.0], [1.0]]), np.array([1.0, 1.0]))
    t1 = est.statistics(np.array([[1.0], [1.0]]), np.array([1.0, -1.0]))
    assert t0[0] == pytest.approx(0.8) and t1[0] == pytest.approx(0.0)
    # bound 2 kappa R (kappa / sqrt(lam) + 1) / (n lam) = 2 (2 + 1) / 0.5 = 12
    assert ridge_sensitivity(2, 0.25, 1.0) == pytest.approx(12.0)
    assert abs(t0[0] - t1[0]) <= 12.0
    # randomised: worst change over many random neighbours stays under the closed forms
    rng = np.random.default_rng(0)
    marks = rng.uniform(0, 1, (10, 2))
    phi = nystrom_features(rbf(0.3), marks)
    cov = CovarianceEstimator(phi, 10, reward_bound=1.0)
    kr = RidgeOutputPerturbation(phi, 10, epsilon=1.0, reward_bound=1.0)
    n = 12
    worst_s = worst_b = worst_r = 0.0
    for _ in range(300):
        z = rng.uniform(0, 1, (n, 2))
        y = rng.uniform(-1, 1, n)
        z2, y2 = z.copy(), y.copy()
        i = rng.integers(n)
        z2[i], y2[i] = rng.uniform(0, 1, 2), rng.choice([-1.0, 1.0])
        d = cov.statistics(z2, y2) - cov.statistics(z, y)
        worst_s, worst_b = max(worst_s, np.linalg.norm(d[:55])), max(worst_b, np.linalg.norm(d[55:]))
        worst_r = max(worst_r, np.linalg.norm(kr.statistics(z2, y2) - kr.statistics(z, y)))
    d_s, d_b = cov.sensitivity(n)
    assert worst_s <= d_s and worst_b <= d_b and worst_r <= kr.sensitivity(n)


def test_analytic_gaussian_mechanism_against_the_hockey_stick_integral():
    sens, eps, delta = 0.7, 1.0, 1e-5
    sigma = gaussian_sigma(sens, eps, delta)
    # delta(eps) = int max(0, p1(x) - e^eps p0(x)) dx for N(sens, s^2) vs N(0, s^2), by quadrature
    def gap(x):
        return max(0.0, norm.pdf(x, sens, sigma) - math.exp(eps) * norm.pdf(x, 0, sigma))
    val, _ = integrate.quad(gap, -10 * sigma, 20 * sigma, points=[sens / 2 + eps * sigma**2 / sens], limit=200)
    assert val == pytest.approx(delta, rel=1e-4)
    assert gaussian_delta(sigma, sens, eps) == pytest.approx(delta, rel=1e-6)
    assert sigma < sens * math.sqrt(2 * math.log(1.25 / delta)) / eps  # tighter than Dwork-Roth Thm A.1
    assert gaussian_sigma(sens, math.inf, delta) == 0.0


def _play(agent, env, rounds):
    total = 0.0
    for _ in range(rounds):
        c = env.sample_context()
        a = agent.act(c)
        total += env.regret(c, a)
        agent.update(c, a, env.reward(c, a))
    return total


def test_gpucb_regret_below_uniform():
    arms = Arms.grid(0, 1, 8)
    ucb = uni = 0.0
    for seed in range(3):
        k = rbf(0.25)
        ucb += _play(GPUCB(arms, k, horizon=150, noise_bound=0.1, seed=seed), RKHSEnvironment(k, 1, arms, seed=seed), 150)
        uni += _play(UniformAgent(arms, k, seed=seed), RKHSEnvironment(k, 1, arms, seed=seed), 150)
    assert ucb < 0.7 * uni


def _private_error(epsilon, seed, estimator="covariance", rounds=300):
    k = matern(2.5, 0.2)
    arms = Arms.grid(0, 1, 8)
    env = RKHSEnvironment(k, 1, arms, seed=seed)
    agent = PrivateKernelBandit(arms, k, rounds, epsilon=epsilon, estimator=estimator, seed=seed + 100)
    _play(agent, env, rounds)
    z = joint(np.random.default_rng(seed).uniform(0, 1, (100, 1)), arms.features).reshape(-1, 2)
    return float(np.sqrt(np.mean((agent.predict(z) - env.f(z)) ** 2)))


def test_private_error_shrinks_as_epsilon_grows():
    errs = {e: np.mean([_private_error(e, s) for s in range(4)]) for e in (0.5, 2.0, math.inf)}
    assert errs[math.inf] < errs[2.0] < errs[0.5]
    base = np.mean([_private_error(2.0, s, "ridge") for s in range(4)])
    assert errs[2.0] < base  # the low-sensitivity estimator beats output perturbation at the same eps


def test_private_agent_queries_are_data_independent_and_spend_once():
    arms = Arms.grid(0, 1, 5)
    k = rbf(0.3)
    a1 = PrivateKernelBandit(arms, k, 20, epsilon=1.0, seed=7)
    a2 = PrivateKernelBandit(arms, k, 20, epsilon=1.0, seed=7)
    rng = np.random.default_rng(0)
    acts1, acts2 = [], []
    for _ in range(20):
        assert a1.privacy_spent() == (0.0, 0.0)
        c1, c2 = rng.uniform(0, 1, 1), rng.uniform(0, 1, 1)  # different contexts and rewards
        acts1.append(a1.act(c1))
        acts2.append(a2.act(c2))
        a1.update(c1, acts1[-1], 1.0)
        a2.update(c2, acts2[-1], -1.0)
    assert acts1 == acts2  # the exploration queries do not depend on the data
    assert a1.privacy_spent() == (1.0, 1e-5)
    z = np.array([[0.5, 0.5]])
    before = a1.predict(z)
    a1.update(np.array([0.5]), 0, 100.0)  # after the release nothing is read
    assert a1.predict(z) == before and a1.privacy_spent() == (1.0, 1e-5)


@pytest.mark.parametrize("kind", ["reward", "context"])
def test_audit_passes_correct_mechanism_and_catches_broken_one(kind):
    k = rbf(0.2)
    arms = Arms.grid(0, 1, 4)
    marks = landmarks(arms, 0.0, 1.0, 8, np.random.default_rng(0))
    phi = nystrom_features(k, marks)
    good = CovarianceEstimator(phi, 8, epsilon=1.0, delta=1e-5)
    bad = CovarianceEstimator(phi, 8, epsilon=1.0, delta=1e-5, noise_multiplier=0.3)
    data = worst_case_neighbours(good, marks, n=40, kind=kind)
    ok = audit(good, *data, n_draws=40000, seed=1)
    broken = audit(bad, *data, n_draws=40000, seed=1)
    assert 0.0 < ok.epsilon_lower <= 1.0
    assert broken.epsilon_lower > 1.0
