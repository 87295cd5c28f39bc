"""``rewardiff tune``: learn, privately, which inference-time setting users prefer for each prompt.

A contextual bandit (:mod:`rewardiff.bandits`) whose arms are sampler settings of one model
(method, width, classifier-free guidance scale) and whose contexts are prompts: a user arrives
with a prompt drawn uniformly from a prompt set, the agent picks a setting, the user rates a
sample made with it. Users are simulated by a reward (the rating) plus Gaussian noise.

So that regret is exact and the stream cheap, a *bank* is built first: for every (prompt, arm),
K samples made with that arm's setting and rated. Round t then rates arm a for prompt p_t with
one of the bank's K ratings of (p_t, a), drawn at random, plus noise; the expected rating of
(p, a) is the bank's mean of its K, and

    regret_t = max_a mean(p_t, a) - mean(p_t, a_t).

Every agent plays the same streams (same prompts, draws and noise for a stream seed): the private
kernel bandit at several epsilons, GP-UCB and uniform arms. The private agent's one release is
(eps, delta)-DP with respect to replacing one user's (prompt, rating) record and its actions are
jointly DP (:mod:`rewardiff.bandits.agents`). Ratings reach the agents mapped to [-1, 1] by the
rating's value range (a fixed public map, so no privacy is spent on it); regrets are in the
rating's own units. The settings the agents settle on are then read by something the rating
never used: the world's judge on the bank samples of those settings.

The bank lives in ``OUT/bank/``: ``bank.json`` (its settings and every finished cell's ratings
and judge reading) and ``cells/pPPP-aAA.safetensors`` (the cell's images, uint8 [K, H, W, 3]),
written atomically cell by cell, so that a stopped build resumes at the first missing cell.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from rewardiff import plugins
from rewardiff.bandits import GPUCB, Arms, PrivateKernelBandit, UniformAgent, joint, matern, rbf
from rewardiff.errors import UserError
from rewardiff.io import atomic_write, atomic_write_text

BANK_FORMAT = "rewardiff-tune-bank/1"
BASE = "base"


@dataclass(frozen=True)
class Setting:
    """One arm: a sampler setting."""

    method: str  # a guidance method (rewardiff.guidance.METHODS)
    width: int  # the method's width (1 for base)
    guidance_scale: float  # classifier-free guidance scale

    @property
    def name(self) -> str:
        return f"{self.method}{'' if self.method == BASE else f' x{self.width}'} g{self.guidance_scale:g}"


@dataclass(frozen=True)
class TuneConfig:
    """Everything ``rewardiff tune`` is run with; the fields down to ``bank_seed`` fix the bank."""

    model: str = "shapes"  # the model whose sampler settings are the arms
    prompt_set: str = "train"  # the contexts: a prompt set name or a prompt file
    prompts: int = 8  # keep this many prompts, spread through the set (see spread; 0: all)
    methods: tuple[str, ...] = ("base", "best-of-n", "svdd-pm", "smc")  # methods of the arm grid
    widths: tuple[int, ...] = (2, 4)  # widths of the arm grid (base has none)
    guidance_scales: tuple[float, ...] = (1.5, 3.0)  # guidance scales of the arm grid
    arms: int = 0  # keep this many arms, evenly spaced through the grid (0: all)
    samples: int = 4  # K: bank samples per (prompt, arm)
    steps: int = 15  # DDIM steps of every arm
    reward: str = "shapes-count"  # the reward the methods steer by
    rating: str = "shapes-count"  # the reward simulated users rate with
    bank_seed: int = 0  # sample k of prompt i has seed bank_seed + i * K + k, for every arm
    noise: float = 0.1  # standard deviation of the Gaussian noise on a rating, in the rating's units
    rounds: int = 1000  # users in a stream
    seeds: tuple[int, ...] = (0, 1, 2)  # stream seeds (an agent's seed follows its stream's)
    epsilons: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0)  # privacy levels of the private agent
    delta: float = 1e-5  # delta of the private release
    explore: int = 0  # uniform rounds before the private release (0: a quarter of the rounds)
    kernel: str = "rbf"  # kernel on (prompt, setting) features: rbf, matern
    lengthscale: float = 2.0  # its lengthscale (one-hot features: two prompts or methods differ by sqrt 2)

    @property
    def explore_rounds(self) -> int:
        return self.explore or max(2, self.rounds // 4)


def evenly(items: list, n: int) -> list:
    """``n`` items evenly spaced through ``items``, the first and last included (all when n is 0 or too many)."""
    if n <= 0 or n >= len(items):
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def spread(items: list, n: int) -> list:
    """``n`` of ``items`` spread through them by the golden-ratio sequence (i * 0.618... mod 1), kept in
    their order (all when n is 0 or too many). Unlike even spacing, it does not alias with a period
    of the list (prompts ordered by count, then colour, then shape)."""
    if n <= 0 or n >= len(items):
        return list(items)
    golden, chosen, i = (math.sqrt(5.0) - 1.0) / 2.0, [], 0
    while len(chosen) < n:  # the sequence is dense in [0, 1): every index comes up
        j = int(len(items) * ((0.5 + i * golden) % 1.0))
        chosen += [j] if j not in chosen else []
        i += 1
    return [items[j] for j in sorted(chosen)]


def arm_grid(cfg: TuneConfig) -> list[Setting]:
    """The arms: base at each guidance scale, every other method at each width and scale; ``cfg.arms`` of them."""
    grid = [Setting(m, 1 if m == BASE else w, float(g)) for m in cfg.methods for w in ([1] if m == BASE else cfg.widths)
            for g in cfg.guidance_scales]
    return evenly(grid, cfg.arms)


def arm_features(arms: list[Setting]) -> np.ndarray:
    """Each arm as a vector [A, M + 2]: one-hot method (M methods, in order of appearance), log2 width
    over the largest log2 width, and the guidance scale mapped onto [0, 1] over the arms' range."""
    methods = list(dict.fromkeys(a.method for a in arms))
    logw = np.log2([a.width for a in arms])
    g = np.array([a.guidance_scale for a in arms])
    span = g.max() - g.min()
    out = np.zeros((len(arms), len(methods) + 2))
    out[np.arange(len(arms)), [methods.index(a.method) for a in arms]] = 1.0
    out[:, -2] = logw / logw.max() if logw.max() > 0 else 0.0
    out[:, -1] = (g - g.min()) / span if span > 0 else 0.0
    return out


