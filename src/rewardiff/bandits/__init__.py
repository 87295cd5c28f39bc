"""Differentially private kernelized contextual bandits (Pavlovic, Salgia & Zhao, AISTATS 2025).

A self-contained numpy module: kernels, synthetic RKHS environments, agents (GP-UCB, the
private explore-then-release agent and its output-perturbation baseline), the private
estimators with closed-form sensitivities, and an empirical privacy audit. See
:mod:`rewardiff.bandits.agents` for the algorithm, its privacy argument and the deviations
from the paper.
"""

from rewardiff.bandits.agents import GPUCB, PrivateKernelBandit, UniformAgent, landmarks
from rewardiff.bandits.audit import AuditResult, audit, epsilon_lower_bound, worst_case_neighbours
from rewardiff.bandits.environments import Arms, RKHSEnvironment, joint
from rewardiff.bandits.estimators import (
    CovarianceEstimator,
    Release,
    RidgeOutputPerturbation,
    covariance_sensitivity,
    gaussian_delta,
    gaussian_sigma,
    ridge_sensitivity,
)
from rewardiff.bandits.kernels import Kernel, gram, matern, nystrom_features, rbf

__all__ = [
    "Arms", "AuditResult", "CovarianceEstimator", "GPUCB", "Kernel", "PrivateKernelBandit", "RKHSEnvironment",
    "Release", "RidgeOutputPerturbation", "UniformAgent", "audit", "covariance_sensitivity", "epsilon_lower_bound",
    "gaussian_delta", "gaussian_sigma", "gram", "joint", "landmarks", "matern", "nystrom_features", "rbf",
    "ridge_sensitivity", "worst_case_neighbours",
]
