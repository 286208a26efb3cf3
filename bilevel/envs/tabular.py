"""Exact planning in finite MDPs, in torch float64, differentiable with respect to the policy.

Notation and shapes: ``S`` states, ``A`` actions; ``P [..., S, A, S]`` with
``P[s, a, s'] = Pr(s' | s, a)``; expected reward ``R [..., S, A]``; initial distribution
``rho [..., S]``; a stochastic policy ``pi [..., S, A]``. Leading dimensions broadcast, so
one call evaluates a batch of tasks or of policies, and ``torch.func.vmap`` works too.

The objective is the discounted return ``J(pi) = E[sum_{t=0}^{H-1} gamma^t r_t]`` with
``s_0 ~ rho``; ``H`` is a finite horizon or infinity (``horizon=None``).

Besides exact planning, :func:`discounted_visitation` gives the discounted state visitation of a
policy and :func:`sample_episodes` draws episodes from the tensors themselves (batched over
tasks and episodes, seeded by a ``torch.Generator``), the same distribution a Gymnasium env
stepping the MDP gives, without the per-step Python cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

VALUE_ITERATION_TOLERANCE = 1e-12
VALUE_ITERATION_MAX_ITERATIONS = 10_000


@dataclass(frozen=True)
class TabularMDP:
    """A finite MDP's exact tensors.

    ``transitions [S, A, S]``, ``rewards [S, A]`` (expected reward of taking ``a`` in ``s``),
    ``initial_distribution [S]``, ``gamma``, ``horizon``. States at index
    ``num_observable_states`` and beyond are internal (such as an absorbing sink) and
    never observed by an agent.
    """

    transitions: Tensor
    rewards: Tensor
    initial_distribution: Tensor
    gamma: float
    horizon: int
    num_observable_states: int

    def to(self, device: torch.device | str) -> TabularMDP:
        return TabularMDP(
            self.transitions.to(device),
            self.rewards.to(device),
            self.initial_distribution.to(device),
            self.gamma,
            self.horizon,
            self.num_observable_states,
        )


class Values(NamedTuple):
    """``expected_return [...]`` = ``rho . V``, ``state_values V [..., S]``, ``action_values Q [..., S, A]``.

    For a finite horizon these are the values at time 0.
    """

    expected_return: Tensor
    state_values: Tensor
    action_values: Tensor


def action_values(transitions: Tensor, rewards: Tensor, next_state_values: Tensor, gamma: float) -> Tensor:
    """Bellman backup ``Q[s, a] = R[s, a] + gamma * sum_s' P[s, a, s'] V[s']``; shape ``[..., S, A]``."""
    expected_next_values = (transitions @ next_state_values[..., None, :, None]).squeeze(-1)
    return rewards + gamma * expected_next_values


def policy_values(
    transitions: Tensor,
    rewards: Tensor,
    initial_distribution: Tensor,
    policy: Tensor,
    gamma: float,
    horizon: int | None,
) -> Values:
    """Exact values of ``policy``.

    Finite ``horizon`` H: ``V_H = 0``, ``Q_t = R + gamma P V_{t+1}``,
    ``V_t[s] = sum_a pi[s, a] Q_t[s, a]``, returning ``V_0`` and ``Q_0``.
    ``horizon=None``: ``V = (I - gamma P_pi)^{-1} r_pi`` with ``P_pi[s, s'] = sum_a pi[s, a] P[s, a, s']``
    and ``r_pi[s] = sum_a pi[s, a] R[s, a]``, by one linear solve.
    """
    if horizon is None:
        policy_transitions = (policy[..., None] * transitions).sum(dim=-2)
        policy_rewards = (policy * rewards).sum(dim=-1)
        identity = torch.eye(transitions.shape[-1], dtype=transitions.dtype, device=transitions.device)
        state_values = torch.linalg.solve(identity - gamma * policy_transitions, policy_rewards)
        q_values = action_values(transitions, rewards, state_values, gamma)
    else:
        state_values = torch.zeros_like(rewards[..., 0])
        q_values = torch.zeros_like(rewards)
        for _ in range(horizon):
            q_values = action_values(transitions, rewards, state_values, gamma)
            state_values = (policy * q_values).sum(dim=-1)
    expected_return = (initial_distribution * state_values).sum(dim=-1)
    return Values(expected_return, state_values, q_values)


def optimal_values(
    transitions: Tensor,
    rewards: Tensor,
    initial_distribution: Tensor,
    gamma: float,
    horizon: int | None,
) -> Values:
    """Value iteration ``V <- max_a (R + gamma P V)``.

    Finite ``horizon``: exactly ``horizon`` backups from ``V_H = 0``, giving the optimal
    time-0 values (the optimal policy may depend on time; ``argmax_a Q_0`` is its first step).
    ``horizon=None``: backups until the largest change is below 1e-12.
    """
    state_values = torch.zeros_like(rewards[..., 0])
    q_values = torch.zeros_like(rewards)
    max_iterations = VALUE_ITERATION_MAX_ITERATIONS if horizon is None else horizon
    for _ in range(max_iterations):
        q_values = action_values(transitions, rewards, state_values, gamma)
        next_values = q_values.amax(dim=-1)
        change = (next_values - state_values).abs().max()
        state_values = next_values
        if horizon is None and change < VALUE_ITERATION_TOLERANCE:
            break
    expected_return = (initial_distribution * state_values).sum(dim=-1)
    return Values(expected_return, state_values, q_values)


def pad_policy(policy: Tensor, num_states: int) -> Tensor:
    """Extend a policy over the observable states ``[..., S_obs, A]`` to ``[..., S, A]`` with uniform rows.

    The rows of internal states (an absorbing sink) do not affect any value.
    """
    missing = num_states - policy.shape[-2]
    if missing == 0:
        return policy
    uniform_rows = torch.full(
        (*policy.shape[:-2], missing, policy.shape[-1]),
        1.0 / policy.shape[-1],
        dtype=policy.dtype,
        device=policy.device,
    )
    return torch.cat([policy, uniform_rows], dim=-2)


def evaluate_policy(mdp: TabularMDP, policy: Tensor, *, finite_horizon: bool = True) -> Values:
    """Exact values of ``policy [..., S_obs or S, A]`` in ``mdp``: over ``mdp.horizon`` steps, or infinite."""
    full_policy = pad_policy(policy, mdp.transitions.shape[-1])
    horizon = mdp.horizon if finite_horizon else None
    return policy_values(mdp.transitions, mdp.rewards, mdp.initial_distribution, full_policy, mdp.gamma, horizon)


def value_iteration(mdp: TabularMDP, *, finite_horizon: bool = True) -> Values:
    """Optimal values of ``mdp``: over ``mdp.horizon`` steps, or infinite; see :func:`optimal_values`."""
    horizon = mdp.horizon if finite_horizon else None
    return optimal_values(mdp.transitions, mdp.rewards, mdp.initial_distribution, mdp.gamma, horizon)


def discounted_visitation(mdp: TabularMDP, policy: Tensor) -> Tensor:
    """``d(s) = sum_{t < H} gamma^t Pr(s_t = s)`` under ``policy [..., S_obs or S, A]``; ``[..., S]``.

    ``Pr(s_0) = rho`` and ``Pr(s_{t+1} = s') = sum_s Pr(s_t = s) sum_a pi(a|s) P[s, a, s']``; the normalised
    visitation of Xu et al. 2024 (eq. 4) is ``nu = (1 - gamma) d`` as ``H -> infinity``."""
    full_policy = pad_policy(policy, mdp.transitions.shape[-1])
    policy_transitions = (full_policy[..., None] * mdp.transitions).sum(dim=-2)
    state_distribution = mdp.initial_distribution
    visitation = torch.zeros_like(state_distribution)
    for t in range(mdp.horizon):
        visitation = visitation + mdp.gamma**t * state_distribution
        state_distribution = (state_distribution[..., None, :] @ policy_transitions).squeeze(-2)
    return visitation


class Episodes(NamedTuple):
    """``B`` episodes of ``H = mdp.horizon`` steps per task: ``states``, ``actions`` (int64) and
    ``rewards`` (float64) ``[..., B, H]``, and ``alive [..., B, H]``, true where step ``t`` was taken.

    An episode ends when it enters an internal state (index ``>= num_observable_states``, such as
    the sink of a terminal hole); the reward of that entering step is kept, later steps are not alive."""

    states: Tensor
    actions: Tensor
    rewards: Tensor
    alive: Tensor


def _inverse_cdf(probabilities: Tensor, generator: torch.Generator) -> Tensor:
    """One index per row of ``probabilities [..., K]`` by inverse-CDF sampling; int64 ``[...]``."""
    cumulative = probabilities.cumsum(dim=-1)
    uniform = torch.rand(cumulative.shape[:-1], dtype=cumulative.dtype, generator=generator, device=generator.device)
    uniform = uniform.to(cumulative.device)
    index = (cumulative < uniform[..., None] * cumulative[..., -1:]).sum(dim=-1)
    return index.clamp(max=probabilities.shape[-1] - 1)


def sample_episodes(mdp: TabularMDP, policy: Tensor, episodes: int, generator: torch.Generator) -> Episodes:
    """Draw ``episodes`` episodes of ``policy [..., S_obs or S, A]`` in ``mdp`` (tensors ``[..., S, A, S]``).

    ``s_0 ~ rho``, ``a_t ~ pi(.|s_t)``, ``r_t = R[s_t, a_t]``, ``s_{t+1} ~ P[s_t, a_t]``, for ``t < H``, all
    episodes and tasks at once; the policy is detached (sampling is not differentiated)."""
    transitions = mdp.transitions
    num_states, num_actions = transitions.shape[-3], transitions.shape[-2]
    full_policy = pad_policy(policy.detach(), num_states)
    batch_shape = torch.broadcast_shapes(transitions.shape[:-3], full_policy.shape[:-2])
    full_policy = full_policy.expand(*batch_shape, num_states, num_actions)
    flat_transitions = transitions.expand(*batch_shape, num_states, num_actions, num_states).reshape(
        *batch_shape, num_states * num_actions, num_states
    )
    rewards = mdp.rewards.expand(*batch_shape, num_states, num_actions).reshape(*batch_shape, num_states * num_actions)
    initial = mdp.initial_distribution.expand(*batch_shape, num_states)
    states = _inverse_cdf(initial[..., None, :].expand(*batch_shape, episodes, num_states), generator)
    alive = torch.ones_like(states, dtype=torch.bool)
    record: dict[str, list[Tensor]] = {"states": [], "actions": [], "rewards": [], "alive": []}
    for _ in range(mdp.horizon):
        action_probabilities = torch.gather(full_policy, -2, states[..., None].expand(*states.shape, num_actions))
        actions = _inverse_cdf(action_probabilities, generator)
        pairs = states * num_actions + actions
        next_probabilities = torch.gather(flat_transitions, -2, pairs[..., None].expand(*pairs.shape, num_states))
        record["states"].append(states)
        record["actions"].append(actions)
        step_rewards = torch.gather(rewards, -1, pairs)
        record["rewards"].append(torch.where(alive, step_rewards, torch.zeros_like(step_rewards)))
        record["alive"].append(alive)
        states = _inverse_cdf(next_probabilities, generator)
        alive = alive & (states < mdp.num_observable_states)
    return Episodes(**{name: torch.stack(values, dim=-1) for name, values in record.items()})


def stack_mdps(mdps: list[TabularMDP]) -> TabularMDP:
    """One :class:`TabularMDP` whose tensors carry a leading task dimension ``[N, ...]``.

    All MDPs must share shapes, ``gamma``, ``horizon`` and ``num_observable_states``.
    """
    first = mdps[0]
    if any(
        (m.gamma, m.horizon, m.num_observable_states) != (first.gamma, first.horizon, first.num_observable_states)
        for m in mdps
    ):
        raise ValueError("MDPs to stack must share gamma, horizon and num_observable_states")
    return TabularMDP(
        torch.stack([m.transitions for m in mdps]),
        torch.stack([m.rewards for m in mdps]),
        torch.stack([m.initial_distribution for m in mdps]),
        first.gamma,
        first.horizon,
        first.num_observable_states,
    )