def check_config(cfg: TuneConfig) -> None:
    """A one-line UserError naming the option for anything out of range (nothing is read or written)."""
    from rewardiff.guidance.sample import REGISTRY

    usable = [m for m, e in REGISTRY.items() if e.value != "required" and (e.width or m == BASE)]
    bad = [m for m in cfg.methods if m not in usable]
    rules = [
        (not cfg.methods or bool(bad), f"--methods: {', '.join(bad) or 'none given'}; use some of {', '.join(usable)}"),
        (len(set(cfg.methods)) != len(cfg.methods), f"--methods: {','.join(cfg.methods)} names a method twice"),
        (not cfg.widths or min(cfg.widths) < 1, f"--widths: need whole numbers >= 1, got {cfg.widths}"),
        (not cfg.guidance_scales or not all(math.isfinite(g) and g >= 0 for g in cfg.guidance_scales),
         f"--guidance-scales: need numbers >= 0, got {cfg.guidance_scales}"),
        (cfg.prompts < 0, f"--prompts must be >= 0 (0: all), got {cfg.prompts}"),
        (cfg.arms < 0 or cfg.arms == 1, f"--arms must be 0 (all) or at least 2, got {cfg.arms}"),
        (cfg.samples < 1, f"--samples must be at least 1, got {cfg.samples}"),
        (cfg.steps < 1, f"--steps must be at least 1, got {cfg.steps}"),
        (not (math.isfinite(cfg.noise) and cfg.noise >= 0), f"--noise must be a number >= 0, got {cfg.noise}"),
        (not cfg.seeds or min(cfg.seeds) < 0, f"--seeds: need whole numbers >= 0, got {cfg.seeds}"),
        (not all(e > 0 for e in cfg.epsilons), f"--epsilon: need numbers > 0 (inf: no privacy), got {cfg.epsilons}"),
        (not 0 < cfg.delta < 1, f"--delta must be in (0, 1), got {cfg.delta}"),
        (cfg.explore < 0 or cfg.explore == 1, f"--explore must be 0 (a quarter of the rounds) or at least 2, got {cfg.explore}"),
        (cfg.rounds < 2, f"--rounds must be at least 2, got {cfg.rounds}"),
        (cfg.explore_rounds > cfg.rounds, f"--explore {cfg.explore_rounds} is more than --rounds {cfg.rounds}"),
        (cfg.kernel not in ("rbf", "matern"), f"--kernel: {cfg.kernel!r} is not one of rbf, matern"),
        (not cfg.lengthscale > 0, f"--lengthscale must be > 0, got {cfg.lengthscale}"),
    ]
    for failed, message in rules:
        if failed:
            raise UserError(message)


