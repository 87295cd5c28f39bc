"""The reward registry: factories by name, user rewards by ``package.module:function``, sums.

A spec given to :func:`get_reward` is one of
- a registered name: ``"shapes-count"`` (:data:`rewardiff.plugins.REWARDS`, imported on use);
- ``"openai:MODEL@URL"``: a vision-language model behind an OpenAI-compatible chat API (vLLM,
  SGLang) asked to rate the image, read from its answer's log-probabilities
  (:mod:`rewardiff.rewards.remote`; options: template, mode, frames, concurrency, timeout, ...);
- ``"package.module:attribute"``, where the attribute is a reward object, a factory that
  returns one (callable with no arguments), or a plain ``f(x, prompts) -> Tensor[B]``
  (wrapped; non-differentiable unless ``f.differentiable`` is True);
- either wrapped as ``"z(name)"``: the reward standardized, ``(r - mean) / std``, with the
  statistics a world recorded for ``name`` on its base model's samples (``plugins.REWARD_STATS``);
- a weighted sum of any of these: ``"0.7*shapes-count+0.3*brightness"``,
  ``"0.7*z(shapes-count)+0.3*z(jpeg-compressibility)"``, ``"brightness+-0.5*saturation"``;
- Free2Guide's candidate-relative ensembles ``"normalized(a, b)"`` and ``"consensus(a, b)"``
  (arguments are weighted terms: ``normalized(0.75*a, 0.25*b)``), and ``"keyframes(name)"`` /
  ``"keyframes(name, 0, 5, 10, 15)"``, an image reward on a video's key frames
  (:mod:`rewardiff.rewards.ensemble`).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Any

from rewardiff import plugins
from rewardiff.errors import UserError
from rewardiff.rewards.base import RewardFn, first_line
from rewardiff.rewards.ensemble import (Consensus, KeyFrames, Normalized, NormalizedSum, WeightedSum, parse_weighted, split_call,
                                        split_top, split_z)
from rewardiff.rewards.wire import PREFIX as REMOTE_PREFIX
from rewardiff.types import Reward

Factory = Callable[..., Reward]


def register(
    name: str, *, differentiable: bool | None = None, description: str | None = None
) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(**options) -> Reward`` under ``name`` (in ``plugins.REWARDS``).

    Args:
        name: registry name; registering a name twice replaces the first factory.
        differentiable: the flag ``list_rewards`` shows (read off a built reward when None).
        description: one line for listings (the factory's docstring's first line when None).
    """

    def wrap(factory: Factory) -> Factory:
        plugins.REWARDS[name] = plugins.RewardEntry(factory, differentiable, description or first_line(factory.__doc__))  # type: ignore[arg-type]
        return factory

    return wrap


def _factory(name: str) -> Factory:
    target = plugins.REWARDS[name].factory
    return plugins.load(target) if isinstance(target, str) else target


def list_rewards() -> list[tuple[str, bool, str]]:
    """(name, differentiable, one-line description) of every registered reward, sorted by name.

    Nothing is imported for the registry's own entries: their flags and lines are recorded there.
    """
    rows = []
    for name in sorted(plugins.REWARDS):
        entry = plugins.REWARDS[name]
        flag = entry.differentiable
        if flag is None:
            flag = bool(_factory(name)().differentiable)
        rows.append((name, flag, entry.description))
    return rows


def get_reward(spec: str, **options: Any) -> Reward:
    """Build the reward named by ``spec`` (see the module docstring); ``options`` go to its factory.

    Raises:
        UserError: unknown name (the message lists the valid ones), a module that cannot be
            imported, a missing attribute, an attribute that is not a reward, or a ``z(name)``
            with no recorded statistics for ``name``.
    """
    spec = spec.strip()
    if len(split_top(spec, "+")) > 1 or len(split_top(spec, "*")) > 1:
        try:
            terms = parse_weighted(spec)
        except UserError:
            if spec.startswith(REMOTE_PREFIX):  # one remote reward whose URL holds + or *
                return _single(spec, options)
            raise
        if options:
            raise UserError(f"options {sorted(options)} cannot be passed to the weighted sum {spec!r}")
        return WeightedSum([(w, _single(name, {})) for w, name in terms], name=spec)
    return _single(spec, options)


