"""A differentiable reward for the GenEval grammar: a small CNN that reads what the judge reads.

``geneval-shapes`` (the judge's partial credit) is a black box: the methods that backpropagate
through a reward (draft, draft-k, draft-lv, alignprop, refl) cannot use it. ``geneval-shapes-rm``
is its learned, differentiable stand-in, built the way the field builds one (a reward model
trained on labelled images) and read, like every reward here, by the classical judge the
benchmarks never train on: the judge labels the training images, the reward model is what
fine-tuning climbs, and held-out compositions read by the judge say whether it was fooled.

Network: the shapes reward model's backbone (3x3 convolutions with replicate padding, batch
norm, SiLU at 32, 16 and 8 px), then a non-negative density map with one channel per
(colour, shape) of the world (4 x 3). A channel's sum is a real count of those objects; its
density-weighted mean position is where they are. Any group of channels (all colours of a
shape) is read the same way, from the summed density.

Reward of an image for a prompt (its :class:`~rewardiff.geneval.GenEvalSpec`), in the image of
flow_grpo's partial credit (:func:`rewardiff.geneval.partial_credit`), one term a requirement:

- count: P(the objects of the item's shape number exactly ``count``);
- colour (items that name one): P(exactly ``count`` of them in that colour);
- position: sigmoid(SHARPNESS x (along - across - MARGIN)), where ``along`` is the offset of
  the item's objects' centre from its target's centre in the relation's direction and
  ``across`` the offset across it (image widths): GenEval's rule asks the offset to lie within
  45 degrees of the direction, beyond a margin.

P(n = k) comes from an ordinal model on the real count n, P(n >= k) = sigmoid(s (n - k + 1/2))
with a learned sharpness s. The reward is the mean over the terms of log(0.02 + 0.98 p): 0 when
every requirement certainly holds, log 0.02 when none can, with a gradient everywhere.

Training data (:func:`training_images`), every image labelled by the judge's detections
(counts and box centres per colour and shape): renders of the grammar's training prompts,
scenes of 0 to 6 objects of random kinds, degraded versions of both (noise, blur, colour
jitter, smears, extra and missing objects: the shapes reward model's degradations), and
optionally samples of the ``shapes-geneval`` base model (``rewardiff train-reward shapes-geneval
--samples N``), where the judge's reading, not the prompt, is the label.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rewardiff.errors import UserError
from rewardiff.optim import warmup_cosine
from rewardiff.rewards.base import RewardFn
from rewardiff.worlds import WEIGHTS
from rewardiff.worlds.shapes import data as shapes
from rewardiff.worlds.shapes.reward_model import backbone, load_saved, ordinal_counts, save_reward_model

WEIGHTS_DIR = WEIGHTS / "shapes-geneval-rm"
LOG_FLOOR = math.log(0.02)
N_COLORS, N_SHAPES = len(shapes.COLORS), len(shapes.SHAPES)
MAX_COUNT = 5  # count classes 0..4 and "5 or more"
SIZE = shapes.SIZE
POSITION_SHARPNESS = 20.0  # per image width
POSITION_MARGIN = 0.05  # image widths


class GenEvalRM(nn.Module):
    """CNN: images [B, 3, 32, 32] in [-1, 1] -> densities [B, 4 colours, 3 shapes, 8, 8]."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 64)):
        super().__init__()
        self.widths = tuple(widths)
        self.features = backbone(self.widths)
        self.density_head = nn.Conv2d(self.widths[2], N_COLORS * N_SHAPES, 1)
        nn.init.constant_(self.density_head.bias, -5.0)
        self.log_sharpness = nn.Parameter(torch.tensor(0.5))

    def density(self, x: Tensor) -> Tensor:
        d = F.softplus(self.density_head(self.features(x)))
        return d.reshape(d.shape[0], N_COLORS, N_SHAPES, *d.shape[-2:])

    def forward(self, x: Tensor) -> Tensor:
        return self.density(x)

    @property
    def sharpness(self) -> Tensor:
        return self.log_sharpness.exp() * 4.0


