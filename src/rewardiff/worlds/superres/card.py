"""The card shipped beside the super-resolution model: data, training, loss, LR | SR | GT
triplets, and the judge's hallucination figures on the held-out scenes."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rewardiff.worlds.superres import data as sr

CARD_STEPS = 20  # DDIM steps of the card's samples
CARD_GUIDANCE = 1.0  # no classifier-free guidance: the input conditions the samples
CARD_TRIPLETS = 16  # LR | SR | GT triplets in samples.png


def measure(model_dir: Path) -> dict:
    """Judge figures of the model's samples of every held-out scene (fixed seeds), against the
    ground truth and the input alone, with the bicubic upsampling's for comparison; writes
    ``samples.png`` (rows of LR | SR | GT triplets)."""
    from rewardiff.prompts import EVAL_SEED
    from rewardiff.report import save_grid
    from rewardiff.worlds.superres.judge import judge, judge_images, judge_low_res, psnr, summary
    from rewardiff.worlds.superres.model import shapes_sr_model

    model = shapes_sr_model(model_dir)
    prompts = sr.held_out_prompts()
    keys = [p.partition(":")[2] for p in prompts]
    images = model.generate(prompts, [EVAL_SEED + i for i in range(len(prompts))], num_inference_steps=CARD_STEPS,
                            guidance_scale=CARD_GUIDANCE)
    truth = torch.stack([sr.ground_truth(k) for k in keys])
    low = torch.stack([sr.upsample(sr.low_res(k)[None], "nearest")[0] for k in keys])
    bicubic = torch.stack([sr.upsample(sr.low_res(k)[None])[0] for k in keys])
    res = {**summary(judge(images, prompts)), "psnr": float(psnr(images, truth).mean()),
           "low_res_judge_rate": summary(judge_low_res(images, prompts))["hallucination_rate"],
           "bicubic_hallucination_rate": summary(judge_images(bicubic, truth))["hallucination_rate"],
           "bicubic_psnr": float(psnr(bicubic, truth).mean())}
    n = CARD_TRIPLETS
    grid = torch.stack([low[:n], images[:n], truth[:n]], dim=1).flatten(0, 1)  # LR, SR, GT of each scene
    save_grid(grid, model_dir / "samples.png", nrow=6)
    return res


def write_card(model_dir: Path, train_dir: Path) -> dict:
    """Measure the model in ``model_dir`` and write ``card.json`` and ``card.md`` there."""
    from rewardiff.report import training_tail

    cfg = json.loads((train_dir / "config.json").read_text())
    card = {
        "data": f"super-resolution world: {sr.OBJECTS[0]}-{sr.OBJECTS[1]} shapes of any kind and colour, some small "
        f"and some near-touching, 32x32; inputs blurred (sigma {sr.BLUR_SIGMA} px), 4x downsampled to 8x8, noise std {sr.NOISE}; "
        f"training scenes train/0..{sr.TRAIN_KEYS - 1}, judged on held-out/0..{sr.HELD_OUT_SIZE - 1}",
        "training": cfg,
        **training_tail(train_dir),
        "sampler": f"DDIM eta 0, {CARD_STEPS} steps, guidance {CARD_GUIDANCE}",
        **measure(model_dir),
    }
    (model_dir / "card.json").write_text(json.dumps(card, indent=2))
    lines = ["# shapes-sr super-resolution model (8x8 -> 32x32)", "", f"- data: {card['data']}",
             f"- model: diffusers UNet2DConditionModel, 6 input channels (noisy image, {cfg['upsample']}-upsampled input), "
             "Gaussian process, v-prediction, cosine schedule, zero terminal SNR",
             f"- training: {json.dumps(cfg)}",
             f"- steps: {card['steps_done']}, mean loss over the last 200 steps: {card['final_loss_mean_last_200']:.4f}",
             f"- sampler: {card['sampler']}",
             f"- reproduce: rewardiff pretrain shapes-sr --steps {card['steps_done']} --seed {cfg['seed']}",
             f"- held-out hallucination rate (images with at least one): {card['hallucination_rate']:.1%}; "
             f"mean count {card['hallucination_count']:.3f}",
             "- per type (mean a image): " + ", ".join(f"{k.removeprefix('hallucination_')} {v:.3f}" for k, v in card.items()
                                                   if k.startswith("hallucination_") and k not in ("hallucination_rate", "hallucination_count")),
             f"- PSNR to the ground truth: {card['psnr']:.2f} dB (bicubic upsampling: {card['bicubic_psnr']:.2f} dB, "
             f"hallucination rate {card['bicubic_hallucination_rate']:.1%})",
             f"- low-resolution judge's rate (output degraded vs input): {card['low_res_judge_rate']:.1%}",
             "", "Judge: rewardiff.worlds.superres.judge (the shapes world's classical detection, matched by position).",
             "", "Samples: rows of LR (nearest) | SR | GT triplets, two a row.", "", "![samples](samples.png)", ""]
    (model_dir / "card.md").write_text("\n".join(lines))
    return card
