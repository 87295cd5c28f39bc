"""Gumbel-softmax reward fine-tuning of token generators (DiffRO 2025).

DiffRO scores generated tokens with a differentiable token-level reward model and makes the
reward differentiable with respect to the generator by feeding it Gumbel-softmax relaxations
of the sampled tokens (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax";
Maddison et al. 2017, "The Concrete Distribution"). Straight-through estimator, at every
sampled position with logits l and Gumbel noise g:

    forward:  y = one_hot(argmax(l + g))                (an exact draw from softmax(l))
    backward: dy/dl = d softmax((l + g) / tau) / dl     (the relaxation's gradient)

One training step of the method ``gumbel``:

1. Autoregressive models (:class:`~rewardiff.models.tokens.TokenModel`): sample L tokens;
   each straight-through one-hot is fed back as the next input embedding (``y @ E``), so
   the relaxed gradient of a token flows into every later position.
   Masked diffusion models (``molecules``): run the unmasking chain, each step's tokens drawn
   with the straight-through estimator from the step's transition probabilities and fed
   back as probabilities; only the last K (``k``) steps carry gradient.
2. Score the whole sequence [B, L, V] with the differentiable reward (``chem-rm``, ...).
3. Penalty to the frozen base model: per-token KL(p_theta || p_base) of the next-token
   distributions along the sampled sequence, summed over positions, both models reading the
   (detached) sampled tokens in one teacher-forced pass (masked diffusion: the KL of each
   gradient step's transition probabilities, summed over positions and steps).
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

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig
from rewardiff.finetune.draft import LossOut
from rewardiff.finetune.methods import is_token_diffusion
from rewardiff.models.tokens import Pick, TokenModel
from rewardiff.types import Reward

TINY = torch.finfo(torch.float32).tiny


def straight_through_gumbel(logits: Tensor, g: Tensor, tau: float) -> Tensor:
    """Straight-through Gumbel-softmax sample [..., V] of ``logits`` with Gumbel noise ``g``.

    The forward value is the exact one-hot of argmax(logits + g); the gradient is that of
    the relaxation softmax((logits + g) / tau) (Jang et al. 2017, section 2.2).
    """
    z = (logits + g) / tau
    soft = z.softmax(-1)
    hard = F.one_hot(z.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # soft - soft.detach() is exactly 0 in the forward pass


def straight_through_pick(tau: float) -> Pick:
    """The token pick of :meth:`TokenModel.sample` with the straight-through gradient at temperature ``tau``."""
    return lambda logits, g: straight_through_gumbel(logits, g, tau)


def categorical_kl(logits: Tensor, ref_logits: Tensor) -> Tensor:
    """KL(softmax(logits) || softmax(ref_logits)) over the last axis. [..., V], [..., V] -> [...]"""
    logp, logq = logits.float().log_softmax(-1), ref_logits.float().log_softmax(-1)
    return (logp.exp() * (logp - logq)).sum(-1)


def probs_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) of probability vectors over the last axis (0 log 0 = 0). [..., V] -> [...]"""
    return (p * (p.clamp(min=TINY).log() - q.clamp(min=TINY).log())).sum(-1)


def _check(cfg: FinetuneConfig) -> None:
    if not cfg.gumbel_tau > 0:
        raise UserError(f"config field 'gumbel_tau' must be positive, got {cfg.gumbel_tau}")


# ----------------------------------------------------------------------------- autoregressive models


def token_kl(model: TokenModel, tokens: Tensor, alive: Tensor) -> Tensor:
    """Per-sequence KL to the base model [B]: per-token KL of the next-token distributions along
    ``tokens`` [B, L, V], summed over the positions where a token was drawn (``alive`` [B, L]).

    Both models read the (detached) tokens in one teacher-forced pass, so the KL is exactly 0
    while the weights are the base model's; its gradient reaches the generator's weights.
    """
    if model.reference is None:
        return torch.zeros(tokens.shape[0], device=tokens.device)
    tokens = tokens.detach()
    with torch.no_grad():
        ref = model.teacher_forced_logits(model.reference, tokens)  # [B, L, V]
    return (categorical_kl(model.teacher_forced_logits(model.net, tokens), ref) * alive).sum(1)


def autoregressive_loss(model: TokenModel, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig) -> LossOut:
    """Steps 1-4 of the module doc for an autoregressive model."""
    s = model.sample(seeds, straight_through_pick(cfg.gumbel_tau))  # 1. tokens [B, L, V]
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


