"""A value model on disk, and loaded.

A value model is a directory with ``value.safetensors`` (the network's tensors, target and
input standardization included) and ``value.json``, its card: ``format``
(``rewardiff-value``), ``version`` (1), the architecture (``kind: tokens`` marks a
``TokenValueNet``, no ``kind`` a ``ValueNet``), then what training recorded (reward, model,
sampler settings, target mean/std, held-out ``metrics``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.io import atomic_write, atomic_write_text
from rewardiff.rewards.value.net import AnyValueNet, net_from_config
from rewardiff.types import Timestep

WEIGHTS_FILE = "value.safetensors"
CONFIG_FILE = "value.json"
FORMAT = "rewardiff-value"
FORMAT_VERSION = 1


class LearnedValue:
    """A loaded value model: ``value(x_t, t, cond) -> Tensor[B]`` (the ``ValueFn`` protocol).

    The network stays in eval mode; gradients flow to ``x_t`` when the caller asks for them
    (wrap the call in ``torch.no_grad()`` when they are not needed). It follows its inputs:
    a call with ``x_t`` on another device moves the network there.

    Attributes:
        net: the ``ValueNet`` (float states) or ``TokenValueNet`` (token ids [B, L] or
            probabilities [B, L, V]).
        reward: the reward spec the value was trained on.
        config: the contents of ``value.json``.
        path: the directory it was loaded from.
    """

    def __init__(self, net: AnyValueNet, config: dict, path: Path | None = None):
        self.net, self.config, self.path = net.eval(), config, path
        self.reward: str = str(config.get("reward", ""))
        self.net.requires_grad_(False)

    def __call__(self, x_t: Tensor, t: Timestep | Tensor, cond: Any) -> Tensor:
        if x_t.device != self.net.target_mean.device:
            self.net.to(x_t.device)
        return self.net(x_t, t, cond)

    def to(self, device: torch.device | str) -> LearnedValue:
        self.net.to(device)
        return self

    def __repr__(self) -> str:
        r2 = self.config.get("metrics", {}).get("r2_heldout")
        return f"LearnedValue(reward={self.reward!r}, model={self.config.get('model')!r}, r2_heldout={r2})"


def save_value(net: AnyValueNet, card: dict, out_dir: str | Path) -> dict:
    """Write ``value.safetensors`` and ``value.json`` atomically into ``out_dir``.

    Args:
        net: the network (``ValueNet`` or ``TokenValueNet``); its tensors (target and input
            standardization included) are saved.
        card: what ``value.json`` records besides the architecture (reward, model, metrics ...);
            the architecture keys and ``format``/``version`` are filled in from ``net``.
        out_dir: the directory (created when missing).

    Returns:
        The card as written: ``format``, ``version``, the architecture, then ``card``'s keys.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    card = {"format": FORMAT, "version": FORMAT_VERSION, **net.config(),
            **{k: v for k, v in card.items() if k not in ("format", "version", *net.config())}}
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    atomic_write(out / WEIGHTS_FILE, lambda p: save_file(state, str(p), metadata={"format": FORMAT}))
    atomic_write_text(out / CONFIG_FILE, json.dumps(card, indent=2))
    return card


def load_value(path: str | Path) -> LearnedValue:
    """Load a value model saved by ``train_value`` (or ``save_value``).

    Args:
        path: its directory, or the ``value.safetensors`` (or ``value.json``) inside it.

    Returns:
        A ``LearnedValue`` on the CPU, in eval mode: ``value(x_t, t, cond) -> Tensor[B]``,
        with ``value.reward`` (the reward spec) and ``value.config`` (``value.json``). Its
        network is the one ``value.json`` names: a ``TokenValueNet`` for ``kind: tokens``,
        else a ``ValueNet``.

    Raises:
        UserError: the path is missing, or the files are absent, unreadable or do not fit together.
    """
    p = Path(path)
    d = p.parent if p.is_file() else p
    if not p.exists():
        raise UserError(f"no value model at {p}; train one with: rewardiff train-value --reward R --out {p}")
    wfile, cfile = d / WEIGHTS_FILE, d / CONFIG_FILE
    if not wfile.is_file() or not cfile.is_file():
        raise UserError(f"no value model in {d}: expected {WEIGHTS_FILE} and {CONFIG_FILE} (train one with rewardiff train-value)")
    config = _read_card(cfile)
    try:
        net = net_from_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"malformed value model config {cfile}: {e}") from None
    _load_weights(net, wfile)
    return LearnedValue(net, config, d)


def _read_card(cfile: Path) -> dict:
    """The parsed ``value.json`` (UserError when it is unreadable or not a value card)."""
    try:
        config = json.loads(cfile.read_text())
        if not isinstance(config, dict) or config.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} file")
    except (OSError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise UserError(f"malformed value model config {cfile}: {e}") from None
    return config


def _load_weights(net: AnyValueNet, wfile: Path) -> None:
    """Load ``value.safetensors`` into ``net`` (UserError when the file is corrupt or does not fit)."""
    from safetensors.torch import load_file

    try:
        net.load_state_dict(load_file(str(wfile)))
    except Exception as e:  # safetensors raises its own error types for corrupt files
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load value weights {wfile}: {msg}") from None
