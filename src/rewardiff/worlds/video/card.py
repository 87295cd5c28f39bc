"""The card shipped beside the video model: data, training, loss, a grid of frames, judge accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from rewardiff.worlds.video import data as video

CARD_STEPS = 15  # DDIM steps used for the card's samples
CARD_GUIDANCE = 2.0  # classifier-free guidance scale used for the card's samples
CARD_PER_HELD_OUT = 6  # samples of each held-out prompt (8 prompts: 48 clips)
CARD_TRAIN = 48  # training prompts sampled once each (every fourth of the list: a spread of counts, colours, directions)
GRID_CLIPS = 16  # clips in samples.png, one row each, its frames left to right


def frames_grid(clips: Tensor, path: Path, labels: list[str] | None = None) -> Path:
    """Save clips [N, 3, F, H, W] in [-1, 1] as a PNG with one row a clip and one column a
    frame (``labels``: one per clip, under its first frame)."""
    from rewardiff.report import save_grid

    n, _, f = clips.shape[:3]
    frames = clips.permute(0, 2, 1, 3, 4).reshape(n * f, *clips.shape[1:2], *clips.shape[3:])
    cell_labels = [lab if k == 0 else None for lab in labels for k in range(f)] if labels else None
    return save_grid(frames, path, nrow=f, labels=cell_labels)


def measure(model_dir: Path) -> dict:
    """Judge accuracy of the model's samples on held-out and training prompts (fixed seeds)."""
    from rewardiff.prompts import EVAL_SEED
    from rewardiff.worlds.video.denoiser import video_model
    from rewardiff.worlds.video.judge import judge

    model = video_model(model_dir)
    res: dict = {}
    pools = (("held_out", [p for p in video.held_out_prompts() for _ in range(CARD_PER_HELD_OUT)]),
             ("train", video.train_prompts()[::4][:CARD_TRAIN]))
    for name, prompts in pools:
        seeds = [EVAL_SEED + i for i in range(len(prompts))]
        clips = model.generate(prompts, seeds, batch_size=16, num_inference_steps=CARD_STEPS, guidance_scale=CARD_GUIDANCE)
        verdict = judge(clips, prompts)
        for k, v in verdict.items():
            res[f"judge_{k}_{name}"] = float(v.mean())
        if name == "held_out":
            pick = list(range(0, len(prompts), CARD_PER_HELD_OUT)) + list(range(1, len(prompts), CARD_PER_HELD_OUT))
            pick = pick[:GRID_CLIPS]
            labels = [f"{'ok' if verdict['all_ok'][i] else 'x'} {prompts[i]}" for i in pick]
            frames_grid(clips[pick], model_dir / "samples.png", labels)
    return res


def write_card(model_dir: Path, train_dir: Path) -> dict:
    """Measure the model in ``model_dir`` and write ``card.json`` and ``card.md`` there."""
    from rewardiff.report import training_tail
    from rewardiff.worlds.video.denoiser import NAME

    cfg = json.loads((train_dir / "config.json").read_text())
    tail = training_tail(train_dir, ("loss", "seconds"))
    card = {
        "data": f"procedural moving-shapes video world: 1-4 shapes of one kind and colour moving together left, right, "
        f"up or down and bouncing at the border, {cfg.get('frames', video.FRAMES)} frames of 32x32, "
        f"{len(video.train_prompts())} training prompts, held out: {', '.join(video.held_out_prompts())}",
        "training": cfg,
        "steps_done": tail["steps_done"],
        "final_loss_mean_last_200": tail["final_loss_mean_last_200"],
        "seconds_per_step": tail["final_seconds_mean_last_200"],
        "sampler": f"DDIM eta 0, {CARD_STEPS} steps, guidance {CARD_GUIDANCE}",
        "chance": {"count": 0.25, "color": 0.25, "direction": 0.25},
        **measure(model_dir),
    }
    (model_dir / "card.json").write_text(json.dumps(card, indent=2))
    lines = [f"# {NAME} base model (UNet3DConditionModel, pixel space, v-prediction)", "", f"- data: {card['data']}",
             f"- training: {json.dumps(cfg)}",
             f"- steps: {card['steps_done']}, mean loss over the last 200 steps: {card['final_loss_mean_last_200']:.4f} "
             f"({card['seconds_per_step']:.1f} s a step on one CPU core)",
             f"- sampler: {card['sampler']}",
             f"- reproduce: rewardiff pretrain {NAME} --steps {card['steps_done']} --seed {cfg['seed']}"]
    lines += [f"- {k.replace('_', ' ')}: {v:.1%}" for k, v in card.items() if k.startswith("judge_")]
    lines += ["", f"Judge: the classical reader of rewardiff.worlds.video.judge ({CARD_PER_HELD_OUT} samples of each held-out "
              f"prompt, {CARD_TRAIN} training prompts once each); chance is 25% for count, colour and direction.",
              "", "Samples: one row a held-out clip, frames left to right (ok: every verdict holds).",
              "", "![samples](samples.png)", ""]
    (model_dir / "card.md").write_text("\n".join(lines))
    return card