def _transition(model, net, x: Tensor, t: int, t_prev: int, cond: Tensor) -> Tensor:
    """The unmasking step's transition probabilities [B, L, V] from token probabilities ``x`` [B, L, V]."""
    ids = x.argmax(-1)
    with soft_inputs(input_embedding(net, x.shape[-1]), x):
        out = net(ids, torch.full((ids.shape[0],), t, device=ids.device), cond)
    unused = torch.ones(*ids.shape, x.shape[-1], device=x.device)  # the step's own draw is not used: the caller draws
    return model.process.step(out, t, t_prev, ids, 1.0, unused).mean


def masked_sample(model, seeds: list[int], cfg: FinetuneConfig, k: int, kl: bool) -> tuple[Tensor, Tensor, int]:
    """The masked chain of ``model`` (a DiffusionModel with a MaskedProcess) with straight-through
    draws; gradient through the last ``k`` steps. Returns (tokens [B, L, V], KL [B], NFE).

    The forward pass draws the tokens of ``model.sample`` with the same seeds (up to float
    rounding: PyTorch's transformer layers compute a little differently with gradient).
    """
    proc, V = model.process, model.process.vocab_size
    ts = proc.timesteps(cfg.num_inference_steps)
    gens = model.step_generators(seeds)
    x = F.one_hot(model.noise(seeds), V).float()  # x_T: all mask
    cond = model.encode([""] * len(seeds))
    total = torch.zeros(len(seeds), device=x.device)
    nfe = 0
    for j, (t, t_prev) in enumerate(zip(ts, proc.prev_timesteps(ts))):
        u = torch.cat([proc.noise_like(x[i : i + 1, :, 0], g) for i, g in enumerate(gens)]).to(x.device)
        with torch.set_grad_enabled(j >= len(ts) - k and torch.is_grad_enabled()):
            mean = _transition(model, model.net, x, t, t_prev, cond)
            g = -(-u.clamp(min=TINY).log()).log()  # the Gumbel noise of process.draw
            y = straight_through_gumbel(mean.clamp(min=TINY).log(), g, cfg.gumbel_tau)  # the draw of model.sample
            if kl and model.reference is not None and j >= len(ts) - k:
                with torch.no_grad():
                    ref_mean = _transition(model, model.reference, x.detach(), t, t_prev, cond)
                total = total + probs_kl(mean, ref_mean).sum(1)
                nfe += len(seeds)
            masked = (x.argmax(-1) == proc.mask_id).unsqueeze(-1)
            x = torch.where(masked, y, x)  # carry-over keeps the earlier draws (and their gradient)
        nfe += len(seeds)
    return x, total, nfe


def masked_loss(model, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig) -> LossOut:
    """Steps 1-4 of the module doc for a masked diffusion model."""
    T = cfg.num_inference_steps
    k = min(max(cfg.k, 1), T)
    tokens, kl, nfe = masked_sample(model, seeds, cfg, k, kl=cfg.kl_weight > 0)
    r = reward_fn(tokens, prompts)
    return LossOut(-r.mean() + cfg.kl_weight * kl.mean(), r.detach(), kl.detach(), nfe, T - k)


# ----------------------------------------------------------------------------- the method


def gumbel(model, reward_fn: Reward, prompts: list[str], seeds: list[int], cfg: FinetuneConfig, gen: torch.Generator) -> LossOut:
    """The method ``gumbel``: one loss on a batch (see the module doc)."""
    _check(cfg)
    model.net.eval()  # no dropout: see the module doc
    if isinstance(model, TokenModel):
        return autoregressive_loss(model, reward_fn, prompts, seeds, cfg)
    if is_token_diffusion(model):
        return masked_loss(model, reward_fn, prompts, seeds, cfg)
    raise UserError("method 'gumbel' samples tokens: use a token model (molecules-ar, hf:PATH or molecules)")


@torch.no_grad()
def kl_to_base_tokens(model, seeds: list[int], cfg: FinetuneConfig, batch_size: int = 64) -> Tensor:
    """Per-sample KL of the model's sequences to the base model's [N], on the model's own samples:
    the sum of per-token KLs (autoregressive) or of every step's transition KL (masked)."""
    if model.reference is None:
        return torch.zeros(len(seeds))
    out = []
    for i in range(0, len(seeds), batch_size):
        s = seeds[i : i + batch_size]
        if isinstance(model, TokenModel):
            smp = model.sample(s)
            out.append(token_kl(model, smp.tokens, smp.alive).cpu())
        else:
            out.append(masked_sample(model, s, cfg, cfg.num_inference_steps, kl=True)[1].cpu())
    return torch.cat(out)
