"""Categorical draws by the Gumbel-max trick, and their Gumbel-softmax relaxations.

With logits l = log p and standard Gumbel noise g = -log(-log u), u uniform in [0, 1):

    (1)  argmax(l + g)            an exact draw from p (the Gumbel-max trick);
    (2)  softmax((l + g) / tau)   its relaxation (Jang et al. 2017, "Categorical
                                  Reparameterization with Gumbel-Softmax"; Maddison et al.
                                  2017, "The Concrete Distribution"), whose argmax is (1);
    (3)  one_hot(1) + (2) - stop_gradient(2)
                                  the straight-through estimator: the value of (1), the
                                  gradient of (2) (Jang et al. 2017, section 2.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

TINY = torch.finfo(torch.float32).tiny


def gumbel_noise(u: Tensor) -> Tensor:
    """Standard Gumbel noise g = -log(-log u) [...] (float32) from uniform numbers ``u`` [...]."""
    return -(-u.float().clamp(min=TINY).log()).log()


def gumbel_max(logits: Tensor, g: Tensor) -> Tensor:
    """Eq. 1: the drawn category argmax(logits + g). [..., V], [..., V] -> long [...]"""
    return (logits + g).argmax(-1)


def relaxed_gumbel(logits: Tensor, g: Tensor, tau: float) -> Tensor:
    """Eq. 2: the Gumbel-softmax relaxation softmax((logits + g) / tau) [..., V]: its argmax is the drawn token."""
    return ((logits + g) / tau).softmax(-1)


def straight_through_gumbel(logits: Tensor, g: Tensor, tau: float) -> Tensor:
    """Eq. 3: straight-through Gumbel-softmax sample [..., V] of ``logits`` with Gumbel noise ``g``.

    The forward value is the exact one-hot of argmax(logits + g); the gradient is that of
    the relaxation softmax((logits + g) / tau).
    """
    z = (logits + g) / tau
    soft = z.softmax(-1)
    hard = F.one_hot(z.argmax(-1), logits.shape[-1]).to(soft.dtype)
    return hard + (soft - soft.detach())  # soft - soft.detach() is exactly 0 in the forward pass


RELAXATIONS = {"relaxed": relaxed_gumbel, "straight-through": straight_through_gumbel}


def probs_kl(p: Tensor, q: Tensor) -> Tensor:
    """KL(p || q) of probability vectors over the last axis (0 log 0 = 0). [..., V] -> [...]"""
    return (p * (p.clamp(min=TINY).log() - q.clamp(min=TINY).log())).sum(-1)


__all__ = ["TINY", "gumbel_noise", "gumbel_max", "relaxed_gumbel", "straight_through_gumbel", "RELAXATIONS", "probs_kl"]
