"""Rewards: a registry by name, plain image rewards, the shapes world's learned reward, sums.

    from rewardiff.rewards import get_reward
    reward = get_reward("0.7*shapes-count+0.3*brightness")
    r = reward(images, prompts)  # float [B]
"""

from rewardiff.rewards import image, shapes_rm  # noqa: F401  (fill the registry)
from rewardiff.rewards import vision  # noqa: F401
from rewardiff.rewards import chem, chem_rm  # noqa: F401
from rewardiff.rewards.base import RewardFn
from rewardiff.rewards.ensemble import WeightedSum
from rewardiff.rewards.registry import get_reward, list_rewards, register

__all__ = ["get_reward", "list_rewards", "register", "RewardFn", "WeightedSum"]
