"""Learned soft values: predict the final reward from a noisy sampler state.

A value network ``v(x_t, t, c)`` estimates E[r(x_0, prompt) | x_t] under a sampler. SVDD-MC
and SMC compare candidate states by it instead of decoding and scoring them; VARD
backpropagates it at every step of the chain.

    from rewardiff.rewards.value import train_value, load_value
    card = train_value(model, get_reward("brightness"), "runs/value-brightness")
    value = load_value("runs/value-brightness")
    v = value(x_t, t, model.encode(prompts))  # float [B], in reward units

- ``net``: ``ValueNet`` (float states), ``TokenValueNet`` (token states), their features
  (``pool_cond``, ``time_embedding``, ``FiLM``) and ``value_net_for`` (the net for a process);
- ``fit``: ``collect`` scored trajectories, ``regress`` (the one fitting loop), ``fit_value``
  (VARD's refits), held-out R^2;
- ``train``: ``train_value`` (``rewardiff train-value``);
- ``store``: ``save_value`` / ``load_value``, ``LearnedValue``, the ``value.json`` card.
"""

from rewardiff.rewards.value.fit import (
    Batch, Rollouts, collect, fit_value, heldout_r2, one_state_each, r2, regress, scored_rollout, shuffled_states,
)
from rewardiff.rewards.value.net import (
    KIND, TOKEN_WIDTHS, AnyValueNet, FiLM, TokenValueNet, ValueNet, net_from_config, pool_cond, positions, time_embedding,
    value_net_for,
)
from rewardiff.rewards.value.store import CONFIG_FILE, WEIGHTS_FILE, LearnedValue, load_value, save_value
from rewardiff.rewards.value.train import train_value

__all__ = [
    "AnyValueNet", "Batch", "CONFIG_FILE", "FiLM", "KIND", "LearnedValue", "Rollouts", "TOKEN_WIDTHS", "TokenValueNet",
    "ValueNet", "WEIGHTS_FILE", "collect", "fit_value", "heldout_r2", "load_value", "net_from_config", "one_state_each",
    "pool_cond", "positions", "r2", "regress", "save_value", "scored_rollout", "shuffled_states", "time_embedding",
    "train_value", "value_net_for",
]