def count_of(density: Tensor) -> Tensor:
    """The real count of a density [..., h, w] -> [...]."""
    return density.sum(dim=(-2, -1))


def centre_of(density: Tensor) -> Tensor:
    """The density-weighted mean position [..., 2] (x, y in image widths, y down) of [..., h, w]."""
    h, w = density.shape[-2:]
    ys = (torch.arange(h, device=density.device, dtype=density.dtype) + 0.5) / h
    xs = (torch.arange(w, device=density.device, dtype=density.dtype) + 0.5) / w
    mass = density.sum(dim=(-2, -1)).clamp_min(1e-6)
    cx = (density * xs).sum(dim=(-2, -1)) / mass
    cy = (density * ys[:, None]).sum(dim=(-2, -1)) / mass
    return torch.stack([cx, cy], dim=-1)


def count_log_probs(n: Tensor, sharpness: Tensor) -> Tensor:
    """log P(count = k) for k = 0..MAX_COUNT - 1 and log P(count >= MAX_COUNT): [..., MAX_COUNT + 1]."""
    return ordinal_counts(n, sharpness, MAX_COUNT)


def prob_exactly(n: Tensor, k: int, sharpness: Tensor) -> Tensor:
    return count_log_probs(n, sharpness)[..., min(k, MAX_COUNT)].exp()


_DIRECTIONS = {"left of": (-1.0, 0), "right of": (1.0, 0), "above": (-1.0, 1), "below": (1.0, 1)}


def position_prob(mine: Tensor, theirs: Tensor, relation: str) -> Tensor:
    """P(objects centred at ``mine`` [B, 2] stand ``relation`` of objects centred at ``theirs``)."""
    sign, axis = _DIRECTIONS[relation]
    offset = mine - theirs
    along = sign * offset[:, axis]
    across = offset[:, 1 - axis].abs()
    return torch.sigmoid(POSITION_SHARPNESS * (along - across - POSITION_MARGIN))


def requirement_probs(density: Tensor, sharpness: Tensor, spec) -> list[Tensor]:
    """The probability [B] of each requirement of ``spec`` (see the module docstring), in order."""
    terms = []
    centres: list[Tensor] = []
    for item in spec.include:
        s = shapes.SHAPES.index(item.cls)
        of_shape = density[:, :, s].sum(1)  # every colour [B, h, w]
        terms.append(prob_exactly(count_of(of_shape), item.count, sharpness))
        if item.color is not None:
            c = shapes.COLORS.index(item.color)
            terms.append(prob_exactly(count_of(density[:, c, s]), item.count, sharpness))
        centres.append(centre_of(of_shape))
        if item.position is not None:
            rel, target = item.position
            terms.append(position_prob(centres[-1], centres[target], rel))
    return terms


def verdicts(density: Tensor, sharpness: Tensor, specs) -> np.ndarray:
    """Whether every requirement of each prompt holds with p > 1/2: the reward model's GenEval verdicts [B]."""
    return np.array([all(float(p[0]) > 0.5 for p in requirement_probs(density[i : i + 1], sharpness, s)) for i, s in enumerate(specs)])


def geneval_reward_of(density: Tensor, sharpness: Tensor, specs) -> Tensor:
    """Mean over each prompt's requirements of log(0.02 + 0.98 p) [B]."""
    floor = math.log1p(-math.exp(LOG_FLOOR))
    out = []
    for i, spec in enumerate(specs):
        ps = torch.stack([p[0] for p in requirement_probs(density[i : i + 1], sharpness, spec)])
        out.append(torch.logaddexp(torch.tensor(LOG_FLOOR, dtype=ps.dtype, device=ps.device), ps.clamp_min(1e-12).log() + floor).mean())
    return torch.stack(out)


# ----------------------------------------------------------------------------- labels and data


