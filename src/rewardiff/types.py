"""Shared contracts: the protocols every model, reward and guidance method implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple, Protocol, runtime_checkable

from torch import Tensor

Timestep = int | float
"""A training timestep: an int for the Gaussian and masked processes (an index into the schedule;
-1 is the clean sample), a float N sigma for the flow process (0.0 is the clean sample). The
rollout and the methods never compute with one: they take them from ``timesteps`` and
``prev_timesteps`` and hand them back to the process, the denoiser and value models."""


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
        timesteps: the T training timesteps visited, in sampling order (:data:`Timestep`).
        nfe: denoiser evaluations spent, counted per batch element (CFG counts 2).
        kl: sum over gradient-window steps of the process's divergence between the model's
            and the reference model's outputs [B] (``Process.divergence``: the per-sample mean
            squared distance of the outputs for the Gaussian process, the KL of the transition
            probabilities summed over positions for the masked one; zeros without a reference).
    """

    x0: Tensor
    xs: list[Tensor]
    log_probs: Tensor
    timesteps: list[Timestep]
    nfe: int
    kl: Tensor


class LossOut(NamedTuple):
    """One fine-tuning method's loss on one batch (what every training method returns).

    Fields:
        loss: scalar to minimize.
        reward: rewards of the samples the gradient reads [B'] (detached).
        kl: per-sample penalty to the base model [B'] (detached; zeros without one).
        nfe: denoiser evaluations spent, per the whole batch.
        grad_from: index of the first step that carried gradient.
        step: take an optimizer step after this loss's backward pass; False accumulates its
            gradient into the next one (methods that yield one loss per timestep).
        extra: further per-update metrics of the method (means over the batch), or None.
        queries: reward evaluations (samples scored) this loss cost; None means one per
            row of ``reward``.
    """

    loss: Tensor
    reward: Tensor
    kl: Tensor
    nfe: int
    grad_from: int
    step: bool = True
    extra: dict[str, float] | None = None
    queries: int | None = None


@runtime_checkable
class Denoiser(Protocol):
    """A network predicting the process's target (epsilon, v, x0 or the flow velocity) from
    (x_t, t, cond); ``t`` [B] is long for integer timesteps, float32 for float ones."""

    def __call__(self, x_t: Tensor, t: Tensor, cond: Any) -> Tensor: ...


@runtime_checkable
class Process(Protocol):
    """The diffusion math the rollout and ``DiffusionModel`` drive: what they call of a process,
    and nothing more.

    :class:`~rewardiff.processes.gaussian.GaussianProcess` (DDPM/DDIM on continuous states),
    :class:`~rewardiff.processes.flow.FlowProcess` (rectified flow: Euler ODE, SDE, CPS) and
    :class:`~rewardiff.processes.masked.MaskedProcess` (absorbing-state diffusion on token ids)
    fit it; ``t`` and ``t_prev`` are training timesteps (:data:`Timestep`), which callers take
    from ``timesteps`` and ``prev_timesteps`` and never compute themselves.
    """

    def timesteps(self, n: int) -> list[Timestep]:
        """The n timesteps of an n-step sampler, in sampling order (the noisiest first)."""
        ...

    def prev_timesteps(self, ts: list[Timestep]) -> list[Timestep]:
        """The timestep after each step of ``ts``: the next one, and the clean sample's after the last."""
        ...

    def prior(self, shape: tuple[int, ...], generator: Any = None) -> Tensor:
        """x_T for one sample of ``shape``."""
        ...

    def is_stochastic(self, eta: float) -> bool:
        """Whether a step with this eta draws randomness (then ``noise_like`` supplies it)."""
        ...

    def noise_like(self, x: Tensor, generator: Any = None) -> Tensor:
        """One step's randomness for states ``x`` [B, ...] (a torch.Generator or None)."""
        ...

    def step(self, model_out: Tensor, t: Timestep, t_prev: Timestep, x_t: Tensor, eta: float = ..., noise: Tensor | None = None) -> StepOut:
        """One reverse step x_t -> x_{t_prev} from the denoiser's output at (x_t, t)."""
        ...

    def split(self, model_out: Tensor, x_t: Tensor, t: Timestep | Tensor) -> tuple[Tensor, Tensor | None]:
        """(x0_hat, the noise estimate or None) from the denoiser's output at (x_t, t)."""
        ...

    def log_prob(self, x: Tensor, mean: Tensor, std: Tensor) -> Tensor:
        """log p(x | x_t) [B] of states ``x`` [B, ...] under a step's ``mean`` and ``std``."""
        ...

    def divergence(self, model_out: Tensor, ref_out: Tensor, x_t: Tensor, t: Timestep, t_prev: Timestep) -> Tensor:
        """The per-sample penalty [B] between the model's and a reference model's outputs at (x_t, t)."""
        ...


