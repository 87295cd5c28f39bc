"""A reward that is checked on every call: what a user's reward can get wrong, caught where it happens.

:class:`GuardedReward` wraps any reward for a training run. A call that raises, returns
something that is not a float tensor ``[B]`` on the samples' device, returns NaN or inf,
returns no gradient where the method backpropagates through it, or (black-box rewards, when a
timeout is set) takes too long, becomes a :class:`RewardFailure` whose one-line message names
the reward, the step and the batch (``context``, set by the trainer before each step). The
trainer then stops with that message, or skips the batch and counts it (``reward_errors:
skip``); it never updates on a wrong value.
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.rewards.ensemble import call, is_relative


class RewardFailure(UserError):
    """A reward call that failed; the message names the reward, what went wrong, the step and the batch."""


class GuardedReward:
    """``reward`` with every call checked (see the module docstring).

    Args:
        reward: any reward (``name``, ``differentiable``, ``value_range``, ``__call__``).
        timeout: seconds a call of a black-box reward may take (0: no limit). The call runs
            in a daemon thread; a call past the limit is abandoned (its thread finishes on its
            own) and counts as failed. Differentiable rewards run in the caller's thread: the
            graph they build must stay in it.
    """

    def __init__(self, reward: Any, timeout: float = 0.0):
        self.reward, self.timeout = reward, float(timeout)
        self.name, self.differentiable = reward.name, reward.differentiable
        self.value_range = getattr(reward, "value_range", None)
        self.relative = is_relative(reward)  # compares the rows of a call (ensembles over candidates)
        self.context = ""  # "step 12 (prompts ...; seeds ...)": where the trainer is

    def __getattr__(self, item: str) -> Any:  # anything else a reward offers (e.g. a judge's helpers)
        if item == "reward":
            raise AttributeError(item)
        return getattr(self.reward, item)

    def _fail(self, what: str) -> RewardFailure:
        where = f" at {self.context}" if self.context else ""
        return RewardFailure(f"reward {self.name!r} {what}{where}")

    def __call__(self, x: Tensor, prompts: list[str], group: int | None = None) -> Tensor:
        try:
            out = self._call(x, prompts, group)
        except RewardFailure:
            raise
        except Exception as e:  # a user's reward can raise anything; the run names it
            msg = str(e).splitlines()[0] if str(e).strip() else ""
            own = f"reward {self.name!r} "
            if isinstance(e, UserError) and msg.startswith(own):  # its wrapper's own check (e.g. RewardFn's shape)
                raise self._fail(msg[len(own):]) from None
            raise self._fail(f"raised {type(e).__name__}" + (f": {msg}" if msg else "")) from None
        return self._check(out, x)

    def _call(self, x: Tensor, prompts: list[str], group: int | None = None) -> Any:
        if self.timeout <= 0 or self.differentiable:
            return call(self.reward, x, prompts, group)
        answer: queue.Queue = queue.Queue(maxsize=1)

        def work() -> None:
            try:
                with torch.no_grad():
                    answer.put((True, call(self.reward, x, prompts, group)))
            except BaseException as e:  # handed to the caller's thread
                answer.put((False, e))

        threading.Thread(target=work, daemon=True, name=f"reward-{self.name}").start()
        try:
            ok, value = answer.get(timeout=self.timeout)
        except queue.Empty:
            raise self._fail(f"took longer than reward_timeout ({self.timeout:g} s)") from None
        if not ok:
            raise value
        return value

    def _check(self, out: Any, x: Tensor) -> Tensor:
        n = x.shape[0]
        if not isinstance(out, Tensor):
            raise self._fail(f"returned a {type(out).__name__}; a reward returns a float tensor of shape ({n},)")
        if not out.is_floating_point():
            raise self._fail(f"returned dtype {out.dtype}; a reward returns floats")
        if out.shape != (n,):
            raise self._fail(f"returned shape {tuple(out.shape)} for {n} samples; expected ({n},)")
        if out.device != x.device:
            raise self._fail(f"returned a tensor on {out.device} for samples on {x.device}")
        bad = ~torch.isfinite(out.detach())
        if bool(bad.any()):
            kinds = "NaN" if bool(torch.isnan(out.detach()).any()) else "inf"
            raise self._fail(f"returned {kinds} for {int(bad.sum())} of {n} samples")
        if self.differentiable and x.requires_grad and torch.is_grad_enabled() and not out.requires_grad:
            raise self._fail("is declared differentiable but its output carries no gradient (detached, or built from a list?)")
        return out


def describe_batch(step: int, prompts: list[str], seeds: list[int], limit: int = 3) -> str:
    """``step 12 (batch of 8: prompts 'a', 'b', ...; seeds 3, 17, ...)`` for a failure message."""
    def few(items: list, fmt) -> str:
        shown = ", ".join(fmt(i) for i in items[:limit])
        return shown + (", ..." if len(items) > limit else "")

    distinct = list(dict.fromkeys(prompts))
    text = f"step {step} (batch of {len(seeds)}"
    if any(distinct):
        text += ": prompts " + few(distinct, repr)
    return text + "; seeds " + few(seeds, str) + ")"
