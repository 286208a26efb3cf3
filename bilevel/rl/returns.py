"""Discounted returns and generalised advantage estimates that tell termination from truncation.

All tensors are time-major, ``[T, ...]``: the time axis first and any batch shape after
it. A reverse scan over time, vectorised over the batch, composes with ``torch.func``
(``vmap`` over tasks, ``grad`` through values) and keeps every tensor on its device.

Conventions shared by both functions, with ``done_t = terminated_t or truncated_t``:

- at a terminated step the future is worth 0;
- at a truncated step the future is worth the value of the true final observation,
  given as the bootstrap value of that step;
- ``continues_t = (1 - done_t) * valid_{t+1}`` (``valid_T = 0``) says whether the episode
  goes on into the stored step ``t + 1``; where it does not and the step was not
  terminated (truncation, the end of the batch, or an invalid next step), the step
  bootstraps from its own next value;
- invalid steps get 0 and pass nothing back.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["discounted_returns", "gae"]


def discounted_returns(
    rewards: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    bootstrap_values: Tensor,
    gamma: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Discounted reward-to-go, bootstrapped where an episode is cut rather than ended.

    ``G_t = valid_t * (r_t + gamma * [continues_t * G_{t+1}
    + (1 - continues_t) * (1 - terminated_t) * b_t])``

    Args:
        rewards: ``[T, ...]`` rewards.
        terminated: ``[T, ...]`` bool, the step reached a terminal state.
        truncated: ``[T, ...]`` bool, the episode was cut after the step.
        bootstrap_values: ``[T, ...]`` ``b_t``, the value estimate of the step's next
            observation (the true final observation on truncation); read only where the
            stored episode stops without termination. Zeros give plain Monte Carlo returns.
        gamma: discount factor in ``[0, 1]``.
        valid: ``[T, ...]`` bool mask of real transitions; None means all are real.

    Returns:
        ``[T, ...]`` returns ``G_t``, 0 at invalid steps.
    """
    valid = _check_inputs(
        rewards, terminated, truncated, valid, gamma=gamma, bootstrap_values=bootstrap_values
    )
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    continues = _continues(terminated, truncated, valid, rewards.dtype)
    valid = valid.to(rewards.dtype)
    next_return = torch.zeros_like(rewards[0])
    returns = []
    for t in reversed(range(rewards.shape[0])):
        future = continues[t] * next_return + (1.0 - continues[t]) * not_terminated[t] * bootstrap_values[t]
        next_return = valid[t] * (rewards[t] + gamma * future)
        returns.append(next_return)
    return torch.stack(returns[::-1])


def gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    lam: float,
    valid: Tensor | None = None,
) -> Tensor:
    """Generalised advantage estimation (Schulman et al. 2016, "High-dimensional continuous
    control using generalized advantage estimation", eq. 16), per episode.

    ``delta_t = r_t + gamma * (1 - terminated_t) * V(s'_t) - V(s_t)``

    ``A_t = valid_t * (delta_t + gamma * lam * continues_t * A_{t+1})``

    so the sum ``A_t = sum_l (gamma lam)^l delta_{t+l}`` stops at the episode's end, and a
    truncated episode is bootstrapped with the value of its true final observation.

    Args:
        rewards: ``[T, ...]`` rewards.
        values: ``[T, ...]`` ``V(s_t)``, value of each step's observation.
        next_values: ``[T, ...]`` ``V(s'_t)``, value of each step's next observation
            (``Trajectories.next_obs``: the true final observation at an episode's end).
        terminated: ``[T, ...]`` bool, the step reached a terminal state.
        truncated: ``[T, ...]`` bool, the episode was cut after the step.
        gamma: discount factor in ``[0, 1]``.
        lam: GAE's ``lambda`` in ``[0, 1]``; 0 gives one-step TD errors, 1 Monte Carlo
            returns minus ``V(s_t)``.
        valid: ``[T, ...]`` bool mask of real transitions; None means all are real.

    Returns:
        ``[T, ...]`` advantages ``A_t``, 0 at invalid steps. Value targets are ``A_t + V(s_t)``.
    """
    valid = _check_inputs(
        rewards, terminated, truncated, valid, gamma=gamma, values=values, next_values=next_values
    )
    _check_unit_interval("lam", lam)
    not_terminated = 1.0 - terminated.to(rewards.dtype)
    td_errors = rewards + gamma * not_terminated * next_values - values
    continues = _continues(terminated, truncated, valid, rewards.dtype)
    valid = valid.to(rewards.dtype)
    next_advantage = torch.zeros_like(td_errors[0])
    advantages = []
    for t in reversed(range(rewards.shape[0])):
        next_advantage = valid[t] * (td_errors[t] + gamma * lam * continues[t] * next_advantage)
        advantages.append(next_advantage)
    return torch.stack(advantages[::-1])


def _continues(terminated: Tensor, truncated: Tensor, valid: Tensor, dtype: torch.dtype) -> Tensor:
    """``[T, ...]``, 1 where the episode goes on into the next stored valid step, else 0."""
    next_valid = torch.cat([valid[1:], torch.zeros_like(valid[:1])])
    return (~(terminated | truncated) & next_valid).to(dtype)


def _check_inputs(
    rewards: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    valid: Tensor | None,
    *,
    gamma: float,
    **same_shape: Tensor,
) -> Tensor:
    """Check shapes and ``gamma``; return ``valid``, all True when None."""
    _check_unit_interval("gamma", gamma)
    if rewards.dim() < 1:
        raise ValueError(f"`rewards` must have a time axis, shape [T, ...]; got shape {tuple(rewards.shape)}")
    valid = torch.ones_like(rewards, dtype=torch.bool) if valid is None else valid
    named = {"terminated": terminated, "truncated": truncated, "valid": valid, **same_shape}
    for name, tensor in named.items():
        if tensor.shape != rewards.shape:
            raise ValueError(
                f"`{name}` must have the shape of `rewards`, {tuple(rewards.shape)}; "
                f"got {tuple(tensor.shape)}"
            )
    for name in ("terminated", "truncated", "valid"):
        if named[name].dtype != torch.bool:
            raise ValueError(f"`{name}` must be a bool tensor; got dtype {named[name].dtype}")
    return valid


def _check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"`{name}` must lie in [0, 1]; got {value}")
