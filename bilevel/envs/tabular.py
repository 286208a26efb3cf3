"""Exact planning in finite MDPs, in torch float64, differentiable with respect to the policy.

Notation and shapes: ``S`` states, ``A`` actions; ``P [..., S, A, S]`` with
``P[s, a, s'] = Pr(s' | s, a)``; expected reward ``R [..., S, A]``; initial distribution
``rho [..., S]``; a stochastic policy ``pi [..., S, A]``. Leading dimensions broadcast, so
one call evaluates a batch of tasks or of policies, and ``torch.func.vmap`` works too.

The objective is the discounted return ``J(pi) = E[sum_{t=0}^{H-1} gamma^t r_t]`` with
``s_0 ~ rho``; ``H`` is a finite horizon or infinity (``horizon=None``).
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
