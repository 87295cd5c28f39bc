"""Gumbel-softmax reward fine-tuning of token generators (DiffRO 2025).

DiffRO scores generated tokens with a differentiable token-level reward model and makes the
reward differentiable with respect to the generator through Gumbel-softmax relaxations of the
sampled tokens (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax";
Maddison et al. 2017, "The Concrete Distribution"). At every sampled position, with logits l
and Gumbel noise g, the drawn token is one_hot(argmax(l + g)), an exact draw from softmax(l),
and its relaxation is softmax((l + g) / tau). Two estimators (``gumbel_estimator``):

- ``relaxed`` (default): the reward reads the relaxations [B, L, V]; the generator reads back
  the drawn tokens, without gradient. The gradient is exact for the relaxed objective
  E_g[r(softmax((l + g) / tau))], which tends to the true one as tau -> 0, and each position's
  gradient acts on its own distribution only.
- ``straight-through``: the reward reads the drawn one-hot tokens, with the relaxation's
  gradient (forward one_hot, backward d softmax((l + g) / tau) / dl), and the generator reads
  them back with that gradient, so that it flows into every later position.

Measured on the molecules world (benchmarks/RESULTS.md): a step along the straight-through
gradient lowered the expected reward on QED, while the relaxed estimator raised it; both
rose on logP, a sum of atom contributions. A multi-token chain of SELFIES symbols, whose
meaning depends on what precedes them, is where the straight-through linearization fails.
Either way the reward model's gradient must predict what a token swap does: see
:mod:`rewardiff.worlds.molecules.reward_model` for how the shipped one is trained for that.

One training step of the method ``gumbel``:

1. Autoregressive models (:class:`~rewardiff.models.tokens.TokenModel`): sample L tokens as
   above. Masked diffusion models (``molecules``): run the unmasking chain through the one
   rollout (:func:`rewardiff.rollout.rollout` with a relaxed or straight-through ``draw``),
   each step's tokens drawn from the step's transition probabilities the same way, the net
   reading the chain's token probabilities (:class:`SoftTokenInputs`); only the last K
   (``k``) steps carry gradient.
2. Score the whole sequence [B, L, V] with the differentiable reward (``chem-rm``, ...).
3. Penalty to the frozen base model: per-token KL(p_theta || p_base) of the next-token
   distributions along the drawn sequence, summed over positions, both models reading the
   drawn tokens (detached) in one teacher-forced pass (masked diffusion: the KL of each
   gradient step's transition probabilities, summed over positions and steps, which the
   rollout takes from ``MaskedProcess.divergence``).
4. Minimize -mean(r) + kl_weight * mean(KL).

Dropout is off while sampling (the net is put in eval mode): the tokens scored are those of
the network being trained, and a resumed run repeats the uninterrupted one bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.categorical import RELAXATIONS, relaxed_gumbel, straight_through_gumbel
from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.models.tokens import Pick, TokenModel
from rewardiff.rollout import last_k, rollout
from rewardiff.types import AUTOREGRESSIVE, CHAIN, TOKENS, Draw, LossOut, Reward, Trajectory, missing

ESTIMATORS = RELAXATIONS  # the values of gumbel_estimator


def straight_through_pick(tau: float) -> Pick:
    """The token pick of :meth:`TokenModel.sample` with the straight-through gradient at temperature ``tau``."""
    return lambda logits, g: straight_through_gumbel(logits, g, tau)


def relaxed_pick(tau: float) -> Pick:
    """The token pick of :meth:`TokenModel.sample` that returns the relaxation at temperature ``tau``."""
    return lambda logits, g: relaxed_gumbel(logits, g, tau)


def hard(tokens: Tensor) -> Tensor:
    """One-hot rows [..., V] of the argmax of token rows (drawn tokens from their relaxations), no gradient."""
    return F.one_hot(tokens.detach().argmax(-1), tokens.shape[-1]).to(tokens.dtype)


def categorical_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the last axis. [..., V], [..., V] -> [...]"""
    logp, logq = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _check(cfg: FinetuneConfig) -> None:
    if not cfg.gumbel_tau > 0:
        raise UserError(f"config field 'gumbel_tau' must be positive, got {cfg.gumbel_tau}")
    if cfg.gumbel_estimator not in ESTIMATORS:
        raise UserError(f"config field 'gumbel_estimator' must be one of {', '.join(ESTIMATORS)}; got {cfg.gumbel_estimator!r}")


# ----------------------------------------------------------------------------- autoregressive models


def token_kl(model: TokenModel, tokens: Tensor, alive: Tensor) -> Tensor:
    """Per-sequence KL to the base model [B]: per-token KL of the next-token distributions along
    ``tokens`` [B, L, V], summed over the positions where a token was drawn (``alive`` [B, L]).

    Both models read the drawn tokens (the argmax of each row, detached) in one teacher-forced
    pass, so the KL is exactly 0 while the weights are the base model's; its gradient reaches
    the generator's weights.
    """
    if model.reference is None:
        return torch.zeros(tokens.shape[0], device=tokens.device)
    tokens = hard(tokens)
    with torch.no_grad():
        ref = model.teacher_forced_logits(model.reference, tokens)  # [B, L, V]
    return (categorical_kl(model.teacher_forced_logits(model.net, tokens), ref) * alive).sum(1)


