"""TokenModel: an autoregressive token generator ready to sample, fine-tune and evaluate.

What the trainer and the Gumbel-softmax method take for models that emit token sequences
left to right: the molecules world's causal transformer
(:mod:`rewardiff.worlds.molecules.autoregressive`) and Hugging Face causal language models
(:mod:`rewardiff.models.hf`). The net's contract: ``net(x, cache) -> (logits, cache)`` with
``x`` token ids [B, T] or token probabilities [B, T, V] and logits [B, T, V] predicting the
next token at each position.

Sampling (one loop, :meth:`TokenModel.sample`), for positions i = 1 .. L:

1. feed the previous token (the start token ``<mask>`` at i = 1) and read the logits l_i;
   ``<mask>`` is never drawn (its logit is set to ``NEVER``);
2. pick the token from (l_i, g_i), g_i Gumbel noise of the sample's seed: by default the
   one-hot of argmax(l_i + g_i), an exact draw from softmax(l_i) (the Gumbel-max trick);
   Gumbel-softmax fine-tuning picks the same token with a relaxed gradient;
3. ``<pad>`` is absorbing: y_i = e_pad d_{i-1} + (1 - d_{i-1}) y_i with d_{i-1} the pad
   entry of y_{i-1}, so after the first pad every token is pad.

A seed names the same sample in any batch: its noise [L, V] comes from its own generator.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.types import AUTOREGRESSIVE, TOKENS

NEVER = -1e9  # the logit of a token that is never drawn (finite, so 0 * log 0 terms stay 0)

Pick = Callable[[Tensor, Tensor], Tensor]  # (logits [B, V], Gumbel noise [B, V]) -> one-hot [B, V]


class TokenSample(NamedTuple):
    """One batch of sampled sequences.

    Fields:
        tokens: one-hot rows [B, L, V] (relaxed gradients flow through them when the pick has one).
        logits: the next-token logits [B, L, V] at each position (``<mask>`` at ``NEVER``).
        alive: [B, L] 1 where the token was drawn, 0 where it was forced to pad (detached).
    """

    tokens: Tensor
    logits: Tensor
    alive: Tensor


def gumbel(u: Tensor) -> Tensor:
    """Standard Gumbel noise g = -log(-log u) from uniform numbers u in [0, 1)."""
    tiny = torch.finfo(u.dtype).tiny
    return -torch.log(-torch.log(u.clamp(tiny, 1.0 - 1e-7)))


def hard_pick(logits: Tensor, g: Tensor) -> Tensor:
    """The one-hot [B, V] of argmax(logits + g): a draw from softmax(logits) (Gumbel-max)."""
    return F.one_hot((logits + g).argmax(-1), logits.shape[-1]).to(logits.dtype)


class TokenModel:
    """An autoregressive generator of fixed-length token sequences.

    Args:
        net: ``net(x, cache) -> (logits [B, T, V], cache)``, x ids [B, T] or probabilities [B, T, V].
        tokenizer: the molecules tokenizer (V, L, the ``<pad>`` and ``<mask>`` ids, decoding).
        name: a short label for reports.
        lora_targets: names of the net's layers that LoRA adapts.
        world: the embedded world whose hooks apply (the tokenizer's: ``molecules``), or None.
    """

    conditional = False  # unconditional: every prompt is ""
    capabilities = frozenset({TOKENS, AUTOREGRESSIVE})

    def __init__(self, net: nn.Module, tokenizer, name: str, lora_targets: list[str], world: str | None = None):
        self.net, self.tokenizer, self.name, self.lora_targets = net, tokenizer, name, list(lora_targets)
        self.world = world
        self.vocab_size, self.max_len = tokenizer.size, tokenizer.max_len
        self.bos_id, self.pad_id = tokenizer.mask_id, tokenizer.pad_id
        self.reference: nn.Module | Callable | None = None  # the frozen base model, when attached

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    def encode(self, prompts: list[str]) -> Tensor:
        """The (empty) condition of unconditional sampling: zeros [B, 1]."""
        return torch.zeros(len(prompts), 1, device=self.device)

    def texts(self, ids: Tensor) -> list[str]:
        """Canonical SMILES of token ids [B, L] (or one-hot rows [B, L, V])."""
        return self.tokenizer.decode_batch(ids.argmax(-1) if ids.dim() == 3 else ids)

    def noise(self, seeds: list[int]) -> Tensor:
        """Gumbel noise [B, L, V]: one generator per sample, seeded from its seed."""
        us = [torch.rand(self.max_len, self.vocab_size, generator=torch.Generator().manual_seed(int(s) * 7919 + 17)) for s in seeds]
        return gumbel(torch.stack(us)).to(self.device)

    def start(self, batch: int) -> Tensor:
        """The start token's one-hot row [B, 1, V]."""
        return F.one_hot(torch.full((batch, 1), self.bos_id, device=self.device), self.vocab_size).float()

    def _never(self, logits: Tensor) -> Tensor:
        """Logits with the start token ``<mask>`` made impossible."""
        return logits.float().index_fill(-1, torch.tensor([self.bos_id], device=logits.device), NEVER)

    def sample(self, seeds: list[int], pick: Pick = hard_pick, net: nn.Module | None = None, drawn_back: bool = False) -> TokenSample:
        """Sample one sequence per seed with ``net`` (the model's own by default); see the module doc.

        ``drawn_back``: the net reads back (and pad ends on) the drawn token, the one-hot of
        argmax(l_i + g_i), without gradient, whatever ``pick`` returns; the returned tokens are
        ``pick``'s (a relaxed pick's probabilities, say). By default the net reads ``pick``'s
        row itself, gradient included.
        """
        net = self.net if net is None else net
        g = self.noise(seeds)  # [B, L, V]
        B = len(seeds)
        e_pad = F.one_hot(torch.tensor(self.pad_id, device=g.device), self.vocab_size).float()
        x, cache, ended = self.start(B), None, torch.zeros(B, 1, device=g.device)
        tokens, logits, alive = [], [], []
        for i in range(self.max_len):
            out, cache = net(x, cache)  # 1. logits of the next token
            l_i = self._never(out[:, -1])  # [B, V]
            y = pick(l_i, g[:, i])  # 2. the token, one-hot (or its relaxation)
            alive.append(1.0 - ended.detach())
            back = F.one_hot((l_i + g[:, i]).argmax(-1), self.vocab_size).to(y.dtype) if drawn_back else y
            y = ended * e_pad + (1.0 - ended) * y  # 3. pad is absorbing
            back = ended * e_pad + (1.0 - ended) * back
            ended = back[:, self.pad_id : self.pad_id + 1]
            tokens.append(y)
            logits.append(l_i)
            x = back[:, None]
        return TokenSample(torch.stack(tokens, 1), torch.stack(logits, 1), torch.cat(alive, 1))

    def teacher_forced_logits(self, net: nn.Module | Callable, tokens: Tensor) -> Tensor:
        """Logits [B, L, V] of ``net`` at every position of given tokens [B, L, V] in one pass."""
        x = torch.cat([self.start(tokens.shape[0]), tokens[:, :-1].float()], 1)
        out, _ = net(x, None)
        return self._never(out)

    @torch.no_grad()
    def generate(self, prompts: list[str], seeds: list[int], batch_size: int = 64, progress=None, **kwargs) -> Tensor:
        """Token ids [N, L] (long), one sequence per seed, sampled without gradient in batches
        (``progress(k)`` after each batch of k, when given).

        ``prompts`` are ignored (the model is unconditional), as are sampler options of
        diffusion models in ``kwargs`` (``num_inference_steps``, ``guidance_scale``).
        """
        out = []
        for i in range(0, len(seeds), batch_size):
            out.append(self.sample(seeds[i : i + batch_size]).tokens.argmax(-1))
            if progress is not None:
                progress(len(out[-1]))
        return torch.cat(out).cpu()