def contexts_of(cfg: TuneConfig, world: str | None) -> tuple[list[str], np.ndarray]:
    """The kept prompts and their context vectors [P, d] from the world's ``plugins.PROMPT_FEATURES``."""
    from rewardiff.prompts import prompt_set

    if world not in plugins.PROMPT_FEATURES:
        raise UserError(f"--model {cfg.model}: its world ({world}) gives prompts no features; worlds that do: "
                        f"{', '.join(plugins.PROMPT_FEATURES)}")
    prompts = spread(list(dict.fromkeys(prompt_set(cfg.prompt_set))), cfg.prompts)
    try:
        return prompts, np.asarray(plugins.load(plugins.PROMPT_FEATURES[world])(prompts), dtype=float)
    except ValueError as e:
        raise UserError(f"--prompt-set {cfg.prompt_set}: {e}") from None


# ----------------------------------------------------------------------------- the bank

CellSampler = Callable[[str, Setting, list[int]], tuple[np.ndarray, np.ndarray, dict[str, float]]]
"""``sample(prompt, arm, seeds) -> (images uint8 [K, H, W, 3], ratings [K], judge means)``."""


class Bank(NamedTuple):
    """The bank's ratings and judge readings of every (prompt, arm) cell."""

    prompts: list[str]
    arms: list[Setting]
    ratings: np.ndarray  # [P, A, K], the rating's units
    judge: dict[str, np.ndarray]  # judge measure -> [P, A], its mean over the cell's K samples
    value_range: tuple[float, float]  # the rating's range, mapped onto [-1, 1] for the agents
    seconds: float  # sampling time of all cells, over every build that made them

    @property
    def means(self) -> np.ndarray:
        """The expected rating of each (prompt, arm), [P, A]."""
        return self.ratings.mean(axis=2)