def autoregressive_loss(model: TokenModel, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig) -> LossOut:
    """Steps 1-4 of the module doc for an autoregressive model."""
    relaxed = cfg.gumbel_estimator == "relaxed"
    pick = (relaxed_pick if relaxed else straight_through_pick)(cfg.gumbel_tau)
    s = model.sample(seeds, pick, drawn_back=relaxed)  # 1. tokens [B, L, V]
    r = reward_fn(s.tokens, prompts)  # 2.
    kl = token_kl(model, s.tokens, s.alive) if cfg.kl_weight > 0 else torch.zeros_like(r)  # 3.
    loss = -r.mean() + cfg.kl_weight * kl.mean()  # 4.
    B, L = s.alive.shape
    nfe = B * L * (3 if cfg.kl_weight > 0 and model.reference is not None else 1)  # positions the nets read
    return LossOut(loss, r.detach(), kl.detach(), nfe, 0)


# ----------------------------------------------------------------------------- masked diffusion


def input_embedding(net: nn.Module, vocab_size: int) -> nn.Embedding:
    """The net's token embedding: its first ``nn.Embedding`` with ``vocab_size`` rows."""
    for m in net.modules():
        if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size:
            return m
    raise UserError(f"method 'gumbel' needs a token embedding of {vocab_size} rows in the denoiser; none found")


@contextmanager
def soft_inputs(embedding: nn.Embedding, probs: Tensor) -> Iterator[None]:
    """While active, ``embedding`` returns ``probs @ weight`` [B, L, D] for its (argmax) ids: the
    same values for one-hot rows, with the gradient of the relaxation flowing into ``probs``."""
    handle = embedding.register_forward_hook(lambda mod, inp, out: probs.to(mod.weight.dtype) @ mod.weight)
    try:
        yield
    finally:
        handle.remove()


class SoftTokenInputs:
    """A token denoiser ``net(ids, t, cond)`` that also reads token probabilities [B, L, V].

    Ids [B, L] go to the net unchanged. Probabilities are read as their argmax ids with the
    token embedding returning ``probs @ weight`` (:func:`soft_inputs`): the forward values of
    the ids for one-hot rows, with the gradient flowing into the probabilities; with
    ``drawn`` the net reads only the drawn ids, without gradient (the relaxed estimator).
    """

    def __init__(self, net: nn.Module, vocab_size: int, drawn: bool = False):
        self.net, self.drawn = net, drawn
        self.embedding = input_embedding(net, vocab_size)

    def __call__(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        if not x.is_floating_point():
            return self.net(x, t, cond)
        ids = x.argmax(-1)  # [B, L]
        if self.drawn:
            return self.net(ids, t, cond)
        with soft_inputs(self.embedding, x):
            return self.net(ids, t, cond)


def masked_chain(model, seeds: list[int], cfg: FinetuneConfig, k: int, kl: bool) -> Trajectory:
    """Step 1 for a masked diffusion model (a DiffusionModel with a MaskedProcess): its unmasking
    chain through the rollout with the ``gumbel_estimator`` draw; gradient through the last
    ``k`` steps, and on those the transition KL to the base model when ``kl``.

    ``x0`` [B, L, V] is what the reward reads (relaxations, or straight-through one-hot rows);
    its argmax is the tokens of ``model.sample`` with the same seeds (up to float rounding:
    PyTorch's transformer layers compute a little differently with gradient).
    """
    V, T = model.process.vocab_size, cfg.num_inference_steps
    drawn = cfg.gumbel_estimator == "relaxed"
    ref = SoftTokenInputs(model.reference, V, drawn) if kl and model.reference is not None else None
    x_T = F.one_hot(model.noise(seeds), V).float()  # [B, L, V], every token masked
    return rollout(
        SoftTokenInputs(model.net, V, drawn), model.process, x_T, model.encode([""] * len(seeds)), model.process.timesteps(T),
        grad_steps=last_k(T, k), checkpoint=False, reference=ref, generator=model.step_generators(seeds),
        draw=Draw(cfg.gumbel_estimator, cfg.gumbel_tau),
    )


def masked_loss(model, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig) -> LossOut:
    """Steps 1-4 of the module doc for a masked diffusion model."""
    T = cfg.num_inference_steps
    k = min(max(cfg.k, 1), T)
    traj = masked_chain(model, seeds, cfg, k, kl=cfg.kl_weight > 0)
    r = reward_fn(traj.x0, prompts)
    return LossOut(-r.mean() + cfg.kl_weight * traj.kl.mean(), r.detach(), traj.kl.detach(), traj.nfe, T - k)


# ----------------------------------------------------------------------------- the method


def gumbel(model, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig, gen: torch.Generator) -> LossOut:
    """The method ``gumbel``: one loss on a batch (see the module doc)."""
    _check(cfg)
    model.net.eval()  # no dropout: see the module doc
    if AUTOREGRESSIVE in model.capabilities:
        return autoregressive_loss(model, reward_fn, prompts, seeds, cfg)
    if not missing(model, (CHAIN, TOKENS)):
        return masked_loss(model, reward_fn, prompts, seeds, cfg)
    raise UserError("method 'gumbel' samples tokens: use a token model (molecules-ar, hf:PATH or molecules)")


@torch.no_grad()
def kl_to_base_tokens(model, seeds: list[int], cfg: FinetuneConfig, batch_size: int = 64, progress=None) -> Tensor:
    """Per-sample KL of the model's sequences to the base model's [N], on the model's own samples:
    the sum of per-token KLs (autoregressive) or of every step's transition KL (masked)."""
    if model.reference is None:
        return torch.zeros(len(seeds))
    out = []
    for i in range(0, len(seeds), batch_size):
        s = seeds[i : i + batch_size]
        if AUTOREGRESSIVE in model.capabilities:
            smp = model.sample(s)
            out.append(token_kl(model, smp.tokens, smp.alive).cpu())
        else:
            T = cfg.num_inference_steps
            out.append(model.sample([""] * len(s), s, T, grad_steps=range(T), checkpoint=False, kl=True).kl.cpu())
        if progress is not None:
            progress(len(s))
    return torch.cat(out)
