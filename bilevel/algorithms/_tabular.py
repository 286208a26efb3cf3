"""Tabular data for BO-MRL: the task statistics one collection with the meta-policy gives.

Shapes: ``S`` states of the exact tensors (the 16 Frozen Lake cells and the absorbing sink),
``S_obs`` observable states (the cells), ``A`` actions. A softmax policy is given by its
logits ``[S_obs, A]``. All quantities are float64 and, for the exact ones, differentiable in
the logits and vmap-able over tasks.

The statistics (Xu et al. 2024, eq. 4, the lower bound's ingredients) are the advantage
``A_phi(s, a) = Q_phi(s, a) - V_phi(s)`` and the unnormalised discounted state visitation
``d_phi(s) = sum_{t < H} gamma^t Pr(s_t = s)`` (``= nu_phi(s) / (1 - gamma)`` for the
normalised ``nu_phi`` of the paper; `bilevel.envs.tabular.discounted_visitation`).

Episodes come either from the MDP's tensors (`sample_statistics`, batched over tasks and episodes) or
from the task's Gymnasium env (`collect_statistics`); both give the same every-visit estimator.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from bilevel.envs.frozen_lake import FrozenLakeEnv, FrozenLakeTask
from bilevel.envs.tabular import Episodes, TabularMDP, discounted_visitation, evaluate_policy, sample_episodes
from bilevel.rl import Trajectories, collect_episodes, discounted_returns, make_vector_env

__all__ = [
    "ESTIMATORS",
    "TaskStatistics",
    "collect_statistics",
    "episode_statistics",
    "exact_statistics",
    "model_statistics",
    "monte_carlo_statistics",
    "sample_statistics",
    "softmax_policy",
]


class TaskStatistics(NamedTuple):
    """What adaptation needs from one task: ``advantages [..., S_obs, A]``, ``visitation [..., S_obs]``."""

    advantages: Tensor
    visitation: Tensor


def softmax_policy(logits: Tensor) -> Tensor:
    """``pi(a|s) = exp(logits[s, a]) / sum_b exp(logits[s, b])``; ``[..., S_obs, A]``."""
    return torch.softmax(logits, dim=-1)


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


def episode_statistics(episodes: Episodes, num_states: int, num_actions: int, gamma: float) -> TaskStatistics:
    """Every-visit Monte-Carlo estimates from `sample_episodes` output (leading task dims ``[...]``, ``B``
    episodes of ``H`` steps); the same estimator as `monte_carlo_statistics`.

    ``G_t = sum_{k >= t} gamma^(k - t) r_k`` within the episode; ``Q^(s, a)``, ``V^(s)`` average ``G_t`` over the
    alive visits of ``(s, a)`` and ``s``; unvisited pairs and states get advantage 0;
    ``d^(s) = (1 / B) sum_episodes sum_t gamma^t [s_t = s]``. Returns ``advantages [..., S_obs, A]``,
    ``visitation [..., S_obs]``."""
    batch_shape, (num_episodes, horizon) = episodes.states.shape[:-2], episodes.states.shape[-2:]
    steps = torch.arange(horizon, dtype=torch.float64)
    offsets = steps[None, :] - steps[:, None]
    discount_to_go = torch.where(offsets >= 0, gamma ** offsets.clamp(min=0), torch.zeros(()))
    returns = episodes.rewards.to(torch.float64) @ discount_to_go.T
    weights = episodes.alive.to(torch.float64)
    states = episodes.states.clamp(max=num_states - 1)
    pairs = states * num_actions + episodes.actions

    def scatter(index: Tensor, values: Tensor, size: int) -> Tensor:
        flat_index = index.reshape(*batch_shape, -1)
        flat_values = values.reshape(*batch_shape, -1)
        return torch.zeros(*batch_shape, size, dtype=torch.float64).scatter_add_(-1, flat_index, flat_values)

    state_counts = scatter(states, weights, num_states)
    state_values = scatter(states, weights * returns, num_states) / state_counts.clamp(min=1.0)
    pair_counts = scatter(pairs, weights, num_states * num_actions).reshape(*batch_shape, num_states, num_actions)
    action_values = scatter(pairs, weights * returns, num_states * num_actions).reshape(pair_counts.shape)
    action_values = action_values / pair_counts.clamp(min=1.0)
    advantages = torch.where(pair_counts > 0, action_values - state_values[..., None], torch.zeros(()))
    visitation = scatter(states, weights * gamma**steps, num_states) / num_episodes
    return TaskStatistics(advantages, visitation)


def model_statistics(episodes: Episodes, policy: Tensor, num_states: int, gamma: float, horizon: int) -> TaskStatistics:
    """Certainty-equivalence estimates from the same episodes: the empirical model of the visited pairs,
    ``P^(s' | s, a) = N(s, a, s') / N(s, a)`` and ``R^(s, a)`` the mean reward, evaluated exactly for
    ``policy [..., S_obs, A]`` over ``horizon`` steps (time-0 values, like `exact_statistics`).

    ``num_states`` counts the internal states too (``S``; they have value 0). A pair never tried has no
    model: its ``Q^`` is taken as ``V^(s)``, so ``V^_t(s) = sum_{a seen} pi(a|s) Q^_t(s, a) / sum_{a seen} pi(a|s)``
    and its advantage is 0, as in `episode_statistics`. ``visitation`` is the Monte-Carlo ``d^``. Needs the
    states that follow each step, so the last step of an episode (no successor recorded) is not counted."""
    batch_shape = episodes.states.shape[:-2]
    num_observable, num_actions = policy.shape[-2:]
    alive = episodes.alive[..., :-1].to(torch.float64)
    states = episodes.states[..., :-1].clamp(max=num_observable - 1)
    pairs = (states * num_actions + episodes.actions[..., :-1]).reshape(*batch_shape, -1)
    triples = pairs * num_states + episodes.states[..., 1:].reshape(*batch_shape, -1)
    weights = alive.reshape(*batch_shape, -1)
    size = num_observable * num_actions
    counts = torch.zeros(*batch_shape, size * num_states, dtype=torch.float64).scatter_add_(-1, triples, weights)
    counts = counts.reshape(*batch_shape, num_observable, num_actions, num_states)
    pair_counts = counts.sum(dim=-1)
    reward_sums = torch.zeros(*batch_shape, size, dtype=torch.float64).scatter_add_(
        -1, pairs, weights * episodes.rewards[..., :-1].reshape(*batch_shape, -1).to(torch.float64)
    )
    rewards = reward_sums.reshape(pair_counts.shape) / pair_counts.clamp(min=1.0)
    transitions = counts / pair_counts[..., None].clamp(min=1.0)
    seen = pair_counts > 0
    seen_policy = policy.detach() * seen
    weights_v = seen_policy / seen_policy.sum(dim=-1, keepdim=True).clamp(min=1e-300)
    values = torch.zeros(*batch_shape, num_states, dtype=torch.float64)
    q_values = torch.zeros_like(rewards)
    for _ in range(horizon):
        q_values = rewards + gamma * (transitions @ values[..., None, :, None]).squeeze(-1)
        observable_values = (weights_v * q_values).sum(dim=-1)
        values = torch.cat([observable_values, torch.zeros(*batch_shape, num_states - num_observable)], dim=-1)
    advantages = torch.where(seen, q_values - values[..., :num_observable, None], torch.zeros(()))
    visitation = episode_statistics(episodes, num_observable, num_actions, gamma).visitation
    return TaskStatistics(advantages, visitation)


ESTIMATORS = ("monte_carlo", "model")


def sample_statistics(
    mdp: TabularMDP, logits: Tensor, episodes: int, generator: torch.Generator, estimator: str = "monte_carlo"
) -> tuple[TaskStatistics, int]:
    """Statistics of ``episodes`` episodes of ``softmax(logits [..., S_obs, A])`` drawn from the (stacked)
    ``mdp``'s tensors by `sample_episodes`: `episode_statistics` (``estimator="monte_carlo"``) or
    `model_statistics` (``"model"``); and the number of environment steps taken."""
    policy = softmax_policy(logits)
    batch = sample_episodes(mdp, policy, episodes, generator)
    num_states, num_actions = logits.shape[-2:]
    if estimator == "model":
        statistics = model_statistics(batch, policy, mdp.transitions.shape[-1], mdp.gamma, mdp.horizon)
    elif estimator == "monte_carlo":
        statistics = episode_statistics(batch, num_states, num_actions, mdp.gamma)
    else:
        raise ValueError(f"unknown `estimator` {estimator!r}; choose one of {list(ESTIMATORS)}")
    return statistics, int(batch.alive.sum())


def collect_statistics(
    task: FrozenLakeTask, logits: Tensor, episodes: int, *, seed: int, num_envs: int = 50
) -> tuple[TaskStatistics, int]:
    """Run ``episodes`` episodes of ``softmax(logits)`` in the task's Gymnasium env (seeded by
    ``seed``) and return the Monte-Carlo statistics and the number of environment steps."""
    mdp = task.mdp
    envs = make_vector_env(lambda: FrozenLakeEnv(task), min(num_envs, episodes))
    generator = torch.Generator().manual_seed(seed)
    policy = softmax_policy(logits.detach()).cpu()

    def policy_fn(obs: Tensor) -> tuple[Tensor, None]:
        return torch.multinomial(policy[obs.long()], 1, generator=generator).squeeze(-1), None

    try:
        batch = collect_episodes(envs, policy_fn, episodes, horizon=mdp.horizon, seed=seed)
    finally:
        envs.close()
    num_states, num_actions = logits.shape[-2:]
    statistics = monte_carlo_statistics(batch, num_states, num_actions, mdp.gamma)
    return statistics, int(batch.valid.sum())
