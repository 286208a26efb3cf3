"""Rollouts in learned models, batched over models and start states (MB-MPO's imagined data)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import torch
from torch import Tensor
from torch.distributions import Distribution

from bilevel.rl.trajectories import Trajectories

__all__ = ["Dynamics", "Imagined", "imagine"]


class Dynamics(Protocol):
    """One model step for ``M`` models at once: ``(obs [M, N, D], act [M, N, A], *, generator)``
    -> ``(next_obs [M, N, D], reward [M, N] | None)``. ``ProbabilisticEnsemble.predict_members``
    (elites as the models) satisfies it; ``functools.partial(..., deterministic=True)`` gives mean steps."""

    def __call__(
        self, obs: Tensor, act: Tensor, *, generator: torch.Generator | None
    ) -> tuple[Tensor, Tensor | None]: ...


RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(obs [M, N, D], act [M, N, A], next_obs [M, N, D]) -> reward [M, N]``."""

TerminationFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(obs, act, next_obs) -> terminated [M, N]`` (bool)."""


class Imagined(NamedTuple):
    """A time-major imagined batch; ``T`` steps, ``M`` models, ``N`` start states. The per-step fields
    follow ``Trajectories`` with two batch axes, so ``bilevel.rl.gae`` applies to them as they are.

    ``obs [T, M, N, D]``: the state each action was taken in. ``actions [T, M, N, A]`` (detached).
    ``rewards [T, M, N]``: zero where ``valid`` is False. ``next_obs [T, M, N, D]``: the model's successor
    (``next_obs[-1]`` is where a value bootstraps). ``log_probs [T, M, N]``: ``log pi(a_t | s_t)``,
    differentiable in the policy's parameters. ``terminated [T, M, N]``: the step ended the episode.
    ``truncated [T, M, N]``: the horizon cut a live episode (last step only). ``valid [T, M, N]``: no earlier
    step terminated, i.e. the step is part of the episode.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    log_probs: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor

    def to_trajectories(self) -> Trajectories:
        """The same steps as a ``Trajectories`` batch ``[T, M * N]``, stream ``b = m * N + n``; each stream
        is one episode (ended by termination or by the horizon)."""
        horizon = self.rewards.shape[0]
        flat = [x.flatten(1, 2) for x in self]
        obs, actions, rewards, next_obs, log_probs, terminated, truncated, valid = flat
        time = torch.arange(horizon, device=rewards.device).unsqueeze(-1).expand_as(rewards)
        return Trajectories(
            obs=obs,
            actions=actions,
            rewards=rewards,
            next_obs=next_obs,
            terminated=terminated,
            truncated=truncated,
            valid=valid,
            time=time,
            log_probs=log_probs,
            episode_returns=rewards.sum(0),
            episode_lengths=valid.sum(0),
        )


def imagine(
    dynamics: Dynamics,
    policy: Callable[[Tensor], Distribution],
    start_states: Tensor,
    horizon: int,
    reward_fn: RewardFn | None,
    *,
    termination_fn: TerminationFn | None = None,
    generator: torch.Generator | None = None,
    deterministic: bool = False,
) -> Imagined:
    """Roll ``policy`` out for ``horizon`` steps in ``M`` models from ``N`` start states each.

    Every step is one batched computation over all ``M x N`` rows:
    ``a_t ~ pi(. | s_t)`` (``policy(obs).sample(generator=generator)``; ``.mode`` when
    ``deterministic``), ``log_probs[t] = pi.log_prob(a_t)``,
    ``(s_{t+1}, r_model) = dynamics(s_t, a_t, generator=generator)``,
    ``r_t = reward_fn(s_t, a_t, s_{t+1})`` (``r_model`` when ``reward_fn`` is None).

    Contract:
    - ``start_states [M, N, D]``: model ``m`` starts from ``start_states[m]``; for shared starts pass
      ``s0.expand(M, N, D)``.
    - ``policy(obs [M, N, D])`` returns a distribution with batch shape ``[M, N]`` whose ``sample``
      accepts ``generator=`` (``DiagGaussian``, ``TanhGaussian``) and whose ``log_prob`` is
      differentiable in the policy parameters; typically
      ``lambda obs: functional_call(net, params, (obs,))``. Per-model policies (one adapted parameter
      tree per model) build their distribution from a ``vmap``-ped mean over ``M``.
    - ``dynamics`` runs under ``torch.no_grad``: states, actions and rewards are constants, and the
      only gradient path is through ``log_probs`` (score-function estimators, as in MB-MPO).
    - After a row terminates it stays at the state it terminated from (``obs`` and ``next_obs`` both);
      its later steps are computed but marked invalid, with zero reward.
    """
    if start_states.dim() != 3:
        raise ValueError(f"`start_states` must be [M, N, obs_dim]; got shape {tuple(start_states.shape)}")
    if horizon < 1:
        raise ValueError(f"`horizon` must be at least 1; got {horizon}")
    obs = start_states
    alive = torch.ones(start_states.shape[:2], dtype=torch.bool, device=start_states.device)
    steps: list[tuple[Tensor, ...]] = []
    for _ in range(horizon):
        dist = policy(obs)
        action = dist.mode if deterministic else dist.sample(generator=generator)
        log_prob = dist.log_prob(action)
        with torch.no_grad():
            next_obs, model_reward = dynamics(obs, action.detach(), generator=generator)
            reward = model_reward if reward_fn is None else reward_fn(obs, action, next_obs)
            if reward is None:
                raise ValueError("`reward_fn` is None but `dynamics` predicts no reward")
            terminated = (
                torch.zeros_like(alive) if termination_fn is None else termination_fn(obs, action, next_obs).bool()
            )
        next_obs = torch.where(alive.unsqueeze(-1), next_obs, obs)
        steps.append((obs, action.detach(), torch.where(alive, reward, 0.0), next_obs, log_prob, terminated & alive))
        alive = alive & ~terminated
        obs = torch.where(alive.unsqueeze(-1), next_obs, obs)
    obs_t, actions, rewards, next_obs_t, log_probs, terminated_t = (torch.stack(c) for c in zip(*steps, strict=True))
    valid = torch.cat([torch.ones_like(alive).unsqueeze(0), ~terminated_t.cumsum(0)[:-1].bool()])
    truncated = torch.zeros_like(terminated_t)
    truncated[-1] = valid[-1] & ~terminated_t[-1]
    return Imagined(obs_t, actions, rewards, next_obs_t, log_probs, terminated_t, truncated, valid)