class ModelSampler:
    """Samples bank cells with the model: each arm's method, width and guidance scale, steered by
    ``cfg.reward``, rated by ``cfg.rating`` and read by the world's judge. Making it checks every
    arm against the model, so that a method that cannot run fails before the first sample.

    Attributes:
        world: the model's world (whose prompt features and judge apply).
        value_range: the rating's (low, high), or None when unknown.
    """

    def __init__(self, cfg: TuneConfig, arms: list[Setting]) -> None:
        from rewardiff.rewards import get_reward
        from rewardiff.rewards.guard import GuardedReward
        from rewardiff.sampling import load_model

        def reward(spec: str, option: str) -> GuardedReward:
            try:
                return GuardedReward(get_reward(spec))
            except UserError as e:
                raise UserError(f"{option}: {e}") from None

        self.steer = reward(cfg.reward, "--reward")
        self.rate = self.steer if cfg.rating == cfg.reward else reward(cfg.rating, "--rating")
        self.model, self.steps = load_model(cfg.model), cfg.steps
        if not self.model.conditional:
            raise UserError(f"--model {cfg.model} is unconditional: its prompts cannot be contexts")
        self.world, self.value_range = getattr(self.model, "world", None), self.rate.value_range
        for arm in arms:
            meth = self.method(arm, 0)
            meth.fits(self.model)
            meth.check(meth.default_eta, self.model.process)

    def method(self, arm: Setting, seed: int):
        from rewardiff.guidance import make_method

        base = arm.method == BASE
        return make_method(arm.method, None if base else self.steer, width=None if base else arm.width, seed=seed)

    def __call__(self, prompt: str, arm: Setting, seeds: list[int]) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
        import torch

        from rewardiff.finetune.evaluate import world_evaluations
        from rewardiff.guidance import guided_sample
        from rewardiff.report.grid import to_uint8_hwc

        prompts = [prompt] * len(seeds)
        x, _ = guided_sample(self.model, self.method(arm, seeds[0]), prompts, seeds, self.steps, guidance_scale=arm.guidance_scale)
        with torch.no_grad():
            ratings = self.rate(x, prompts).double().cpu().numpy()
        judged = world_evaluations(self.model, x, prompts, self.rate.name).metrics
        return to_uint8_hwc(x), ratings, judged


def bank_settings(cfg: TuneConfig, prompts: list[str], arms: list[Setting]) -> dict:
    """What fixes the bank's contents; a bank on disk is resumed only under the same settings."""
    keep = ("model", "samples", "steps", "reward", "rating", "bank_seed")
    return {"format": BANK_FORMAT, **{k: getattr(cfg, k) for k in keep}, "prompts": prompts, "arms": [asdict(a) for a in arms]}


def _read_state(path: Path, settings: dict) -> dict:
    if not path.is_file():
        return {"settings": settings, "cells": {}}
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"--out: cannot read the bank {path}: {e}") from None
    if json.loads(json.dumps(settings)) != state.get("settings"):
        raise UserError(f"--out: the bank in {path.parent} was built with other settings (model, prompts, arms, "
                        "samples, steps, reward, rating or bank seed); give another --out")
    return state


def build_bank(out: Path, cfg: TuneConfig, prompts: list[str], arms: list[Setting], sampler: CellSampler) -> Bank:
    """Sample, rate and judge every missing (prompt, arm) cell, writing each as it is done; returns the bank.

    ``sampler`` is a :data:`CellSampler` (:class:`ModelSampler`); its ``value_range`` attribute,
    when it has a finite one, is the rating's range, else the bank's lowest and highest rating.
    """
    from safetensors.numpy import save_file

    from rewardiff.sampling import progress_bar

    path = out / "bank" / "bank.json"
    state = _read_state(path, bank_settings(cfg, prompts, arms))
    todo = [(i, j) for i in range(len(prompts)) for j in range(len(arms)) if f"{i},{j}" not in state["cells"]]
    k = cfg.samples
    with progress_bar(len(prompts) * len(arms) * k, "bank") as bar:
        bar((len(prompts) * len(arms) - len(todo)) * k)
        for i, j in todo:
            t0 = time.perf_counter()
            images, ratings, judged = sampler(prompts[i], arms[j], [cfg.bank_seed + i * k + s for s in range(k)])
            if len(ratings) != k:
                raise RuntimeError(f"the bank's sampler gave {len(ratings)} ratings for {k} samples")
            atomic_write(out / "bank" / "cells" / f"p{i:03d}-a{j:02d}.safetensors",
                         lambda tmp: save_file({"images": np.ascontiguousarray(images, dtype=np.uint8)}, str(tmp)))
            state["cells"][f"{i},{j}"] = {"ratings": [float(r) for r in ratings], "judge": {n: float(v) for n, v in judged.items()},
                                          "seconds": time.perf_counter() - t0}
            atomic_write_text(path, json.dumps(state, indent=1))
            bar(k)
    vr = getattr(sampler, "value_range", None)
    known = vr is not None and all(map(math.isfinite, vr)) and vr[1] > vr[0]
    return _as_bank(state, prompts, arms, k, (float(vr[0]), float(vr[1])) if known else None)