def judge_labels(images: np.ndarray) -> tuple[Tensor, Tensor]:
    """What the judge reads in uint8 images [N, 32, 32, 3]: counts [N, 4, 3] (clipped at
    MAX_COUNT) and box-centre means [N, 4, 3, 2] in image widths (0 where there is none)."""
    from rewardiff.worlds.shapes.judge import detections

    counts = np.zeros((len(images), N_COLORS, N_SHAPES), np.int64)
    sums = np.zeros((len(images), N_COLORS, N_SHAPES, 2), np.float32)
    for i, img in enumerate(images):
        for d in detections(img):
            c, s = shapes.COLORS.index(d.color), shapes.SHAPES.index(d.cls)
            counts[i, c, s] += 1
            sums[i, c, s] += ((d.box[0] + d.box[2]) / 2 / SIZE, (d.box[1] + d.box[3]) / 2 / SIZE)
    centres = sums / np.maximum(counts, 1)[..., None]
    return torch.from_numpy(np.minimum(counts, MAX_COUNT)), torch.from_numpy(centres)


def _random_scene(rng: np.random.Generator) -> np.ndarray:
    """0 to 6 objects of random shapes and colours, placed as the grammar's scenes are."""
    from rewardiff.worlds.shapes import scenes

    k = int(rng.integers(0, 7))
    objects = [(int(rng.integers(N_SHAPES)), int(rng.integers(N_COLORS)), 0) for _ in range(k)]
    if not objects:
        return np.zeros((SIZE, SIZE, 3), np.uint8)
    masks = scenes._place(objects, rng, tries=200)
    while masks is None:
        objects = objects[:-1]
        masks = scenes._place(objects, rng, tries=200) if objects else []
    return scenes._paint(objects, masks, rng)


def training_images(n: int, seed: int, extra: np.ndarray | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """``n`` world images (plus ``extra`` uint8 images) in [-1, 1], with the judge's counts and centres."""
    from rewardiff.worlds.shapes import compositions, scenes
    from rewardiff.worlds.shapes.reward_data import degrade

    rng = np.random.default_rng(seed)
    prompts = scenes._draw_prompts(n, rng)
    out = []
    for p in prompts:
        u = rng.random()
        img = scenes.render(compositions.spec_of(p), rng) if u < 0.55 else _random_scene(rng)
        if rng.random() < 0.35:
            img = degrade(img, rng)
        out.append(img)
    images = np.stack(out) if extra is None else np.concatenate([np.stack(out), extra])
    counts, centres = judge_labels(images)
    return shapes.to_tensor(images), counts, centres


# ----------------------------------------------------------------------------- training


def _loss(net: GenEvalRM, x: Tensor, counts: Tensor, centres: Tensor) -> Tensor:
    d = net(x)
    s = net.sharpness
    per_kind = count_log_probs(count_of(d), s)  # [B, 4, 3, K]
    loss = -per_kind.gather(-1, counts[..., None])[..., 0].mean()
    of_shape = d.sum(1)  # [B, 3, h, w]
    shape_counts = counts.sum(1).clamp(max=MAX_COUNT)
    loss = loss - count_log_probs(count_of(of_shape), s).gather(-1, shape_counts[..., None])[..., 0].mean()
    present = counts > 0
    if present.any():
        loss = loss + 20.0 * (centre_of(d) - centres).pow(2).sum(-1)[present].mean()
    return loss


def train_reward_model(out: str | Path, steps: int = 2000, seed: int = 0, n_train: int = 6000, n_val: int = 600,
                       batch_size: int = 64, lr: float = 2e-3, extra: np.ndarray | None = None, notes: dict | None = None,
                       n_val_base: int = 0, progress: bool = True) -> dict:
    """Train on freshly rendered, judge-labelled images; save the weights and the card to ``out``
    (the card also read on ``n_val_base`` base-model samples: :func:`validate_on_samples`)."""
    from tqdm import tqdm

    torch.manual_seed(seed)
    x, y, c = training_images(n_train, seed, extra)
    net = GenEvalRM()
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-4)
    g = torch.Generator().manual_seed(seed)
    net.train()
    for step in tqdm(range(steps), disable=not progress, desc="train shapes-geneval-rm"):
        idx = torch.randint(0, len(x), (batch_size,), generator=g)
        xb, cb = x[idx], c[idx].clone()
        flip = torch.rand(batch_size, generator=g) < 0.5  # a mirrored image: x mirrored too
        xb = torch.where(flip[:, None, None, None], xb.flip(-1), xb)
        cb[..., 0] = torch.where(flip[:, None, None] & (y[idx] > 0), 1 - cb[..., 0], cb[..., 0])
        loss = _loss(net, xb, y[idx], cb)
        for group in opt.param_groups:
            group["lr"] = warmup_cosine(step, steps, 100, lr=lr)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    card = {"model": "shapes-geneval-rm", "steps": steps, "seed": seed, "train_images": len(x), **(notes or {}),
            **validate(net, n_val, seed + 10_000)}
    if n_val_base > 0:
        card.update(validate_on_samples(net, n_val_base, seed + 20_000))
    save_reward_model(net, out, card)
    return card


