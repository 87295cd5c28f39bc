"""Model soups: weight interpolation between two fine-tuned models of the same base.

AlignProp (Prabhudesai et al. 2023, arXiv 2310.03739, section 5) mixes two models fine-tuned
on different rewards by interpolating their weights, theta(alpha) = (1 - alpha) theta_A +
alpha theta_B, which trades one reward for the other without training again. Here the
trainable tensors are interpolated (the LoRA factors for LoRA runs, every weight for full
fine-tuning); alpha = 0 is model A exactly and alpha = 1 model B exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.finetune.config import FinetuneConfig, build_config
from rewardiff.finetune.weights import weights_dir

_SAME = ("model", "lora_rank", "lora_alpha")  # what two soup ingredients must share


def _read(directory: Path) -> tuple[FinetuneConfig, dict[str, Tensor]]:
    from safetensors.torch import load_file

    return build_config(json.loads((directory / "finetune.json").read_text())), load_file(str(directory / "trainable.safetensors"))


def interpolate(a: dict[str, Tensor], b: dict[str, Tensor], alpha: float) -> dict[str, Tensor]:
    """(1 - alpha) a + alpha b, tensor by tensor; alpha 0 and 1 return exact copies of a and b."""
    if alpha == 0.0:
        return {k: v.clone() for k, v in a.items()}
    if alpha == 1.0:
        return {k: v.clone() for k, v in b.items()}
    return {k: torch.lerp(a[k].float(), b[k].float(), alpha).to(a[k].dtype) for k in a}


def ingredients(a: str | Path, b: str | Path) -> tuple[FinetuneConfig, dict[str, Tensor], FinetuneConfig, dict[str, Tensor]]:
    """Both models' configs and trainable tensors, checked to be interpolable."""
    cfg_a, wa = _read(weights_dir(a))
    cfg_b, wb = _read(weights_dir(b))
    for field in _SAME:
        if getattr(cfg_a, field) != getattr(cfg_b, field):
            raise UserError(f"cannot mix {a} and {b}: their {field!r} differs ({getattr(cfg_a, field)!r} vs {getattr(cfg_b, field)!r})")
    if set(wa) != set(wb) or any(wa[k].shape != wb[k].shape for k in wa):
        raise UserError(f"cannot mix {a} and {b}: their trainable tensors differ in names or shapes")
    return cfg_a, wa, cfg_b, wb


def soup_model(a: str | Path, b: str | Path, alpha: float):
    """The interpolated model as a DiffusionModel (weights in memory) and its config."""
    from rewardiff.finetune.weights import attach_lora
    from rewardiff.models.registry import base_model

    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"alpha must be in [0, 1], got {alpha}")
    cfg_a, wa, _, wb = ingredients(a, b)
    model = base_model(cfg_a.model)
    attach_lora(model, cfg_a.lora_rank, cfg_a.lora_alpha)
    params = dict(model.net.named_parameters())
    with torch.no_grad():
        for k, v in interpolate(wa, wb, alpha).items():
            params[k].copy_(v)
    model.net.eval()
    return model, cfg_a


def write_soup(a: str | Path, b: str | Path, alpha: float, out: str | Path) -> Path:
    """Write the soup as a fine-tuned model folder (loadable like any run's ``final/``)."""
    from rewardiff.finetune.weights import save_weights
    from rewardiff.io import atomic_write_text

    model, cfg = soup_model(a, b, alpha)
    d = Path(out)
    save_weights(d, model.net, cfg)
    atomic_write_text(d / "soup.json", json.dumps({"a": str(a), "b": str(b), "alpha": alpha}, indent=2))
    return d


@torch.no_grad()
def _measure(model, cfg: FinetuneConfig, names: tuple[str, ...], fns: list, prompts: list[str], seeds: list[int]) -> dict:
    """Held-out rewards (one sampling pass scored by every reward), the worlds' judges and diversity."""
    from rewardiff.finetune.evaluate import world_evaluations
    from rewardiff.report import diversity_by_prompt

    images = model.generate(prompts, seeds, num_inference_steps=cfg.num_inference_steps, guidance_scale=cfg.guidance_scale)
    row = {n: float(torch.cat([fn(images[i : i + 64], prompts[i : i + 64]) for i in range(0, len(images), 64)]).mean())
           for n, fn in zip(names, fns)}
    row["diversity"] = diversity_by_prompt(images, prompts)
    row.update(world_evaluations(model, images, prompts).metrics)
    return row


def soup_curve(a: str | Path, b: str | Path, out: str | Path, *, points: int = 5, rewards: tuple[str, str] | None = None,
               samples: int = 96, progress: bool = True) -> dict:
    """Both rewards (and the judge, on shapes prompts) on the held-out set along alpha in [0, 1].

    ``rewards`` defaults to the two runs' own rewards. Writes ``soup_curve.json`` and
    ``soup_curve.png`` into ``out`` and returns the table.
    """
    from tqdm import tqdm

    from rewardiff.prompts import eval_set, prompt_set
    from rewardiff.rewards import get_reward

    if points < 2:
        raise UserError(f"points must be at least 2, got {points}")
    cfg_a, _, cfg_b, _ = ingredients(a, b)
    names = tuple(dict.fromkeys(rewards or (cfg_a.reward, cfg_b.reward)))
    fns = [get_reward(n) for n in names]
    prompts, seeds = eval_set(prompt_set(cfg_a.eval_prompts), samples)
    rows = []
    for alpha in tqdm([i / (points - 1) for i in range(points)], desc="soup", disable=not progress):
        model, cfg = soup_model(a, b, alpha)
        rows.append({"alpha": alpha, **_measure(model, cfg, names, fns, prompts, seeds)})
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    table = {"a": str(a), "b": str(b), "rewards": list(names), "samples": samples, "rows": rows}
    (d / "soup_curve.json").write_text(json.dumps(table, indent=2))
    plot_soup(rows, names, d / "soup_curve.png")
    return table


def plot_soup(rows: list[dict], names: tuple[str, ...], path: Path) -> Path:
    """Left: each reward along alpha (own axis each); right: reward A against reward B, points labelled by alpha."""
    from rewardiff.report.plots import _new_figure, _save_png

    alphas = [r["alpha"] for r in rows]
    fig = _new_figure(10, 4)
    left, right = fig.subplots(1, 2)
    axes = [left, left.twinx()] if len(names) > 1 else [left]
    for ax, name, color in zip(axes, names, ("tab:blue", "tab:orange")):
        ax.plot(alphas, [r[name] for r in rows], "o-", color=color)
        ax.set_ylabel(name, color=color)
    left.set_xlabel("alpha (0 = model A, 1 = model B)")
    left.set_title("held-out rewards along the soup")
    if len(names) > 1:
        xs, ys = [r[names[0]] for r in rows], [r[names[1]] for r in rows]
        right.plot(xs, ys, "o-", color="tab:green")
        for x, y, al in zip(xs, ys, alphas):
            right.annotate(f"{al:.2f}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        right.set_xlabel(names[0])
        right.set_ylabel(names[1])
        right.set_title("the trade-off (labels: alpha)")
    else:
        right.axis("off")
    return _save_png(fig, path)
