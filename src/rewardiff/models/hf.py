"""Hugging Face causal language models as token generators (``hf:PATH`` in configs).

A model saved with ``save_pretrained`` in a local folder is loaded offline with
``AutoModelForCausalLM.from_pretrained(PATH, local_files_only=True)``. Its vocabulary must
be the molecules tokenizer's (``vocab_size = tokenizer.size``; a ``tokenizer.json`` in the
rewardiff format inside the folder replaces the world's), so that the chemistry rewards read
its output; the start token is ``<mask>``, as for :mod:`rewardiff.worlds.molecules.autoregressive`.

:class:`HFCausalLM` gives the model the token-net contract of
:class:`~rewardiff.models.tokens.TokenModel`: ``net(x, cache) -> (logits, cache)``, with
token probabilities fed as input embeddings ``probs @ embedding.weight`` and the key/value
cache of ``past_key_values``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from torch import Tensor, nn

from rewardiff import plugins
from rewardiff.errors import UserError

TOKENIZER = "molecules"  # the registered tokenizer (and world) whose vocabulary the models speak


class HFCausalLM(nn.Module):
    """``forward(x [B, T] ids or [B, T, V] probabilities, cache) -> (logits [B, T, V], cache)``."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        # the cache argument: ``cache`` in recent transformers, ``past_key_values`` before
        self._cache_arg = "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"

    def forward(self, x: Tensor, cache=None) -> tuple[Tensor, object]:
        weight = self.lm.get_input_embeddings().weight  # [V, D]
        e = x.to(weight.dtype) @ weight if x.is_floating_point() else weight[x]  # [B, T, D]
        out = self.lm(inputs_embeds=e, use_cache=True, **{self._cache_arg: cache})
        return out.logits, out.cache if hasattr(out, "cache") else out.past_key_values


def lora_targets(lm: nn.Module) -> list[str]:
    """The attention layers LoRA adapts: peft's default for the architecture (``c_attn`` for
    GPT-2); none when peft has no default (then only full fine-tuning, ``lora_rank=0``, applies)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS

    kind = getattr(getattr(lm, "config", None), "model_type", None)
    return list(DEFAULTS.get(kind, []))


def hf_model(path: str | Path):
    """The causal language model in the local folder ``path`` as a :class:`~rewardiff.models.tokens.TokenModel`.

    Raises:
        UserError: no such folder, a folder transformers cannot load, or a vocabulary or
            context length that does not fit the molecules tokenizer.
    """
    from transformers import AutoModelForCausalLM

    from rewardiff.models.tokens import TokenModel

    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"no Hugging Face model in {d} (expected a folder written by save_pretrained, with config.json)")
    try:
        lm = AutoModelForCausalLM.from_pretrained(str(d), local_files_only=True)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the Hugging Face model in {d}: {str(e).splitlines()[0]}") from None
    tok = plugins.load(plugins.TOKENIZERS[TOKENIZER])(d / "tokenizer.json" if (d / "tokenizer.json").is_file() else None)
    size = lm.get_input_embeddings().weight.shape[0]
    if size != tok.size:
        raise UserError(f"the model in {d} has a vocabulary of {size} tokens; the molecules tokenizer has {tok.size}")
    n_pos = getattr(lm.config, "n_positions", None) or getattr(lm.config, "max_position_embeddings", None)
    if n_pos is not None and n_pos < tok.max_len:
        raise UserError(f"the model in {d} takes {n_pos} positions; molecules need {tok.max_len}")
    lm.eval()
    return TokenModel(HFCausalLM(lm), tok, name=f"hf:{d.name}", lora_targets=lora_targets(lm), world=TOKENIZER)
