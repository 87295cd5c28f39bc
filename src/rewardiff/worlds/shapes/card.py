"""The card shipped beside a base model: data, training, loss, samples, judge accuracy."""

from __future__ import annotations

import json
from pathlib import Path

from rewardiff.worlds.shapes import data as shapes

CARD_STEPS = 15  # DDIM steps used for the card's samples
CARD_GUIDANCE = 2.0  # classifier-free guidance scale used for the card's samples
CARD_GENEVAL_PER_PROMPT = 4  # samples of each GenEval held-out prompt (26 prompts: 104 images; a coarse figure)


def measure(model_dir: Path, n_per_prompt: int = 16) -> dict:
    """Judge accuracy of the model's samples on held-out and training prompts (fixed seeds)."""
    from rewardiff.prompts import EVAL_SEED
    from rewardiff.worlds.shapes.denoiser import shapes_model
    from rewardiff.report import save_grid
    from rewardiff.worlds.shapes.judge import accuracy

    model = shapes_model(model_dir)
    res: dict = {}
    for name, pool in (("held_out", shapes.held_out_prompts()), ("train", shapes.train_prompts())):
        prompts = [p for p in pool for _ in range(n_per_prompt)]
        seeds = [EVAL_SEED + i for i in range(len(prompts))]
        images = model.generate(prompts, seeds, num_inference_steps=CARD_STEPS, guidance_scale=CARD_GUIDANCE)
        for k, v in accuracy(images, prompts).items():
            res[f"judge_{k}_{name}"] = v
        if name == "held_out":
            save_grid(images[::2][:48], model_dir / "samples.png", nrow=8)
    if model.net.config.prompts == "geneval":
        from rewardiff.worlds.shapes.geneval_suite import card_measure

        res.update(card_measure(model, CARD_GENEVAL_PER_PROMPT, CARD_STEPS, CARD_GUIDANCE, EVAL_SEED))
    return res


def write_card(model_dir: Path, train_dir: Path) -> dict:
    """Measure the model in ``model_dir`` and write ``card.json`` and ``card.md`` there."""
    cfg = json.loads((train_dir / "config.json").read_text())
    from rewardiff.report import training_tail

    flow = cfg.get("process", "gaussian") == "flow"
    name = "shapes-flow" if flow else "shapes"
    geneval = cfg.get("prompts", "count") == "geneval"
    card = {
        "data": _geneval_data() if geneval else "procedural shapes world: 1-4 shapes of one kind and color, 32x32, "
        f"{len(shapes.train_prompts())} training prompts, held out: {', '.join(shapes.held_out_prompts())}",
        "training": cfg,
        **training_tail(train_dir),
        "sampler": f"{'Euler ODE' if flow else 'DDIM eta 0'}, {CARD_STEPS} steps, guidance {CARD_GUIDANCE}",
        **measure(model_dir),
    }
    (model_dir / "card.json").write_text(json.dumps(card, indent=2))
    lines = [f"# {name} base model" + (" (rectified flow: velocity prediction, logit-normal timesteps)" if flow else ""), "", f"- data: {card['data']}", f"- training: {json.dumps(cfg)}",
             f"- steps: {card['steps_done']}, mean loss over the last 200 steps: {card['final_loss_mean_last_200']:.4f}",
             f"- sampler: {card['sampler']}",
             f"- reproduce: rewardiff pretrain {name} --steps {card['steps_done']} --seed {cfg['seed']}"
             + (" --set prompts=geneval" if geneval else "")]
    lines += [f"- {k.replace('_', ' ')}: {v:.1%}" for k, v in card.items() if k.startswith("judge_")]
    lines += ["", "Judge: the classical counter of rewardiff.worlds.shapes.judge (no learned reward uses it)."]
    if geneval:
        lines += [f"GenEval figures: {CARD_GENEVAL_PER_PROMPT} samples of each held-out prompt (a coarse figure; "
                  "rewardiff eval geneval-shapes measures more)."]
    lines += ["", "![samples](samples.png)", ""]
    (model_dir / "card.md").write_text("\n".join(lines))
    return card


def _geneval_data() -> str:
    from rewardiff.worlds.shapes import compositions

    return (f"procedural shapes world, GenEval grammar (six tasks), 32x32: {len(compositions.train_prompts())} training "
            f"prompts, {len(compositions.held_out_prompts())} held out by composition")