def load_cell_images(out: Path, i: int, j: int) -> np.ndarray:
    """The bank images of prompt ``i`` and arm ``j``, uint8 [K, H, W, 3]."""
    from safetensors.numpy import load_file

    return load_file(str(out / "bank" / "cells" / f"p{i:03d}-a{j:02d}.safetensors"))["images"]


def _as_bank(state: dict, prompts: list[str], arms: list[Setting], k: int, value_range: tuple[float, float] | None) -> Bank:
    cells = [[state["cells"][f"{i},{j}"] for j in range(len(arms))] for i in range(len(prompts))]
    ratings = np.array([[c["ratings"] for c in row] for row in cells], dtype=float).reshape(len(prompts), len(arms), k)
    names = sorted(set.intersection(*(set(c["judge"]) for row in cells for c in row)))
    judge = {n: np.array([[c["judge"][n] for c in row] for row in cells]) for n in names}
    lo, hi = value_range or (float(ratings.min()), float(ratings.max()))  # no known range: the bank's own
    return Bank(prompts, arms, ratings, judge, (lo, hi if hi > lo else lo + 1.0), sum(c["seconds"] for row in cells for c in row))


# ----------------------------------------------------------------------------- the streams


class Stream(NamedTuple):
    """One stream of users, shared by every agent: who comes, which bank rating they give, the noise."""

    prompts: np.ndarray  # [T] the prompt index of each user
    draws: np.ndarray  # [T] which of the cell's K bank ratings the user gives
    noise: np.ndarray  # [T] Gaussian noise on the rating, the rating's units


def seed_of(seed: int, who: str) -> int:
    """An independent seed for ``who`` ("stream", an agent's name) from the stream seed: an agent seeded
    with the stream's own seed would draw its arms from the very numbers that drew the prompts."""
    return int(np.random.SeedSequence([seed, *who.encode()]).generate_state(1)[0])


def make_stream(seed: int, rounds: int, n_prompts: int, k: int, noise: float) -> Stream:
    rng = np.random.default_rng(seed_of(seed, "stream"))
    return Stream(rng.integers(n_prompts, size=rounds), rng.integers(k, size=rounds), noise * rng.standard_normal(rounds))


def make_agents(cfg: TuneConfig, arms: Arms, context_dim: int, seed: int) -> dict[str, Any]:
    """The agents compared, by name, seeded from the stream's seed (the private agents alike at every
    epsilon: the same landmarks and exploration arms, and noise differing only in scale). Their
    landmarks are drawn in the box [0, 1]^d of the contexts (one-hot prompt features lie in it)."""
    kernel = rbf(cfg.lengthscale) if cfg.kernel == "rbf" else matern(2.5, cfg.lengthscale)
    box = {"context_low": np.zeros(context_dim), "context_high": np.ones(context_dim)}
    agents: dict[str, Any] = {f"private eps={e:g}": (PrivateKernelBandit, {"explore_rounds": cfg.explore_rounds, "epsilon": e,
                                                                            "delta": cfg.delta, **box}) for e in cfg.epsilons}
    agents["gp-ucb"] = (GPUCB, {"horizon": cfg.rounds})
    agents["uniform"] = (UniformAgent, {})
    agents = {name: cls(arms, kernel, seed=seed_of(seed, name.split()[0]), **kw) for name, (cls, kw) in agents.items()}
    return agents


def to_unit(r: np.ndarray | float, value_range: tuple[float, float]) -> np.ndarray | float:
    """A rating mapped from its value range onto [-1, 1] (what the agents see; they clip beyond)."""
    lo, hi = value_range
    return 2.0 * (r - lo) / (hi - lo) - 1.0


