"""Sampling with an inference-time method: particles in, one sample per request out."""

from __future__ import annotations

import importlib
import inspect
import math
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import MAX_WIDTH, Method
from rewardiff.rollout import evaluations_per_call
from rewardiff.types import Generator, Reward

class GuidanceEntry(NamedTuple):
    """How a method's name becomes an object.

    Fields:
        path: ``module:Class`` of the method, imported when first made.
        width: the constructor argument that ``width`` sets ("" when the method has none).
        default_width: its value when no width is given.
        defaults: options this name sets unless the caller does (``dsearch-r``'s replace).
        value: what the method does with a value model: "" ignores it, "optional" takes
            one when given, "required" refuses to run without one.
    """

    path: str
    width: str = ""
    default_width: int = 0
    defaults: dict[str, Any] = {}
    value: Literal["", "optional", "required"] = ""


REGISTRY: dict[str, GuidanceEntry] = {
    "base": GuidanceEntry("rewardiff.guidance.sample:Base"),
    "best-of-n": GuidanceEntry("rewardiff.guidance.best_of_n:BestOfN", "n", 4),
    "gradient": GuidanceEntry("rewardiff.guidance.gradient:GradientGuidance"),
    "svdd-pm": GuidanceEntry("rewardiff.guidance.svdd:SVDD", "m", 20),
    "svdd-mc": GuidanceEntry("rewardiff.guidance.svdd:SVDD", "m", 20, value="required"),
    "dsearch": GuidanceEntry("rewardiff.guidance.dsearch:DSearch", "oversample", 5),  # the paper's o = M = w = 5
    "dsearch-r": GuidanceEntry("rewardiff.guidance.dsearch:DSearch", "oversample", 1, {"replace": 0.03}),  # theirs: o = 1
    "free2guide": GuidanceEntry("rewardiff.guidance.free2guide:Free2Guide", "n", 5),
    "smc": GuidanceEntry("rewardiff.guidance.smc:SMC", "k", 4, value="optional"),
}
METHODS = tuple(REGISTRY)


class Base(Method):
    """The plain sampler, as a method (so that it sits in the same tables)."""

    name = "base"
    requires = ()

    def set_width(self, width: int) -> None:
        pass

    def plan(self, budget: int, T: int, c: int) -> None:
        if budget < c * T:
            raise UserError(f"base cannot meet --nfe-budget {budget}: it costs {c * T} NFE per sample")

    def cost(self, T: int, c: int) -> int:
        return c * T

    def step(self, ctx):
        return None


def method_class(name: str) -> type[Method]:
    """The class registered under ``name`` (UserError listing the valid names when unknown)."""
    if name not in REGISTRY:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    module, cls = REGISTRY[name].path.split(":")
    return getattr(importlib.import_module(module), cls)


def make_method(name: str, reward: Reward | None, *, width: int | None = None, seed: int = 0, value: Any = None,
                **options: Any) -> Method:
    """A guidance method by name with its options.

    Args:
        name: one of :data:`METHODS`.
        reward: the reward it steers toward (None only for ``base``).
        width: the method's width (best-of-n: n; svdd: m; dsearch: oversample; free2guide: n; smc: k).
        seed: the method's own randomness.
        value: a value function (``svdd-mc`` needs one; ``smc`` may use one).
        options: method-specific settings (alpha, scale, window, lam, m, w, ess, ...).
    """
    cls = method_class(name)
    spec = REGISTRY[name]
    if name != "base" and reward is None:
        raise UserError(f"method {name} needs a reward (--reward)")
    params = inspect.signature(cls.__init__).parameters
    allowed = [p for p in params if p not in ("self", "reward", "seed", "value", spec.width)]
    for key, val in options.items():
        if key not in allowed:
            raise UserError(f"{name} has no option {key!r}; its options: {', '.join(allowed) or 'none'}")
        _check_option(name, key, val, params[key].default)
    # options are checked against the signature above; widths by each method's set_width
    if spec.value == "required" and value is None:
        raise UserError(f"{name} needs a value model (--value DIR, trained by: rewardiff train-value)")
    kwargs = {**spec.defaults, **options}
    if spec.width:
        if width is not None and width > MAX_WIDTH:
            raise UserError(f"--width {width} is more than {name} takes (at most {MAX_WIDTH}: its candidates are denoised in one batch)")
        kwargs[spec.width] = spec.default_width if width is None else width
    if spec.value:
        kwargs["value"] = value
    return cls(reward, seed=seed, **kwargs)


