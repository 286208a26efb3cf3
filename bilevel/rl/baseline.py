"""The linear feature baseline of MAML-RL (Duan et al. 2016, "Benchmarking deep reinforcement
learning for continuous control"; Finn et al. 2017), as pure functions.

A state value is approximated as ``V(s, t) = phi(s, t) . w`` with the features
``phi(s, t) = [s, s^2, u, u^2, u^3, 1]``, ``u = t / 100``, and ``w`` fitted to the returns of
one batch by ridge regression. Everything is branch-free tensor code, so one call under
``torch.func.vmap`` fits a baseline per task.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["fit_linear_baseline", "linear_baseline_features", "linear_baseline_values"]

TIME_SCALE = 100.0
"""``u = t / TIME_SCALE`` in the features."""

DAMPINGS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The ridge penalties tried in turn, as pytorch-maml-rl does (1e-5, times 10, five times)."""


def linear_baseline_features(obs: Tensor, time: Tensor) -> Tensor:
    """``phi(s, t) = [s, s^2, u, u^2, u^3, 1]`` with ``u = t / 100``.

    Args:
        obs: ``[..., D]`` observations.
        time: ``[...]`` step index within the episode.

    Returns:
        ``[..., 2 D + 4]`` features in ``obs``'s dtype.
    """
    if obs.shape[:-1] != time.shape:
        raise ValueError(
            f"`time` must have the shape of `obs` without its last axis, {tuple(obs.shape[:-1])}; "
            f"got {tuple(time.shape)}"
        )
    scaled_time = (time.to(obs.dtype) / TIME_SCALE).unsqueeze(-1)
    return torch.cat(
        [obs, obs**2, scaled_time, scaled_time**2, scaled_time**3, torch.ones_like(scaled_time)], dim=-1
    )


def fit_linear_baseline(
    obs: Tensor,
    returns: Tensor,
    time: Tensor,
    valid: Tensor | None = None,
    *,
    dampings: tuple[float, ...] = DAMPINGS,
) -> Tensor:
    """Ridge regression of ``returns`` on the features of the valid steps.

    ``w = (X^T X + c I)^{-1} X^T G`` with ``X`` the features and ``G`` the returns of the
    valid steps. ``c`` is the first of ``dampings`` whose linear system solves to a finite
    ``w`` (the last one when none does). All candidates are solved in one batched call and
    the choice is a tensor selection, so the function has no data-dependent control flow
    and works under ``torch.func.vmap``.

    Args:
        obs: ``[..., D]`` observations.
        returns: ``[...]`` regression targets, usually discounted returns.
        time: ``[...]`` step index within the episode.
        valid: ``[...]`` bool mask of the steps to fit; None means all.
        dampings: increasing ridge penalties ``c`` to try, each >= 0 (0 tries plain least
            squares first).

    Returns:
        ``[2 D + 4]`` weights ``w``.
    """
    if returns.shape != obs.shape[:-1]:
        raise ValueError(
            f"`returns` must have the shape of `obs` without its last axis, {tuple(obs.shape[:-1])}; "
            f"got {tuple(returns.shape)}"
        )
    if not dampings or min(dampings) < 0:
        raise ValueError(f"`dampings` must be a non-empty sequence of non-negative numbers; got {dampings}")
    weight = torch.ones_like(returns) if valid is None else valid.to(returns.dtype)
    features = linear_baseline_features(obs, time) * weight.unsqueeze(-1)
    features = features.reshape(-1, features.shape[-1])
    targets = (returns * weight).reshape(-1)
    gram = features.mT @ features
    moment = features.mT @ targets
    penalties = torch.tensor(dampings, dtype=gram.dtype, device=gram.device)
    identity = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    systems = gram + penalties[:, None, None] * identity
    candidates, info = torch.linalg.solve_ex(systems, moment.expand(len(dampings), -1))
    solved = (info == 0) & torch.isfinite(candidates).all(dim=-1)
    acceptable = torch.cat([solved[:-1], torch.ones_like(solved[-1:])])
    first_acceptable = torch.arange(len(dampings), device=gram.device) == acceptable.int().argmax()
    return torch.where(first_acceptable[:, None], candidates, 0.0).sum(dim=0)


def linear_baseline_values(weights: Tensor, obs: Tensor, time: Tensor) -> Tensor:
    """``V(s, t) = phi(s, t) . w``.

    Args:
        weights: ``[2 D + 4]`` from `fit_linear_baseline`.
        obs: ``[..., D]`` observations.
        time: ``[...]`` step index within the episode.

    Returns:
        ``[...]`` baseline values.
    """
    features = linear_baseline_features(obs, time)
    if weights.shape != features.shape[-1:]:
        raise ValueError(
            f"`weights` must have shape ({features.shape[-1]},) for {obs.shape[-1]}-dimensional `obs`; "
            f"got {tuple(weights.shape)}"
        )
    return features @ weights
