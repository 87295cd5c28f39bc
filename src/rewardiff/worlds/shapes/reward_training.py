"""Training the shapes world's reward model (``rewardiff train-reward``): data, loop, evaluation, card.

The network, its rewards and its weights on disk are in :mod:`rewardiff.worlds.shapes.reward_model`.
"""


from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rewardiff.errors import UserError
from rewardiff.optim import warmup_cosine_schedule
from rewardiff.worlds.shapes import data as shapes

if TYPE_CHECKING:
    from rewardiff.worlds.shapes.reward_data import LabelledImages

from rewardiff.worlds.shapes.reward_model import (LABEL_SMOOTHING, LOG_FLOOR, N_COLOR, OTHER, ShapesRM, count_reward, num_params,
                                                 save_reward_model)


# ----------------------------------------------------------------------------- training


def _batch_tensors(data: LabelledImages, idx: np.ndarray, flip: np.ndarray | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """(images [b, 3, 32, 32] in [-1, 1], count [b], color [b, 4]) for rows ``idx`` of ``data``."""
    x = shapes.to_tensor(data.images[idx])
    if flip is not None:  # horizontal flips keep count and color
        x = torch.where(torch.from_numpy(flip)[:, None, None, None], x.flip(-1), x)
    return x, torch.from_numpy(data.count[idx]), torch.from_numpy(data.color[idx])


def _smoothed_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy against ``target`` (class ids [b] or distributions [b, K]) smoothed by 0.1."""
    k = logits.shape[-1]
    dist = F.one_hot(target, k).float() if target.dim() == 1 else target
    dist = dist * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / k
    return -(dist * logits.log_softmax(-1)).sum(-1).mean()


def _extra_data(
    images: Tensor | np.ndarray, rng: np.random.Generator, keep: float = 0.9
) -> tuple[LabelledImages, np.ndarray, LabelledImages | None]:
    """Judge-labelled extra images plus a degraded copy of each; (train, held-out) split."""
    from rewardiff.worlds.shapes import reward_data as data

    arr = data.as_uint8_images(images)
    order = rng.permutation(len(arr))
    cut = len(arr) if len(arr) < 20 else int(keep * len(arr))
    train, held = arr[order[:cut]], arr[order[cut:]]
    degraded = np.stack([data.degrade(im, rng) for im in train])
    labelled = data.judge_labels(train).concat(data.judge_labels(degraded))
    return labelled, order[cut:], (data.judge_labels(held) if len(held) else None)


def train_reward_model(
    out_dir: str | Path,
    steps: int = 600,
    seed: int = 0,
    extra_images: Tensor | np.ndarray | None = None,
    extra_prompts: list[str] | None = None,
    *,
    batch_size: int = 128,
    lr: float = 2e-3,
    pool_size: int = 24000,
    progress: bool = False,
    notes: dict | None = None,
) -> dict:
    """Train the shapes reward model and write ``model.safetensors`` + ``card.json`` to ``out_dir``.

    Training images (``shapes_rm_data``): clean world images of the training prompts (1/3),
    mixed-kind images (1/6) and degraded images of both (1/2), the last two labelled by the
    judge; plus ``extra_images`` (e.g. base-model samples, uint8 [N, H, W, 3] or float
    [N, 3, H, W] in [-1, 1]) labelled by the judge, each with a degraded copy. A quarter of
    every batch comes from the extras when there are any.

    Args:
        out_dir: where the weights and card go (atomic writes).
        steps: optimizer steps (AdamW, cosine learning-rate decay).
        seed: seeds data and initialization; the same seed gives the same model.
        extra_images: optional extra images, labelled by the judge.
        extra_prompts: optional prompts of ``extra_images``. 10 % of the extras (when there are
            20 or more) are held out and scored in the card; with prompts, the card also reports
            the mean count reward of held-out extras the judge reads as right and as wrong.
        batch_size: images per step.
        lr: peak learning rate.
        pool_size: world images generated up front, at most (fewer for short runs: a third of
            the images the run will see).
        progress: print the loss every 50 steps.
        notes: extra entries for the card (e.g. where the extra images came from).

    Returns:
        The card (also written to ``card.json``).
    """
    t0 = time.time()
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    pool = _world_pool(min(pool_size, max(steps * batch_size // 3, 192)) // 6, rng)
    extra, held_idx, extra_held = (None, None, None)
    if extra_images is not None and len(extra_images):
        if extra_prompts is not None and len(extra_prompts) != len(extra_images):
            raise UserError(f"{len(extra_images)} extra images but {len(extra_prompts)} extra prompts")
        extra, held_idx, extra_held = _extra_data(extra_images, rng)
    net = ShapesRM()
    net.train()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    sched = warmup_cosine_schedule(opt, steps, 20)
    for step in range(steps):
        loss = _train_step(net, opt, pool, extra, rng, batch_size)
        sched.step()
        if progress and (step + 1) % 50 == 0:
            print(f"step {step + 1}/{steps} loss {loss:.4f} ({time.time() - t0:.0f} s)", flush=True)
    net.eval()
    card = _card(net, steps, seed, batch_size, lr, len(pool), extra, time.time() - t0) | (notes or {})
    if extra_held is not None:
        held_prompts = [extra_prompts[i] for i in held_idx] if extra_prompts is not None else None
        card["eval"]["extra_held_out"] = _extra_report(net, extra_held, held_prompts)
    save_reward_model(net, out_dir, card)
    return card


BASE_SAMPLE_SEED = 50_000_000  # seeds of base-model samples used as training data


def base_model_samples(n: int, seed: int = 0, batch_size: int = 64) -> tuple[Tensor, list[str]]:
    """``n`` samples of the shipped shapes base model for training prompts, [n, 3, 32, 32] in [-1, 1].

    Half are drawn as fine-tuning draws them (15 DDIM steps, guidance scale 2), half with
    20 steps and no guidance, so the reward model sees both kinds of artefacts.
    """
    from rewardiff.worlds.shapes.denoiser import shapes_model

    try:
        model = shapes_model()
    except FileNotFoundError as e:
        raise UserError(f"no shipped shapes base model ({e}); run `rewardiff pretrain shapes` first") from None
    rng = np.random.default_rng(seed)
    pool = shapes.train_prompts()
    prompts = [pool[i] for i in rng.integers(0, len(pool), n)]
    seeds = [BASE_SAMPLE_SEED + seed * n + i for i in range(n)]
    half = n // 2
    a = model.generate(prompts[:half], seeds[:half], batch_size, num_inference_steps=15, guidance_scale=2.0)
    b = model.generate(prompts[half:], seeds[half:], batch_size, num_inference_steps=20, guidance_scale=1.0)
    return torch.cat([a, b]), prompts


def train_with_base_samples(out_dir: str | Path, steps: int, seed: int, n_samples: int, **options) -> dict:
    """Train the reward model on world images plus ``n_samples`` judge-labelled base-model samples.

    Args:
        out_dir: where ``model.safetensors`` and ``card.json`` go.
        steps: optimizer steps.
        seed: seeds sampling, data and initialization.
        n_samples: base-model samples to add (0: world images only).
        **options: passed on to :func:`train_reward_model`.

    Returns:
        The card.
    """
    if n_samples <= 0:
        return train_reward_model(out_dir, steps, seed, **options)
    images, prompts = base_model_samples(n_samples, seed)
    notes = {"extra_images_source": f"{n_samples} shapes base-model samples of training prompts, half at 15 DDIM "
             "steps with guidance 2, half at 20 steps without; labelled by the judge"}
    return train_reward_model(out_dir, steps, seed, images, prompts, notes=notes, **options)


def _world_pool(n: int, rng: np.random.Generator) -> LabelledImages:
    """6 n world images: 2 n clean, n mixed-kind, 2 n degraded clean and n degraded mixed-kind."""
    from rewardiff.worlds.shapes import reward_data as data

    prompts = shapes.train_prompts()
    parts = [
        data.clean_images(2 * n, rng, prompts), data.mixed_images(n, rng),
        data.degraded_images(2 * n, rng, prompts), data.degraded_images(n, rng, prompts, mixed=True),
    ]
    pool = parts[0]
    for p in parts[1:]:
        pool = pool.concat(p)
    return pool


def _train_step(
    net: ShapesRM, opt: torch.optim.Optimizer, pool: LabelledImages, extra: LabelledImages | None,
    rng: np.random.Generator, b: int,
) -> float:
    """One AdamW step on a batch drawn from the pool (and a quarter from the extras)."""
    n_extra = b // 4 if extra is not None else 0
    xs, counts, colors = [], [], []
    for src, k in ((pool, b - n_extra), (extra, n_extra)):
        if k:
            x, c, col = _batch_tensors(src, rng.integers(0, len(src), k), rng.random(k) < 0.5)
            xs.append(x), counts.append(c), colors.append(col)
    count_logits, color_logits = net(torch.cat(xs))
    loss = _smoothed_ce(count_logits, torch.cat(counts)) + _smoothed_ce(color_logits, torch.cat(colors))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss.detach())


# ----------------------------------------------------------------------------- evaluation

EVAL_SEED = 2_000_003  # evaluation images never share a generator state with training


@torch.no_grad()
def _probs(net: ShapesRM, images: np.ndarray, b: int = 500) -> tuple[Tensor, Tensor]:
    """Softmax outputs (count [N, 5], color [N, 4]) for uint8 images [N, 32, 32, 3]."""
    outs = [net(shapes.to_tensor(images[i : i + b])) for i in range(0, len(images), b)]
    return torch.cat([o[0] for o in outs]).softmax(-1), torch.cat([o[1] for o in outs]).softmax(-1)


def _scores(p: Tensor, target: Tensor) -> dict[str, float]:
    """Accuracy, mean probability of the true class and mean confidence (max probability).

    ``target`` is class ids [N] or distributions [N, K] (a prediction is right when it picks a
    class of largest target share; the true-class probability is the target-weighted one).
    """
    dist = F.one_hot(target, p.shape[1]).float() if target.dim() == 1 else target
    pred = p.argmax(1)
    right = dist.gather(1, pred[:, None])[:, 0] >= dist.max(1).values - 1e-6
    return {
        "accuracy": round(float(right.float().mean()), 4),
        "mean_p_true": round(float((p * dist).sum(1).mean()), 4),
        "mean_confidence": round(float(p.max(1).values.mean()), 4),
    }


def evaluate(net: ShapesRM, labelled: LabelledImages) -> dict:
    """Count and color scores on judge- or spec-labelled images (color only where objects exist)."""
    pc, pk = _probs(net, labelled.images)
    has = torch.from_numpy(labelled.count != OTHER) | torch.from_numpy(labelled.color.max(1) > 0.26)
    out = {"count": _scores(pc, torch.from_numpy(labelled.count))}
    out["color"] = _scores(pk[has], torch.from_numpy(labelled.color)[has])
    out["n"] = len(labelled)
    return out


@torch.no_grad()
def _separation(net: ShapesRM, labelled: LabelledImages, prompts_true: list[str], rng: np.random.Generator) -> dict[str, float]:
    """Mean shapes-count reward for the true prompt vs the same prompt with a wrong count."""
    x = shapes.to_tensor(labelled.images)
    wrong = []
    for p in prompts_true:
        s = shapes.parse_prompt(p)
        n = (s.count - 1 + int(rng.integers(1, 4))) % 4 + 1
        wrong.append(shapes.Spec(n, s.color, s.shape).prompt)
    return {
        "count_reward_true_prompt": round(float(count_reward(net, x, prompts_true).mean()), 4),
        "count_reward_wrong_count_prompt": round(float(count_reward(net, x, wrong).mean()), 4),
    }


def _card(
    net: ShapesRM, steps: int, seed: int, b: int, lr: float, n_pool: int, extra: LabelledImages | None, seconds: float
) -> dict:
    """The model card: training setup and held-out scores."""
    from rewardiff.worlds.shapes import reward_data as data

    rng = np.random.default_rng(EVAL_SEED + seed)
    held_prompts = [p for p in shapes.held_out_prompts() for _ in range(100)]
    specs = [shapes.parse_prompt(p) for p in held_prompts]
    clean = data.LabelledImages(
        np.stack([shapes.render(s, rng) for s in specs]),
        np.array([s.count - 1 for s in specs]), np.eye(N_COLOR, dtype=np.float32)[[s.color for s in specs]],
    )
    degraded = data.degraded_images(1000, rng, shapes.train_prompts() + shapes.held_out_prompts())
    return {
        "model": "shapes-rm", "params": num_params(net), "widths": list(net.widths),
        "count_classes": ["1", "2", "3", "4", "other (0 or >4)"], "color_classes": list(shapes.COLORS),
        "steps": steps, "seed": seed, "batch_size": b, "lr": lr, "label_smoothing": LABEL_SMOOTHING,
        "reward_log_floor": LOG_FLOOR, "padding_mode": "replicate",
        "train_images": {"world_clean_mixed_degraded": n_pool, "extra_with_degraded_copies": len(extra) if extra is not None else 0},
        "train_seconds": round(seconds, 1), "torch": torch.__version__,
        "eval": {
            "clean_held_out_prompts": {**evaluate(net, clean), **_separation(net, clean, held_prompts, rng)},
            "degraded_judge_labelled": evaluate(net, degraded),
        },
    }


@torch.no_grad()
def _extra_report(net: ShapesRM, held: LabelledImages, prompts: list[str] | None) -> dict:
    """Scores on held-out extra images; with prompts, also the mean reward where the judge says right or wrong."""
    scores = evaluate(net, held)
    if prompts is None:
        return scores
    asked = np.array([shapes.parse_prompt(p).count - 1 for p in prompts])
    r = count_reward(net, shapes.to_tensor(held.images), prompts).numpy()
    ok = held.count == asked
    scores["count_reward_judge_right"] = round(float(r[ok].mean()), 4) if ok.any() else None
    scores["count_reward_judge_wrong"] = round(float(r[~ok].mean()), 4) if (~ok).any() else None
    scores["judge_count_accuracy"] = round(float(ok.mean()), 4)
    return scores