def validate(net: GenEvalRM, n: int, seed: int) -> dict:
    """Agreement with the judge on fresh world images: counts per (colour, shape), and the
    verdict (every requirement's p > 1/2 against GenEval's rules) on held-out prompts, on the
    images of their own prompts and on those of other prompts (where most verdicts are no)."""
    from rewardiff.geneval import check
    from rewardiff.worlds.shapes import compositions, scenes
    from rewardiff.worlds.shapes.judge import detections

    x, y, _ = training_images(n, seed)
    with torch.no_grad():
        d = torch.cat([net(x[i : i + 200]) for i in range(0, len(x), 200)])
        pred = count_log_probs(count_of(d), net.sharpness).argmax(-1)
    rng = np.random.default_rng(seed)
    held = compositions.held_out_prompts()
    prompts = [held[i] for i in rng.integers(0, len(held), size=n)]
    specs = [compositions.spec_of(p) for p in prompts]
    own = np.stack([scenes.render(s, rng) for s in specs])
    other = own[rng.permutation(n)]
    agree = {}
    for name, imgs in (("own", own), ("shuffled", other)):
        with torch.no_grad():
            dens = net(shapes.to_tensor(imgs))
            said = verdicts(dens, net.sharpness, specs)
        truth = [check(s, detections(im)) for s, im in zip(specs, imgs)]
        agree[f"val_verdict_agreement_held_out_{name}"] = float(np.mean(np.array(said) == np.array(truth)))
        agree[f"val_judge_yes_held_out_{name}"] = float(np.mean(truth))
    return {"val_counts_all_right": float((pred == y).all(-1).all(-1).float().mean()),
            "val_count_per_kind_right": float((pred == y).float().mean()), **agree}


def load(path: str | Path | None = None) -> GenEvalRM:
    d = Path(path) if path is not None else WEIGHTS_DIR
    file = d / "model.safetensors" if d.suffix != ".safetensors" else d
    return load_saved(GenEvalRM, file, f"GenEval reward model weights not found: {file}; train them with: rewardiff train-reward shapes-geneval")


def reward(net: GenEvalRM, x: Tensor, prompts: list[str]) -> Tensor:
    from rewardiff.worlds.shapes import compositions

    if x.dim() != 4 or x.shape[1] != 3:
        raise UserError(f"geneval-shapes-rm takes RGB images [B, 3, H, W]; got shape {tuple(x.shape)}")
    bad = [p for p in prompts if not compositions.is_prompt(p)]
    if bad:
        raise UserError(f"geneval-shapes-rm needs prompts of the GenEval grammar (geneval-train, geneval-held-out), got {bad[0]!r}")
    x = x.float()
    if x.shape[-2:] != (SIZE, SIZE):
        x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
    net = net.to(x.device)
    return geneval_reward_of(net(x), net.sharpness, [compositions.spec_of(p) for p in prompts])