def play(agent: Any, bank: Bank, contexts: np.ndarray, stream: Stream) -> np.ndarray:
    """Run ``agent`` on the stream; returns regret_t = max_a mean(p_t, a) - mean(p_t, a_t), [T]."""
    means = bank.means
    best = means.max(axis=1)
    regret = np.empty(len(stream.prompts))
    for t, (p, d, e) in enumerate(zip(stream.prompts, stream.draws, stream.noise)):
        a = agent.act(contexts[p])
        agent.update(contexts[p], a, float(to_unit(bank.ratings[p, a, d] + e, bank.value_range)))
        regret[t] = best[p] - means[p, a]
    return regret


def picks(agent: Any, contexts: np.ndarray, arms: Arms) -> np.ndarray:
    """The arm the agent's estimate ranks first for each prompt after the stream, [P]."""
    z = joint(contexts, arms.features)  # [P, A, d]
    return np.asarray(agent.predict(z)).argmax(axis=1)


def simple_regret(bank: Bank, chosen: np.ndarray) -> float:
    """Mean over prompts (users come uniformly) of max_a mean(p, a) - mean(p, chosen[p])."""
    means = bank.means
    return float((means.max(axis=1) - means[np.arange(len(chosen)), chosen]).mean())


def run_streams(cfg: TuneConfig, bank: Bank, contexts: np.ndarray, arms: Arms) -> dict[str, dict]:
    """Every agent on every stream seed: regret curves [S, T], picks [S, P], privacy spent [S]."""
    results: dict[str, dict] = {}
    for seed in cfg.seeds:
        stream = make_stream(seed, cfg.rounds, len(bank.prompts), cfg.samples, cfg.noise)
        for name, agent in make_agents(cfg, arms, contexts.shape[1], seed).items():
            r = results.setdefault(name, {"regret": [], "picks": [], "privacy": []})
            r["regret"].append(play(agent, bank, contexts, stream))
            r["picks"].append(picks(agent, contexts, arms))
            r["privacy"].append(agent.privacy_spent())
    return {name: {k: np.asarray(v) if k != "privacy" else v for k, v in r.items()} for name, r in results.items()}


def run_tune(cfg: TuneConfig, out: Path, sampler: CellSampler | None = None) -> dict:
    """Build (or resume) the bank, play every agent on every stream, write summary.json and report.html.

    ``sampler`` samples the bank's cells, default :class:`ModelSampler` (it needs a ``world``
    attribute: the world whose ``plugins.PROMPT_FEATURES`` turn the prompts into contexts).
    """
    from rewardiff.tune_report import summarize, write_tune_report

    check_config(cfg)
    settings = arm_grid(cfg)
    t0 = time.perf_counter()
    sampler = ModelSampler(cfg, settings) if sampler is None else sampler
    prompts, contexts = contexts_of(cfg, getattr(sampler, "world", None))
    t_load = time.perf_counter() - t0
    t0 = time.perf_counter()
    bank = build_bank(out, cfg, prompts, settings, sampler)
    t_bank = time.perf_counter() - t0
    arms = Arms(arm_features(settings), tuple(a.name for a in settings))
    t0 = time.perf_counter()
    results = run_streams(cfg, bank, contexts, arms)
    seconds = {"load": t_load, "bank_build": t_bank, "bank_sampling": bank.seconds, "streams": time.perf_counter() - t0}
    summary = summarize(cfg, bank, results, seconds)
    write_tune_report(out, cfg, bank, results, summary)
    return summary


def parse_list(text: str, kind: type, option: str) -> tuple:
    """``"0.5,1,2"`` -> ``(0.5, 1.0, 2.0)`` of ``kind`` (int, float or str); a UserError naming ``option``."""
    try:
        items = tuple(kind(x.strip()) for x in text.split(",") if x.strip())
    except ValueError:
        raise UserError(f"{option}: {text!r} is not a comma-separated list of {kind.__name__}s") from None
    if not items:
        raise UserError(f"{option}: empty list")
    return items
