"""Minimum attention: the spatial and temporal sensitivity of a policy.

Brockett's minimum attention criterion for a control law ``u(x, t)`` is
``J(u) = 1/2 ∫∫ ||du/dx||^2 + ||du/dt||^2 dx dt``. On a batch of visited states
it is estimated by

    spatial  = mean_{t,b} ||d a(s_{t,b}) / d s||_F^2
    temporal = mean_{t,b} ||(a(s_{t+1,b}) - a(s_{t,b})) / dt||^2

with ``a`` the policy's (mean) action. The weights ``alpha_x`` and ``alpha_t``
multiply these means as they stand: per state entry as the policy receives it
(pass normalised states to measure sensitivity per standard deviation) and per
second of control time ``dt``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from bilevel.tree import Tree

__all__ = ["MinimumAttention", "minimum_attention"]

PolicyFn = Callable[[Tree, Tensor], Tensor]


class MinimumAttention(NamedTuple):
    """The two terms and their weighted sum. With ``reduce=True`` each is a 0-dim
    mean; with ``reduce=False`` each is per step, shaped like ``states.shape[:-1]``
    (the temporal term of step ``t`` uses ``a_t - a_{t-1}`` and is zero at ``t = 0``)."""

    spatial: Tensor
    temporal: Tensor
    total: Tensor


def _spatial_exact(policy_fn: PolicyFn, params: Tree, flat_states: Tensor) -> Tensor:
    """``||J(s)||_F^2`` per state, ``J = da/ds`` by ``vmap(jacrev)``: ``[N, obs] -> [N]``."""
    jacobians = torch.func.vmap(torch.func.jacrev(lambda s: policy_fn(params, s)))(flat_states)
    return jacobians.pow(2).flatten(1).sum(-1)


def _spatial_hutchinson(policy_fn: PolicyFn, params: Tree, flat_states: Tensor, probes: Tensor) -> Tensor:
    """Unbiased ``||J(s)||_F^2 = E_v ||J v||^2`` for Rademacher ``v`` (``E[v v^T] = I``),
    one forward-mode ``jvp`` per probe: ``[N, obs], [P, N, obs] -> [N]``."""

    def squared_jvp(v: Tensor) -> Tensor:
        jv = torch.func.jvp(lambda s: policy_fn(params, s), (flat_states,), (v,))[1]
        return jv.pow(2).sum(-1)

    return torch.func.vmap(squared_jvp)(probes).mean(0)


def rademacher_probes(num_probes: int, like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``num_probes`` tensors of independent +-1 entries shaped like ``like``."""
    bits = torch.randint(0, 2, (num_probes, *like.shape), generator=generator, device=like.device)
    return bits.to(like.dtype) * 2 - 1


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return values.mean() if values.numel() else values.sum()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def minimum_attention(
    policy_fn: PolicyFn,
    params: Tree,
    states: Tensor,
    *,
    dt: float,
    spatial_weight: float = 1.0,
    temporal_weight: float = 1.0,
    valid: Tensor | None = None,
    estimator: str = "exact",
    num_probes: int = 1,
    generator: torch.Generator | None = None,
    reduce: bool = True,
) -> MinimumAttention:
    """The minimum attention terms of ``policy_fn`` on a batch of trajectories.

    Args:
        policy_fn: ``(params, states[..., obs_dim]) -> actions[..., act_dim]``, acting on
            each state independently (the mean action of a stochastic policy).
        params: the policy's parameter tree; every term is differentiable in it.
        states: time-major states ``[T, ..., obs_dim]``; consecutive rows along the
            first axis are consecutive control steps.
        dt: the control time step in seconds (``env.unwrapped.dt`` for MuJoCo).
        spatial_weight: ``alpha_x`` in ``total = alpha_x * spatial + alpha_t * temporal``.
        temporal_weight: ``alpha_t``.
        valid: ``[T, ...]`` bool mask of real steps; a pair ``(t, t+1)`` counts in the
            temporal term only when both are valid, so an episode boundary marked
            by an invalid step is never differenced. A term with no steps (or pairs,
            when ``T = 1``) to average is 0.
        estimator: ``"exact"`` (``vmap(jacrev)``, cost ``act_dim`` backward passes)
            or ``"hutchinson"`` (``num_probes`` ``jvp`` probes, unbiased, cost
            independent of the dimensions).
        num_probes: Rademacher probes of the Hutchinson estimate.
        generator: draws the probes.
        reduce: means (0-dim) or per-step values.

    Returns:
        `MinimumAttention` ``(spatial, temporal, total)``.
    """
    if not dt > 0:
        raise ValueError(f"`dt` must be > 0; got {dt}")
    if states.ndim < 2:
        raise ValueError(f"`states` must be time-major [T, ..., obs_dim]; got shape {tuple(states.shape)}")
    if estimator not in ("exact", "hutchinson"):
        raise ValueError(f"`estimator` must be 'exact' or 'hutchinson'; got {estimator!r}")
    if not (isinstance(num_probes, int) and num_probes >= 1):
        raise ValueError(f"`num_probes` must be an int >= 1; got {num_probes!r}")
    if valid is not None and valid.dtype != torch.bool:
        raise ValueError(f"`valid` must be a bool mask; got dtype {valid.dtype}")
    if valid is not None and valid.shape != states.shape[:-1]:
        raise ValueError(
            f"`valid` must have shape {tuple(states.shape[:-1])} (states without the last axis); "
            f"got {tuple(valid.shape)}"
        )

    flat_states = states.reshape(-1, states.shape[-1])
    if estimator == "exact":
        spatial_per_step = _spatial_exact(policy_fn, params, flat_states)
    else:
        probes = rademacher_probes(num_probes, flat_states, generator)
        spatial_per_step = _spatial_hutchinson(policy_fn, params, flat_states, probes)
    spatial_per_step = spatial_per_step.reshape(states.shape[:-1])

    actions = policy_fn(params, states)
    rates = (actions[1:] - actions[:-1]) / dt
    temporal_per_pair = rates.pow(2).sum(-1)
    pair_valid = None if valid is None else valid[1:] & valid[:-1]

    if reduce:
        spatial = _masked_mean(spatial_per_step, valid)
        temporal = _masked_mean(temporal_per_pair, pair_valid)
    else:
        if valid is not None:
            spatial_per_step = spatial_per_step * valid.to(spatial_per_step.dtype)
            temporal_per_pair = temporal_per_pair * pair_valid.to(temporal_per_pair.dtype)
        spatial = spatial_per_step
        temporal = torch.cat([torch.zeros_like(temporal_per_pair[:1]), temporal_per_pair])
    return MinimumAttention(spatial, temporal, spatial_weight * spatial + temporal_weight * temporal)