def geneval_shapes_rm(path: str | Path | None = None) -> RewardFn:
    """Shapes world, GenEval grammar: the learned, differentiable stand-in for the judge's partial credit."""
    d = Path(path) if path is not None else WEIGHTS_DIR
    if not ((d / "model.safetensors").is_file() or d.is_file()):
        raise UserError(f"GenEval reward model weights not found in {d}; train them with: rewardiff train-reward shapes-geneval")
    return RewardFn("geneval-shapes-rm", True, (LOG_FLOOR, 0.0),
                    "shapes world, GenEval grammar: mean over the prompt's requirements of log(0.02 + 0.98 p), from the learned CNN",
                    lambda x, prompts: reward(load(path), x, prompts))


def base_model_samples(n: int, seed: int, prompts: list[str] | None = None) -> tuple[np.ndarray, list[str]]:
    """``n`` uint8 samples of the shipped ``shapes-geneval`` model (15 Euler steps, guidance 2)
    and their prompts: drawn from ``prompts`` (by default the grammar's training prompts)."""
    from rewardiff.models.registry import base_model
    from rewardiff.worlds.shapes import compositions
    from rewardiff.worlds.shapes.reward_data import as_uint8_images

    model = base_model("shapes-geneval")
    rng = np.random.default_rng(seed)
    pool = prompts or compositions.train_prompts()
    out, asked = [], []
    for i in range(0, n, 64):
        b = min(64, n - i)
        chosen = [pool[j] for j in rng.integers(0, len(pool), size=b)]
        with torch.no_grad():
            out.append(as_uint8_images(model.generate(chosen, [seed * 100_003 + i + j for j in range(b)], num_inference_steps=15,
                                                      guidance_scale=2.0)))
        asked += chosen
    return np.concatenate(out), asked


def validate_on_samples(net: GenEvalRM, n: int, seed: int) -> dict:
    """Where fine-tuning starts: ``n`` base-model samples of the held-out prompts. Spearman's rho
    of the reward with the judge's partial credit, and agreement of the verdicts."""
    from scipy.stats import spearmanr

    from rewardiff.geneval import check, partial_credit
    from rewardiff.worlds.shapes import compositions
    from rewardiff.worlds.shapes.judge import detections

    images, prompts = base_model_samples(n, seed, compositions.held_out_prompts())
    specs = [compositions.spec_of(p) for p in prompts]
    with torch.no_grad():
        dens = net(shapes.to_tensor(images))
        r = geneval_reward_of(dens, net.sharpness, specs).numpy()
        said = verdicts(dens, net.sharpness, specs)
    dets = [detections(im) for im in images]
    partial = np.array([partial_credit(s, d) for s, d in zip(specs, dets)])
    truth = np.array([check(s, d) for s, d in zip(specs, dets)])
    return {"val_base_samples": n, "val_base_spearman_with_partial_credit": float(spearmanr(r, partial).statistic),
            "val_base_verdict_agreement": float((said == truth).mean()), "val_base_judge_yes": float(truth.mean())}


def train_command(out_dir: str | Path, steps: int, seed: int, n_samples: int, **options) -> dict:
    """``rewardiff train-reward shapes-geneval``: world images plus ``n_samples`` judge-labelled base-model samples."""
    extra, notes = None, {}
    if n_samples > 0:
        extra = base_model_samples(n_samples, seed)[0]
        notes = {"extra_images_source": f"{n_samples} shapes-geneval samples of training prompts (15 Euler steps, guidance 2), labelled by the judge"}
    return train_reward_model(out_dir, steps=steps, seed=seed, extra=extra, notes=notes, n_val_base=256, **options)
