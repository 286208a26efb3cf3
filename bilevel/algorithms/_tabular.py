"""Tabular data for BO-MRL: the task statistics one collection with the meta-policy gives.

Shapes: ``S`` states of the exact tensors (the 16 Frozen Lake cells and the absorbing sink),
``S_obs`` observable states (the cells), ``A`` actions. A softmax policy is given by its
logits ``[S_obs, A]``. All quantities are float64 and, for the exact ones, differentiable in
the logits and vmap-able over tasks.

The statistics (Xu et al. 2024, eq. 4, the lower bound's ingredients) are the advantage
``A_phi(s, a) = Q_phi(s, a) - V_phi(s)`` and the unnormalised discounted state visitation
``d_phi(s) = sum_{t < H} gamma^t Pr(s_t = s)`` (``= nu_phi(s) / (1 - gamma)`` for the
normalised ``nu_phi`` of the paper).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bilevel.envs.frozen_lake import FrozenLakeEnv, FrozenLakeTask
from bilevel.envs.tabular import TabularMDP, evaluate_policy, pad_policy
from bilevel.rl import Trajectories, collect_episodes, discounted_returns, make_vector_env

__all__ = [
    "TaskStatistics",
    "collect_statistics",
    "discounted_visitation",
    "exact_statistics",
    "monte_carlo_statistics",
    "softmax_policy",
]


class TaskStatistics(NamedTuple):
    """What adaptation needs from one task: ``advantages [..., S_obs, A]``, ``visitation [..., S_obs]``."""

    advantages: Tensor
    visitation: Tensor


def softmax_policy(logits: Tensor) -> Tensor:
    """``pi(a|s) = exp(logits[s, a]) / sum_b exp(logits[s, b])``; ``[..., S_obs, A]``."""
    return torch.softmax(logits, dim=-1)


def discounted_visitation(mdp: TabularMDP, policy: Tensor) -> Tensor:
    """``d(s) = sum_{t < H} gamma^t Pr(s_t = s)`` under ``policy [S_obs or S, A]``; ``[S]``.

    ``Pr(s_0) = rho`` and ``Pr(s_{t+1} = s') = sum_s Pr(s_t = s) sum_a pi(a|s) P[s, a, s']``."""
    full_policy = pad_policy(policy, mdp.transitions.shape[-1])
    policy_transitions = (full_policy[..., None] * mdp.transitions).sum(dim=-2)
    state_distribution = mdp.initial_distribution
    visitation = torch.zeros_like(state_distribution)
    for t in range(mdp.horizon):
        visitation = visitation + mdp.gamma**t * state_distribution
        state_distribution = state_distribution @ policy_transitions
    return visitation


def exact_statistics(mdp: TabularMDP, logits: Tensor) -> TaskStatistics:
    """Exact ``A_phi`` (time-0 finite-horizon values) and ``d_phi`` over the observable states."""
    policy = softmax_policy(logits)
    values = evaluate_policy(mdp, policy)
    num_observable = logits.shape[-2]
    advantages = values.action_values[..., :num_observable, :] - values.state_values[..., :num_observable, None]
    return TaskStatistics(advantages, discounted_visitation(mdp, policy)[..., :num_observable])


def monte_carlo_statistics(batch: Trajectories, num_states: int, num_actions: int, gamma: float) -> TaskStatistics:
    """Every-visit Monte-Carlo estimates from ``B`` episodes (``batch`` as `collect_episodes` returns it).

    ``Q^(s, a)`` and ``V^(s)`` average the discounted return-to-go over the visits of ``(s, a)``
    and of ``s``; an unvisited pair gets ``Q^ = V^`` (advantage 0), an unvisited state
    advantage 0. ``d^(s) = (1 / B) sum_episodes sum_t gamma^t [s_t = s]``."""
    rewards = batch.rewards.to(torch.float64)
    returns = discounted_returns(
        rewards, batch.terminated, batch.truncated, torch.zeros_like(rewards), gamma, batch.valid
    )
    valid = batch.valid
    states = batch.obs[valid].long()
    pairs = states * num_actions + batch.actions[valid].long()
    visit_returns = returns[valid]

    def averages(index: Tensor, size: int) -> tuple[Tensor, Tensor]:
        counts = torch.zeros(size, dtype=torch.float64).index_add_(0, index, torch.ones_like(visit_returns))
        sums = torch.zeros(size, dtype=torch.float64).index_add_(0, index, visit_returns)
        return sums / counts.clamp(min=1.0), counts

    state_values, _ = averages(states, num_states)
    action_values, pair_counts = averages(pairs, num_states * num_actions)
    action_values = action_values.reshape(num_states, num_actions)
    seen = pair_counts.reshape(num_states, num_actions) > 0
    advantages = torch.where(seen, action_values - state_values[:, None], torch.zeros_like(action_values))
    discounts = gamma ** batch.time[valid].to(torch.float64)
    visitation = torch.zeros(num_states, dtype=torch.float64).index_add_(0, states, discounts) / batch.batch_size
    return TaskStatistics(advantages, visitation)


def collect_statistics(
    task: FrozenLakeTask, logits: Tensor, episodes: int, *, seed: int, num_envs: int = 50
) -> tuple[TaskStatistics, int]:
    """Run ``episodes`` episodes of ``softmax(logits)`` in the task's Gymnasium env (seeded by
    ``seed``) and return the Monte-Carlo statistics and the number of environment steps."""
    mdp = task.mdp
    envs = make_vector_env(lambda: FrozenLakeEnv(task), min(num_envs, episodes))
    generator = torch.Generator().manual_seed(seed)
    policy = softmax_policy(logits.detach())

    def policy_fn(obs: Tensor) -> tuple[Tensor, None]:
        return torch.multinomial(policy[obs.long()], 1, generator=generator).squeeze(-1), None

    try:
        batch = collect_episodes(envs, policy_fn, episodes, horizon=mdp.horizon, seed=seed)
    finally:
        envs.close()
    num_states, num_actions = logits.shape[-2:]
    statistics = monte_carlo_statistics(batch, num_states, num_actions, mdp.gamma)
    return statistics, int(batch.valid.sum())
