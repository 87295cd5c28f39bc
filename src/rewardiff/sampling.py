"""``rewardiff sample``: sample a model to a directory, scored by a reward when given."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np

from rewardiff.errors import UserError
from rewardiff.io import atomic_write_text
from rewardiff.types import AUTOREGRESSIVE, Generator


DEFAULT_GUIDANCE_SCALE = 2.0  # classifier-free guidance of conditional models when none is given
DEFAULT_PROMPT = "two red circles"  # what is sampled when no prompt is given
GRID_COLUMNS = 16  # the most samples in a row of grid.png


def load_model(model: str, checkpoint: Path | None = None) -> Generator:
    """The base model by name, or the fine-tuned model in ``checkpoint``."""
    from rewardiff.finetune.weights import load_finetuned
    from rewardiff.models.registry import base_model

    if checkpoint is not None:
        return load_finetuned(checkpoint)
    return base_model(model)


def resolve_guidance_scale(m: Generator, guidance_scale: float | None) -> float:
    """The classifier-free guidance scale to sample ``m`` with: the one given, or by default
    2 for a conditional model and 1 (none) for an unconditional one.

    Raises:
        UserError: a scale other than 1 given for an unconditional model, which has no
            prompts to guide by.
    """
    if m.conditional:
        return DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    if guidance_scale is not None and guidance_scale != 1.0:
        raise UserError(f"--guidance-scale {guidance_scale:g} does not apply: model {m.name!r} is unconditional "
                        "(no prompts to guide by); leave --guidance-scale out")
    return 1.0


def gather_prompts(prompts: list[str] | None, prompts_file: Path | None = None) -> list[str]:
    """The prompts to sample: those given one by one, then those of ``prompts_file`` (see
    :func:`~rewardiff.prompts.read_prompt_file`); :data:`DEFAULT_PROMPT` when there are none."""
    from rewardiff.prompts import read_prompt_file

    out = list(prompts or []) + (read_prompt_file(prompts_file) if prompts_file is not None else [])
    return out or [DEFAULT_PROMPT]


def parse_options(items: list[str] | None, flag: str = "--option") -> dict[str, Any]:
    """``["alpha=0.1", "final=sample"]`` -> ``{"alpha": 0.1, "final": "sample"}`` (ints, floats,
    true/false and inf are typed; anything else stays a string)."""
    out: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key.isidentifier():
            raise UserError(f"{flag} must look like key=value, got {item!r}")
        val: Any = raw.strip()
        low = val.lower()
        if low in ("true", "false"):
            val = low == "true"
        else:
            for conv in (int, float):
                try:
                    val = conv(val)
                    break
                except ValueError:
                    pass
        out[key] = val
    return out


def sample_to_dir(out: Path, model: str, checkpoint: Path | None, prompts: list[str], n: int, seed: int,
                  reward: str | None, steps: int, guidance_scale: float | None, eta: float | None, method: str = "base",
                  width: int | None = None, nfe_budget: int | None = None, value: Path | None = None,
                  options: dict[str, Any] | None = None) -> dict:
    """Sample with ``method`` and write ``grid.png``, ``samples/NNNN.png`` and ``summary.json`` into ``out``
    (for a model of text outputs, e.g. molecules, ``samples.txt`` instead of the images, and
    for a world that draws its texts, e.g. molecules, ``grid.png`` of their drawings). The
    samples are scored before anything is written, so a reward that fails leaves no folder.

    The summary holds ``nfe`` (denoiser evaluations, classifier-free guidance counting 2),
    ``nfe_per_sample``, with a reward ``reward_mean`` and ``reward_std``, and for text outputs
    ``texts``. An unconditional model samples with "" for every prompt and no classifier-free
    guidance (``guidance_scale`` None; see :func:`resolve_guidance_scale`). An autoregressive
    model (``molecules-ar``, ``hf:DIR``) samples with ``base`` or ``best-of-n``
    (:func:`~rewardiff.guidance.sample.token_sample`), one net evaluation per token: ``steps``
    and ``eta`` do not apply to it.
    """
    from rewardiff.guidance import budget_plan, make_method
    from rewardiff.rewards.value import load_value
    from rewardiff.finetune.config import MAX_SEED
    from rewardiff.rewards import get_reward
    from rewardiff.report.strict import write_json
    from rewardiff.rewards.guard import GuardedReward

    if n < 1:
        raise UserError(f"-n must be at least 1, got {n}")
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    if eta is not None and not 0 <= eta <= 1:
        raise UserError(f"--eta must be in [0, 1], got {eta}")
    if guidance_scale is not None and not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise UserError(f"--guidance-scale must be a number >= 0, got {guidance_scale}")
    if not 0 <= seed <= MAX_SEED - n * max(1, len(prompts)):
        raise UserError(f"--seed must be between 0 and {MAX_SEED - n * max(1, len(prompts))} (one seed a sample, below 2**32), got {seed}")
    if width is not None and nfe_budget is not None:
        raise UserError("give --width or --nfe-budget, not both")
    reward_fn = GuardedReward(get_reward(reward)) if reward else None
    value_fn = load_value(value) if value is not None else None
    meth = make_method(method, reward_fn, width=width, seed=seed, value=value_fn, **(options or {}))
    m = load_model(model, checkpoint)
    guidance_scale = resolve_guidance_scale(m, guidance_scale)
    if not m.conditional:  # prompts mean nothing to it
        prompts = [""] * len(prompts)
    tokens = AUTOREGRESSIVE in m.capabilities
    meth.fits(m)
    if nfe_budget is not None:  # an autoregressive model takes L steps, one a token
        budget_plan(meth, nfe_budget, m.max_len if tokens else steps, guidance_scale)
    meth.check(meth.default_eta if eta is None else eta, None if tokens else m.process)
    if getattr(m, "check_prompts", None) is not None:  # e.g. a text encoder that knows its own words only
        m.check_prompts(prompts)
    all_prompts = [p for p in prompts for _ in range(n)]
    x, info = _sample(m, meth, all_prompts, [seed + i for i in range(len(all_prompts))], steps, guidance_scale, eta)
    summary: dict = {"prompts": prompts, "n": len(all_prompts), **info}
    if nfe_budget is not None:
        summary["nfe_budget"] = nfe_budget
    if reward_fn is not None:
        with torch.no_grad():
            r = reward_fn(x, all_prompts)
        summary.update(reward=reward, reward_mean=float(r.mean()), reward_std=float(r.std()) if len(r) > 1 else 0.0)
    _write_samples(out, m, x, prompts, n, summary)
    write_json(out / "summary.json", summary)  # strict JSON: null where a value is NaN or infinite
    return summary


def _sample(m: Generator, meth: Any, prompts: list[str], seeds: list[int], steps: int,
            guidance_scale: float, eta: float | None) -> tuple[torch.Tensor, dict]:
    """Outputs [N, ...] (images in [-1, 1], or token ids) and the sampler's info, with a progress bar."""
    from rewardiff.guidance import guided_sample
    from rewardiff.guidance.sample import token_sample

    with progress_bar(len(prompts), f"sampling ({meth.name})") as bar:
        if AUTOREGRESSIVE in m.capabilities:
            return token_sample(m, meth, seeds, progress=bar)
        return guided_sample(m, meth, prompts, seeds, steps, guidance_scale=guidance_scale, eta=eta, progress=bar)


