"""Rewards: a registry by name (``rewardiff.plugins.REWARDS``), plain image rewards, weighted sums.

    from rewardiff.rewards import get_reward
    reward = get_reward("0.7*shapes-count+0.3*brightness")
    r = reward(images, prompts)  # float [B]

Registered rewards are imported when first built, so importing this package loads no world
(no RDKit, no reward model weights).
"""

from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.ensemble import WeightedSum
from rewardiff.rewards.registry import get_reward, list_rewards, register

__all__ = ["get_reward", "list_rewards", "register", "RewardFn", "WeightedSum"]
