"""Named presets: functions over the base config."""

from __future__ import annotations

from rewardiff.finetune.config import FinetuneConfig


def demo_config(steps: int | None = None) -> FinetuneConfig:
    """What ``rewardiff demo`` runs: the settings the benchmark found best for counting."""
    cfg = FinetuneConfig(
        reward="shapes-count", method="draft-k", k=5, num_inference_steps=15, batch_size=8,
        lr=2e-5, lora_rank=0, kl_weight=0.0, guidance_scale=2.0, steps=200,
        eval_samples=96, checkpoint_every=50,
    )
    if steps is not None:
        cfg.steps = steps
    return cfg
