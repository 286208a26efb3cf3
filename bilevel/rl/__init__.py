"""Reinforcement-learning building blocks: collection from Gymnasium vector environments,
returns and GAE, the linear feature baseline, policy-gradient surrogates and a replay buffer."""

from bilevel.rl.baseline import fit_linear_baseline, linear_baseline_features, linear_baseline_values
from bilevel.rl.collect import PolicyFn, collect, collect_episodes, make_vector_env
from bilevel.rl.imagine import Imagined, imagine
from bilevel.rl.replay import ReplayBuffer, Transitions
from bilevel.rl.returns import discounted_returns, gae
from bilevel.rl.surrogates import importance_weighted_loss, masked_mean, reinforce_loss, standardize
from bilevel.rl.trajectories import Trajectories

__all__ = [
    "Imagined",
    "PolicyFn",
    "ReplayBuffer",
    "Trajectories",
    "Transitions",
    "collect",
    "collect_episodes",
    "discounted_returns",
    "fit_linear_baseline",
    "gae",
    "imagine",
    "importance_weighted_loss",
    "linear_baseline_features",
    "linear_baseline_values",
    "make_vector_env",
    "masked_mean",
    "reinforce_loss",
    "standardize",
]
