"""rewardiff: steer generative models toward a reward.

Fine-tuning through the sampler (DRaFT, DRaFT-K, DRaFT-LV, AlignProp, ReFL) on one sampling
loop (:mod:`rewardiff.rollout`), one diffusion process (:mod:`rewardiff.processes`) and one
trainer (:mod:`rewardiff.finetune.trainer`), with an embedded shapes world that runs on a CPU.
"""

__version__ = "0.1.0"
