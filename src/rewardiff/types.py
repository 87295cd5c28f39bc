"""Shared contracts: the protocols every model, reward and guidance method implements."""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from torch import Tensor


class StepOut(NamedTuple):
    """One reverse step x_t -> x_{t-1} of a diffusion process.

    Fields (B = batch, ... = the sample's own dimensions):
        prev: x_{t-1} [B, ...], the sample after the step.
        x0_hat: the process's estimate of the clean sample from x_t [B, ...].
        mean: mean of the transition p(x_{t-1} | x_t) [B, ...].
        std: standard deviation of the transition, a scalar tensor (0 for deterministic DDIM).
        log_prob: log p(prev | x_t) summed over the sample's dimensions [B];
            zeros when the step is deterministic (std = 0).
    """

    prev: Tensor
    x0_hat: Tensor
    mean: Tensor
    std: Tensor
    log_prob: Tensor


class Trajectory(NamedTuple):
    """The result of one rollout.

    Fields:
        x0: the final sample [B, ...].
        xs: states x_T ... x_0, a list of T + 1 tensors [B, ...] (empty unless kept).
        log_probs: per-step transition log-probabilities [B, T].
        timesteps: the T training timesteps visited, in sampling order.
        nfe: denoiser evaluations spent, counted per batch element (CFG counts 2).
        kl: sum over gradient-window steps of the per-sample mean squared distance between
            the model's and the reference model's outputs [B] (zeros without a reference).
    """

    x0: Tensor
    xs: list[Tensor]
    log_probs: Tensor
    timesteps: list[int]
    nfe: int
    kl: Tensor


@runtime_checkable
class Denoiser(Protocol):
    """A network predicting the process's target (epsilon, v or x0) from (x_t, t, cond)."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...


@runtime_checkable
class Reward(Protocol):
    """``reward(x, prompts) -> Tensor[B]``, higher is better, with metadata.

    Attributes:
        name: registry name.
        differentiable: whether gradients flow from the reward back to ``x``.
        value_range: (low, high) when known, else None.
    """

    name: str
    differentiable: bool
    value_range: tuple[float, float] | None

    def __call__(self, x: Tensor, prompts: list[str]) -> Tensor: ...


class StepContext(NamedTuple):
    """What a guidance hook sees at one step of the rollout.

    Fields:
        index: step number in sampling order, 0 .. T-1.
        t: training timestep of x_t; t_prev the one of x_{t-1} (-1 for the clean sample).
        x_t: the current state [B, ...].
        out: the unguided step's result.
        cond: the model condition for this batch.
        prompts: the prompts of the batch.
    """

    index: int
    t: int
    t_prev: int
    x_t: Tensor
    out: StepOut
    cond: Any
    prompts: list[str]


class StepHook(Protocol):
    """Called by the rollout after each step; may return a replacement for ``out.prev``.

    ``nfe`` reports the extra denoiser evaluations the hook spent (per batch element),
    so that every comparison of guidance methods is at equal compute.
    """

    nfe: int

    def __call__(self, ctx: StepContext) -> Tensor | None: ...


__all__ = ["StepOut", "Trajectory", "Denoiser", "Reward", "StepContext", "StepHook"]