@runtime_checkable
class ContinuousProcess(Process, Protocol):
    """A process over continuous states with Gaussian steps (a :data:`GAUSSIAN` model's):
    :class:`~rewardiff.processes.gaussian.GaussianProcess` and
    :class:`~rewardiff.processes.flow.FlowProcess`. What the methods beyond the rollout use
    (re-noising, KL diagnostics, look-ahead checks), so that none of them branches on the kind.
    """

    def add_noise(self, x0: Tensor, noise: Tensor, t: Timestep | Tensor) -> Tensor:
        """The forward process: x_t of clean ``x0`` and standard normal ``noise`` at t ([B] or scalar)."""
        ...

    def target(self, x0: Tensor, noise: Tensor, t: Timestep | Tensor) -> Tensor:
        """The denoiser's regression target at (x0, noise, t)."""
        ...

    def step_std(self, t: Timestep, t_prev: Timestep, eta: float) -> Tensor:
        """The standard deviation of the step t -> t_prev at ``eta``, a scalar tensor (0: deterministic)."""
        ...

    def snr(self, t: Timestep | Tensor) -> Tensor:
        """The signal-to-noise ratio of x_t: (coefficient of x0)^2 / (variance of the noise)."""
        ...

    def at_fraction(self, tau: Tensor) -> Tensor:
        """The timesteps at fractions ``tau`` in [0, 1] of the way from clean to pure noise."""
        ...


class Draw(NamedTuple):
    """How the rollout picks a categorical step's tokens (its ``draw`` argument).

    Fields:
        kind: ``hard`` (the process's own draw: token ids, no gradient through the choice),
            ``relaxed`` (the Gumbel-softmax relaxation softmax((log p + g) / tau) [B, L, V]) or
            ``straight-through`` (the drawn one-hot [B, L, V] with the relaxation's gradient);
            every kind picks the same tokens from the same noise.
        tau: the relaxation's temperature (unused by ``hard``).
    """

    kind: Literal["hard", "relaxed", "straight-through"] = "hard"
    tau: float = 1.0


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


Predict = Callable[[Tensor, Timestep, "Tensor | None"], "tuple[Tensor, Tensor]"]


class StepContext(NamedTuple):
    """What a guidance hook sees at one step of the rollout.

    Fields:
        index: step number in sampling order, 0 .. T-1.
        t: training timestep of x_t; t_prev the one of x_{t-1} (the process's clean timestep
            after the last step: -1 for the Gaussian and masked processes, 0.0 for flow).
        x_t: the current particles [B, ...] (B can change between steps when hooks select).
        out: the unguided step's result.
        cond: the model condition of these B particles.
        prompts: the prompts of these B particles.
        predict: ``predict(x [N, ...], t, rows [N] | None) -> (model_out, x0_hat)``: the
            (classifier-free guided) denoiser at any states, each row using the condition of
            particle ``rows[n]`` (None: row n uses particle n). Its evaluations are counted in
            the rollout's NFE, so look-ahead costs are never missed.
        noise: this step's random draw, as the process's ``noise_like`` makes it (standard
            normal [B, ...] for the Gaussian process, uniform [B, L, V] for the masked one;
            None when the step is deterministic).
        num_steps: T, the number of steps of the rollout.
    """

    index: int
    t: Timestep
    t_prev: Timestep
    x_t: Tensor
    out: StepOut
    cond: Any
    prompts: list[str]
    predict: Predict | None = None
    noise: Tensor | None = None
    num_steps: int = 0


class Selection(NamedTuple):
    """A hook's answer that replaces the particle set after a step.

    Fields:
        prev: the new particles x_{t-1} [B', ...] (B' may differ from B).
        parents: long [B'], the particle of x_t each new one descends from: its condition,
            prompt, noise stream and history follow it.
        model_out: the denoiser output at (prev, t_prev) when the hook already computed it
            (the next step reuses it instead of evaluating again), else None.
    """

    prev: Tensor
    parents: Tensor
    model_out: Tensor | None = None


