"""Inference-time alignment: methods that steer the sampler toward a reward, no training.

    from rewardiff.guidance import make_method, guided_sample
    method = make_method("svdd-pm", get_reward("shapes-count"), width=8)
    images, info = guided_sample(model, method, prompts, seeds)   # info["nfe_per_sample"]

Every method is a hook of the one rollout loop (``rewardiff.rollout``); see ``base.py``.
"""

from rewardiff.guidance.base import Method
from rewardiff.guidance.sample import METHODS, budget_plan, guided_sample, make_method, particle_seeds

__all__ = ["METHODS", "Method", "budget_plan", "guided_sample", "make_method", "particle_seeds"]
