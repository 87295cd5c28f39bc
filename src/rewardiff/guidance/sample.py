"""Sampling with an inference-time method: particles in, one sample per request out."""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.guidance.base import Method, pick_per_parent
from rewardiff.guidance.best_of_n import BestOfN
from rewardiff.guidance.dsearch import DSearch
from rewardiff.guidance.free2guide import Free2Guide
from rewardiff.guidance.gradient import GradientGuidance
from rewardiff.guidance.smc import SMC
from rewardiff.guidance.svdd import SVDD
from rewardiff.models.base import DiffusionModel
from rewardiff.rollout import evaluations_per_call
from rewardiff.types import Reward

METHODS = ("base", "best-of-n", "gradient", "svdd-pm", "svdd-mc", "dsearch", "dsearch-r", "free2guide", "smc")
TOKEN_METHODS = ("base", "best-of-n")  # what an autoregressive model samples with: it has no diffusion chain to steer


class Base(Method):
    """The plain sampler, as a method (so that it sits in the same tables)."""

    name = "base"

    def set_width(self, width: int) -> None:
        pass

    def plan(self, budget: int, T: int, c: int) -> None:
        if budget < c * T:
            raise UserError(f"base cannot meet --nfe-budget {budget}: it costs {c * T} NFE per sample")

    def cost(self, T: int, c: int) -> int:
        return c * T

    def step(self, ctx):
        return None


_CLASSES = {"base": Base, "best-of-n": BestOfN, "gradient": GradientGuidance, "svdd-pm": SVDD, "svdd-mc": SVDD,
            "dsearch": DSearch, "dsearch-r": DSearch, "free2guide": Free2Guide, "smc": SMC}
_WIDTH = {"base": "", "best-of-n": "n", "gradient": "", "svdd-pm": "m", "svdd-mc": "m", "dsearch": "k0", "dsearch-r": "k0",
          "free2guide": "n", "smc": "k"}


def make_method(name: str, reward: Reward | None, *, width: int | None = None, seed: int = 0, value: Any = None,
                **options: Any) -> Method:
    """A guidance method by name with its options.

    Args:
        name: one of :data:`METHODS`.
        reward: the reward it steers toward (None only for ``base``).
        width: the method's width (best-of-n: n; svdd: m; dsearch: k0; free2guide: n; smc: k).
        seed: the method's own randomness.
        value: a value function (``svdd-mc`` needs one; ``smc`` may use one).
        options: method-specific settings (alpha, scale, window, lam, m, w, ess, ...).
    """
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    if name != "base" and reward is None:
        raise UserError(f"method {name} needs a reward (--reward)")
    w = {} if width is None else {"width": width}
    cls = _CLASSES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "reward", "seed", "value", _WIDTH[name])]
    for key in options:
        if key not in allowed:
            raise UserError(f"{name} has no option {key!r}; its options: {', '.join(allowed) or 'none'}")
    # options are checked against the signature above; widths by each method's set_width
    if name == "base":
        return Base(reward, seed)
    if name == "best-of-n":
        return BestOfN(reward, n=w.get("width", 4), seed=seed, **options)
    if name == "gradient":
        return GradientGuidance(reward, seed=seed, **options)
    if name in ("svdd-pm", "svdd-mc"):
        if name == "svdd-mc" and value is None:
            raise UserError("svdd-mc needs a value model (--value DIR, trained by: rewardiff train-value)")
        return SVDD(reward, m=w.get("width", 20), value=value if name == "svdd-mc" else None, seed=seed, **options)
    if name in ("dsearch", "dsearch-r"):
        options.setdefault("replace", 0.05 if name == "dsearch-r" else 0.0)
        return DSearch(reward, k0=w.get("width", 4), seed=seed, **options)
    if name == "free2guide":
        return Free2Guide(reward, n=w.get("width", 5), seed=seed, **options)
    return SMC(reward, k=w.get("width", 4), value=value, seed=seed, **options)


def particle_seeds(seed: int, k: int) -> list[int]:
    """Seeds of the k particles of the request with ``seed``: its own first, then fresh ones."""
    return [seed] + [(seed + 1) * 1_000_003 + j for j in range(1, k)]


def guided_sample(
    model: DiffusionModel,
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
    method.check(eta, model.process)
    T = num_inference_steps
    c = evaluations_per_call(guidance_scale)
    k = method.particles
    per_batch = max(1, batch_size // k)
    images, nfe, stats = [], 0, {}
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
        for key, val in method.stats.items():
            stats[key] = stats.get(key, 0) + val
        if progress is not None:
            progress(len(req_p))
    n = len(prompts)
    info = {
        "method": method.name, "options": method.options(), "eta": eta, "num_inference_steps": T,
        "guidance_scale": guidance_scale, "nfe": nfe, "nfe_per_sample": nfe / n,
        "expected_nfe_per_sample": method.cost(T, c),
        **{f"{key}_per_sample": val / n for key, val in stats.items()},
    }
    return torch.cat(images), info


def check_token_method(method: Method, model: Any) -> None:
    """A UserError unless ``method`` is one an autoregressive ``model`` samples with (:data:`TOKEN_METHODS`)."""
    if method.name not in TOKEN_METHODS:
        raise UserError(f"method {method.name} steers a diffusion sampler; the autoregressive model {model.name} "
                        f"samples with --method {' or '.join(TOKEN_METHODS)}")


def token_sample(model: Any, method: Method, seeds: list[int], *, batch_size: int = 64, progress: Any = None) -> tuple[Tensor, dict]:
    """One sequence per seed from an autoregressive model (a :class:`~rewardiff.models.tokens.TokenModel`)
    with ``base`` or ``best-of-n``.

    Best-of-N draws N sequences per request with :meth:`TokenModel.sample` (the request's own
    seed first, then :func:`particle_seeds`, as for diffusion models, so N = 1 is the base
    sampler) and keeps the one the reward scores highest. A sequence costs L net evaluations
    (one per position, with the key/value cache), so NFE per sample is N * L: the method's
    cost formula with T = L steps.

    Returns:
        (token ids [N, L] (long), info) with the fields of :func:`guided_sample`'s info but eta.
    """
    check_token_method(method, model)
    k, L = method.particles, model.max_len
    method.stats = {"reward_calls": 0}
    per_batch = max(1, batch_size // k)
    out, nfe = [], 0
    for s in range(0, len(seeds), per_batch):
        req = seeds[s : s + per_batch]
        ps = [x for sd in req for x in particle_seeds(int(sd), k)]  # k particles per request, request-major
        ids = model.generate([""] * len(ps), ps, batch_size=len(ps))  # [len(req) * k, L]
        nfe += len(ps) * L
        if k > 1:
            best = pick_per_parent(method.score(ids, [""] * len(ps)), k, 0.0, method.gen)  # [len(req)]
            ids = ids[best]
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