class StepHook(Protocol):
    """Called by the rollout after each step; may return a replacement for ``out.prev``
    (same batch) or a :class:`Selection` (a new particle set).

    ``nfe`` reports denoiser evaluations the hook spent outside ``ctx.predict`` (counted over
    batch elements); a hook with ``needs_grad = True`` gets ``ctx.x_t`` with
    ``requires_grad`` and ``ctx.out`` built with autograd (for gradient guidance).
    """

    nfe: int

    def __call__(self, ctx: StepContext) -> Tensor | Selection | None: ...


class Evaluation(NamedTuple):
    """What a world's evaluation hook (``rewardiff.plugins.EVALUATIONS``) reads in a set of samples.

    Fields:
        metrics: judge measures, means over the samples (``judge_count``, ``validity``, ...).
        labels: one short label a sample for the evaluation grid ("ok" / "x", "QED 0.61"), or None.
    """

    metrics: dict[str, float]
    labels: list[str] | None = None


# What a generator offers; methods declare which of these they need (``requires``), and the
# check that refuses a method on a model reads those declarations, never class names.
CHAIN = "chain"  # sampled by a reverse diffusion chain through the rollout (guidance hooks, grad windows)
GAUSSIAN = "gaussian"  # continuous states with Gaussian steps, a ContinuousProcess (eta, re-noising, image rewards)
TOKENS = "tokens"  # outputs are token sequences over a vocabulary (relaxed tokens for differentiable rewards)
AUTOREGRESSIVE = "autoregressive"  # sampled token by token, left to right (no chain to steer)


@runtime_checkable
class Generator(Protocol):
    """A model that every method of rewardiff takes: diffusion models over images, latents or
    tokens (:class:`~rewardiff.models.base.DiffusionModel`), autoregressive token models and
    Hugging Face causal LMs (:class:`~rewardiff.models.tokens.TokenModel`).

    Attributes:
        name: a short label for reports.
        world: the embedded world whose hooks (evaluation, text grids) apply, or None.
        conditional: whether prompts condition it (False: every prompt is "").
        capabilities: what it offers (:data:`CHAIN`, :data:`GAUSSIAN`, :data:`TOKENS`,
            :data:`AUTOREGRESSIVE`), read by the methods' ``requires``.
        net: the trainable network.
        reference: the frozen base model for a KL, once attached (None before).
        lora_targets: what LoRA adapts in a net without a diffusers backbone (``.unet``, SD3's
            ``.transformer``; None: not supported).
        texts: outputs -> one string each for models of text outputs (token ids), else None.
    """

    name: str
    world: str | None
    conditional: bool
    capabilities: frozenset[str]
    net: Any
    reference: Any
    lora_targets: list[str] | None
    texts: Callable[[Tensor], list[str]] | None

    @property
    def device(self) -> Any: ...

    def encode(self, prompts: list[str]) -> Any:
        """Prompts -> the net's condition (zeros [B, 1] for an unconditional model)."""
        ...

    def generate(self, prompts: list[str], seeds: list[int], batch_size: int = 64, **kwargs: Any) -> Tensor:
        """Outputs in the reward's space, one per (prompt, seed), without gradient: images [N, C, H, W]
        in [-1, 1] or token ids [N, L]."""
        ...


def missing(model: Any, requires: frozenset[str] | set[str] | tuple[str, ...]) -> list[str]:
    """The capabilities in ``requires`` that ``model`` lacks, in a fixed order."""
    have = getattr(model, "capabilities", frozenset())
    return [c for c in (CHAIN, GAUSSIAN, TOKENS, AUTOREGRESSIVE) if c in requires and c not in have]


@runtime_checkable
class ValueFn(Protocol):
    """A learned soft value ``v(x_t, t, cond) -> Tensor[B]``: the expected final reward from x_t.

    ``x_t`` is a noisy state in the denoiser's space [B, ...], ``t`` its training timestep
    (one for the batch), ``cond`` the model condition of those B rows (what
    ``DiffusionModel.encode`` returns). Used by SVDD-MC and SMC.
    """

    def __call__(self, x_t: Tensor, t: Timestep, cond: Any) -> Tensor: ...


__all__ = ["Timestep", "StepOut", "Trajectory", "LossOut", "Draw", "Denoiser", "Process", "ContinuousProcess", "Reward", "ValueFn", "StepContext", "Selection",
           "StepHook", "Predict", "Evaluation", "Generator", "missing", "CHAIN", "GAUSSIAN", "TOKENS", "AUTOREGRESSIVE"]