def _write_samples(out: Path, m: Generator, x: torch.Tensor, prompts: list[str], n: int, summary: dict) -> None:
    """Text outputs: ``samples.txt`` (and ``texts`` in the summary), molecules drawn in ``grid.png``;
    images: ``samples/NNNN.png`` and ``grid.png`` (one prompt a row, see :func:`prompt_grid`);
    videos: the same with each sample a filmstrip of its frames, plus ``samples/NNNN.gif``."""
    from PIL import Image

    from rewardiff import plugins
    from rewardiff.report import save_grid
    from rewardiff.report.grid import to_uint8_hwc

    out.mkdir(parents=True, exist_ok=True)
    if m.texts is not None:
        summary["texts"] = m.texts(x)
        atomic_write_text(out / "samples.txt", "\n".join(summary["texts"]) + "\n")
        if getattr(m, "world", None) in plugins.TEXT_GRIDS:  # e.g. molecules drawn from their SMILES, 48 at most
            plugins.load(plugins.TEXT_GRIDS[m.world])(summary["texts"][:48], out / "grid.png")
        return
    (out / "samples").mkdir(exist_ok=True)
    for i, im in enumerate(to_uint8_hwc(x)):  # any [-1, 1] RGB batch (videos: filmstrips)
        Image.fromarray(im).save(out / "samples" / f"{i:04d}.png")
    if x.dim() == 5:  # videos [N, C, F, H, W]: each also as an animated GIF
        from rewardiff.report.grid import save_gif

        for i, v in enumerate(x):
            save_gif(v, out / "samples" / f"{i:04d}.gif")
    cells, labels, columns = prompt_grid(x, prompts, n)
    save_grid(cells, out / "grid.png", nrow=columns, labels=labels)


def prompt_grid(images: torch.Tensor, prompts: list[str], n: int, columns: int = GRID_COLUMNS) -> tuple[np.ndarray, list[str | None] | None, int]:
    """The cells of ``grid.png`` [C, H, W, 3] uint8, their labels and the columns a row.

    ``images`` hold ``n`` samples of each prompt in turn. Each prompt takes its own row of ``n``
    (``n`` > ``columns``: as many rows of ``columns`` as it needs, the last padded with blank
    cells), so that no row mixes two prompts, and the first cell of each row is labelled with
    its prompt (no labels when every prompt is "", an unconditional model's).
    """
    import numpy as np

    from rewardiff.report.grid import BACKGROUND, to_uint8_hwc

    arr = to_uint8_hwc(images)  # [P n, H, W, 3]
    assert len(arr) == len(prompts) * n, (len(arr), len(prompts), n)
    cols = min(n, columns)
    span = -(-n // cols) * cols  # cells of one prompt: whole rows
    blank = np.full(arr.shape[1:], BACKGROUND, dtype=np.uint8)
    cells = [c for k in range(len(prompts)) for c in [*arr[k * n : (k + 1) * n], *[blank] * (span - n)]]
    labels = [p if j % cols == 0 else None for p in prompts for j in range(span)] if any(prompts) else None
    return np.stack(cells), labels, cols


class progress_bar:
    """A tqdm bar on a terminal (silent otherwise); ``bar(k)`` advances it by k."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.bar = total, desc, None

    def __enter__(self):
        import sys

        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total, desc=self.desc, unit="sample")
        return self

    def __call__(self, k: int) -> None:
        if self.bar is not None:
            self.bar.update(k)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False