def _call(name: str, args: list[str], spec: str, options: dict[str, Any]) -> Reward:
    """``normalized(...)``, ``consensus(...)`` or ``keyframes(...)`` built from its arguments."""
    if name == "keyframes":
        inner, rest = args[0], args[1:]
        try:
            frames = tuple(int(a) for a in rest) if rest else options.pop("frames", None)
        except ValueError:
            raise UserError(f"keyframes(...) takes a reward and frame numbers, got {spec!r}") from None
        return KeyFrames(get_reward(inner, **options), frames)
    if options:
        raise UserError(f"options {sorted(options)} cannot be passed to the ensemble {spec!r}")
    parts = []
    for arg in args:
        terms = parse_weighted(arg)
        if len(terms) != 1:
            raise UserError(f"each argument of {name}(...) is one weighted reward; got {arg!r} in {spec!r}")
        w, term = terms[0]
        parts.append((w, _single(term, {})))
    cls = NormalizedSum if name == "normalized" else Consensus
    return cls(parts)


def _single(spec: str, options: dict[str, Any]) -> Reward:
    """One registered name, one ``module:attribute``, either wrapped in ``z(...)``, or a call of
    an ensemble function."""
    if spec.startswith(REMOTE_PREFIX):
        from rewardiff.rewards.remote import from_spec

        return from_spec(spec, **options)
    called = split_call(spec)
    if called is not None:
        return _call(called[0], called[1], spec, dict(options))
    inner, standardize = split_z(spec)
    if standardize:
        if options:
            raise UserError(f"options {sorted(options)} cannot be passed to {spec!r}: its statistics were measured with the defaults")
        reward = _single(inner, {})
        mean, std = z_stats(inner)
        return Normalized(reward, mean, std)
    if spec in plugins.REWARDS:
        return _factory(spec)(**options)
    if ":" in spec:
        return _from_module(spec, options)
    valid = ", ".join(sorted(plugins.REWARDS))
    raise UserError(f"unknown reward {spec!r}; valid names: {valid} (or give package.module:function)")


def _from_module(spec: str, options: dict[str, Any]) -> Reward:
    """Import ``module:attribute`` and turn the attribute into a reward."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"reward spec {spec!r} must look like package.module:function")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # ModuleNotFoundError included
        raise UserError(f"cannot import module {module_name!r} for reward {spec!r}: {e}") from e
    try:
        obj = getattr(module, attr)
    except AttributeError:
        raise UserError(f"module {module_name!r} has no attribute {attr!r} (reward {spec!r})") from None
    return _as_reward(obj, spec, options)


def _is_reward(obj: Any) -> bool:
    return callable(obj) and all(hasattr(obj, a) for a in ("name", "differentiable", "value_range"))


def _is_factory(obj: Any) -> bool:
    """A factory can be called with no arguments; a plain reward needs (x, prompts)."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return False
    required = [
        p for p in sig.parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    ]
    return not required


def _as_reward(obj: Any, spec: str, options: dict[str, Any]) -> Reward:
    """A reward object as is; a factory called with ``options``; a plain function wrapped."""
    if _is_reward(obj) and not options:
        return obj
    if not callable(obj):
        raise UserError(f"{spec!r} is a {type(obj).__name__}, not a reward, factory or function")
    if _is_factory(obj):
        reward = obj(**options)
        if not _is_reward(reward):
            raise UserError(f"factory {spec!r} returned a {type(reward).__name__}, not a reward (needs name, differentiable, value_range)")
        return reward
    if options:
        raise UserError(f"{spec!r} is a plain reward function and takes no options (got {sorted(options)})")
    return RewardFn(
        name=spec,
        differentiable=bool(getattr(obj, "differentiable", False)),
        value_range=getattr(obj, "value_range", None),
        description=first_line(getattr(obj, "__doc__", None)) or spec,
        fn=obj,
    )


def z_stats(name: str) -> tuple[float, float]:
    """(mean, std) of reward ``name`` recorded by a world (``plugins.REWARD_STATS``), for ``z(name)``.

    Raises:
        UserError: no world recorded statistics for ``name``.
    """
    for source in plugins.REWARD_STATS.values():
        stats = plugins.load(source)(name)
        if stats is not None:
            return stats
    raise UserError(f"no statistics recorded for reward {name!r}, which z({name}) needs; measure them with the world's "
                    "statistics command (shapes: python -m rewardiff.worlds.shapes.stats)")