def _check_option(method: str, key: str, value: Any, default: Any) -> None:
    """A UserError when ``value`` is not of the kind the option's default is (a number, true or
    false, a word), or is NaN (inf is a number: an ``alpha`` or ``lam`` of inf is the hard limit)."""
    def bad(kind: str) -> UserError:
        return UserError(f"{method} option {key!r} takes {kind}, got {value!r}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise bad("true or false")
    elif isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise bad("a number")
        if isinstance(default, int) and not float(value).is_integer():
            raise bad("a whole number")
    elif isinstance(default, str) and not isinstance(value, str):
        raise bad(f"a word (default {default!r})")


def particle_seeds(seed: int, k: int) -> list[int]:
    """Seeds of the k particles of the request with ``seed``: its own first, then fresh ones."""
    return [seed] + [(seed + 1) * 1_000_003 + j for j in range(1, k)]


def guided_sample(
    model: Generator,
    method: Method,
    prompts: list[str],
    seeds: list[int],
    num_inference_steps: int = 15,
    *,
    guidance_scale: float = 2.0,
    eta: float | None = None,
    batch_size: int = 64,
    progress: Any = None,
) -> tuple[Tensor, dict]:
    """Sample one decoded image per (prompt, seed) with ``method``.

    Returns:
        (images [N, ...] in [-1, 1] (decoded), info) with info holding ``nfe`` (total
        denoiser evaluations, CFG counting 2), ``nfe_per_sample``, ``expected_nfe_per_sample``
        (the method's cost formula) and the method's own counters.
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
    eta = method.default_eta if eta is None else float(eta)
    method.fits(model)
    method.check(eta, model.process)
    T = num_inference_steps
    c = evaluations_per_call(guidance_scale)
    k = method.particles
    per_batch = max(1, batch_size // k)
    images, nfe, expected, stats = [], 0, 0, {}
    for s in range(0, len(prompts), per_batch):
        req_p, req_s = prompts[s : s + per_batch], seeds[s : s + per_batch]
        method.begin(len(req_p), model, eta)
        pp = [p for p in req_p for _ in range(k)]
        ps = [x for sd in req_s for x in particle_seeds(int(sd), k)]
        grad = torch.enable_grad() if method.needs_grad else torch.no_grad()
        with grad:
            traj = model.sample(pp, ps, T, eta=eta, guidance_scale=guidance_scale, hook=method)
        if traj.x0.shape[0] != len(req_p):
            raise RuntimeError(f"{method.name} returned {traj.x0.shape[0]} samples for {len(req_p)} requests")
        with torch.no_grad():
            images.append(model.output(traj.x0.detach()))
        nfe += traj.nfe
        expected += method.batch_cost(T, c, req_p)
        for key, val in method.stats.items():
            stats[key] = stats.get(key, 0) + val
        if progress is not None:
            progress(len(req_p))
    n = len(prompts)
    info = {
        "method": method.name, "options": method.options(), "eta": eta, "num_inference_steps": T,
        "guidance_scale": guidance_scale, "nfe": nfe, "nfe_per_sample": nfe / n,
        "expected_nfe_per_sample": expected / n,
        **{f"{key}_per_sample": val / n for key, val in stats.items()},
    }
    return torch.cat(images), info


def token_sample(model: Any, method: Method, seeds: list[int], *, batch_size: int = 64, progress: Any = None) -> tuple[Tensor, dict]:
    """One sequence per seed from an autoregressive model (a :class:`~rewardiff.models.tokens.TokenModel`)
    with ``base`` or ``best-of-n``.

    Best-of-N draws N sequences per request with :meth:`TokenModel.sample` (the request's own
    seed first, then :func:`particle_seeds`, as for diffusion models, so N = 1 is the base
    sampler) and keeps the one the reward scores highest (:meth:`BestOfN.select`, the selection
    of the diffusion hook). A sequence costs L net evaluations
    (one per position, with the key/value cache), so NFE per sample is N * L: the method's
    cost formula with T = L steps.

    Returns:
        (token ids [N, L] (long), info) with the fields of :func:`guided_sample`'s info but eta.
    """
    method.fits(model)
    k, L = method.particles, model.max_len
    method.stats = {"reward_calls": 0}
    per_batch = max(1, batch_size // k)
    out, nfe = [], 0
    for s in range(0, len(seeds), per_batch):
        req = seeds[s : s + per_batch]
        ps = [x for sd in req for x in particle_seeds(int(sd), k)]  # k particles per request, request-major
        ids = model.generate([""] * len(ps), ps, batch_size=len(ps))  # [len(req) * k, L]
        nfe += len(ps) * L
        if k > 1:  # best-of-n with n = k
            ids = ids[method.select(ids, [""] * len(ps))]  # [len(req), L]
        out.append(ids)
        if progress is not None:
            progress(len(req))
    n = len(seeds)
    info = {
        "method": method.name, "options": method.options(), "num_inference_steps": L, "guidance_scale": 1.0,
        "nfe": nfe, "nfe_per_sample": nfe / n, "expected_nfe_per_sample": method.cost(L, 1),
        **{f"{key}_per_sample": val / n for key, val in method.stats.items()},
    }
    return torch.cat(out), info


def budget_plan(method: Method, budget: int, num_inference_steps: int, guidance_scale: float) -> None:
    """Set ``method``'s width from a per-sample NFE budget (UserError when it cannot fit)."""
    if budget < 1 or math.isnan(budget):
        raise UserError(f"--nfe-budget must be a positive number, got {budget}")
    method.plan(int(budget), num_inference_steps, evaluations_per_call(guidance_scale))
