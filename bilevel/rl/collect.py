"""Collecting `Trajectories` from Gymnasium vector environments.

Gymnasium 1.x vector environments autoreset in *next-step* mode: the step that ends an
episode returns that episode's final observation, and the following call to ``step``
ignores its action, resets the sub-environment and returns the new episode's first
observation with reward 0. That reset step is not a transition of the MDP; the
collectors here mark it ``valid=False``. Observation and action spaces must be arrays
(``Box``, ``Discrete``, ``MultiDiscrete``, ...), not ``Dict`` or ``Tuple``.

The policy contract, `PolicyFn`: ``policy_fn(obs) -> (actions, log_probs)`` where ``obs``
is a ``[B, *obs_shape]`` tensor on the learner's device (floating observations in the
default dtype), ``actions`` is ``[B, *action_shape]`` in the environment's action space
(any device; it is sent to the environments as a NumPy array), and ``log_probs`` is
``[B]`` (the log-probability of each action under the policy) or None. It is called
under ``torch.no_grad()``, once per vector step, on every sub-environment including
those whose action will be ignored. Its randomness is its own: seed its generator.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeAlias

import gymnasium as gym
import numpy as np
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv, VectorEnv
from torch import Tensor

from bilevel.rl.trajectories import PER_STEP_FIELDS, Trajectories

__all__ = ["PolicyFn", "collect", "collect_episodes", "make_vector_env"]

PolicyFn: TypeAlias = Callable[[Tensor], tuple[Tensor, Tensor | None]]
"""``policy_fn(obs [B, *obs_shape]) -> (actions [B, *action_shape], log_probs [B] or None)``."""


def make_vector_env(
    make_env: Callable[[], gym.Env],
    num_envs: int,
    *,
    asynchronous: bool = False,
    **vector_kwargs: Any,
) -> VectorEnv:
    """``num_envs`` copies of ``make_env()`` in a vector environment with next-step autoreset.

    ``asynchronous=True`` runs each copy in its own process (`AsyncVectorEnv`), worth it
    when one step of the environment costs more than the inter-process round trip
    (MuJoCo tasks with several cores); otherwise they run in this process
    (`SyncVectorEnv`). ``vector_kwargs`` go to the vector environment's constructor."""
    _check_positive("num_envs", num_envs)
    vector_env_class = AsyncVectorEnv if asynchronous else SyncVectorEnv
    return vector_env_class([make_env] * num_envs, autoreset_mode=AutoresetMode.NEXT_STEP, **vector_kwargs)


def collect(
    envs: VectorEnv,
    policy_fn: PolicyFn,
    num_steps: int,
    *,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> Trajectories:
    """Reset ``envs`` (with ``seed``, sub-environment ``i`` gets ``seed + i``) and run
    ``policy_fn`` for ``num_steps`` vector steps.

    Returns ``Trajectories`` with ``T = num_steps``, ``B = envs.num_envs`` on ``device``.
    Episodes run on across autoresets; each autoreset step is stored with
    ``valid=False`` (and zero reward, no done flag). ``episode_returns`` and
    ``episode_lengths`` cover the episodes that ended within the batch. The last step's
    ``next_obs`` is where an unfinished episode is to be bootstrapped from."""
    _check_positive("num_steps", num_steps)
    _check_next_step_autoreset(envs)
    device = torch.device(device)
    obs = envs.reset(seed=seed)[0]
    is_reset_step = np.zeros(envs.num_envs, dtype=bool)
    time = np.zeros(envs.num_envs, dtype=np.int64)
    running_return = np.zeros(envs.num_envs)
    steps: list[_Step] = []
    finished_returns: list[np.ndarray] = []
    finished_lengths: list[np.ndarray] = []
    for _ in range(num_steps):
        step = _step(envs, policy_fn, obs, valid=~is_reset_step, time=time, device=device)
        steps.append(step)
        ended = step.terminated | step.truncated
        running_return = running_return + step.rewards
        finished_returns.append(running_return[ended])
        finished_lengths.append(time[ended] + 1)
        running_return = running_return * ~ended
        time = np.where(step.valid, time + 1, 0)
        is_reset_step = ended
        obs = step.next_obs
    return _stack(
        steps,
        _as_tensor(np.concatenate(finished_returns), device),
        torch.as_tensor(np.concatenate(finished_lengths), device=device),
        device,
    )


def collect_episodes(
    envs: VectorEnv,
    policy_fn: PolicyFn,
    num_episodes: int,
    *,
    horizon: int,
    seed: int | None = None,
    device: torch.device | str = "cpu",
) -> Trajectories:
    """``num_episodes`` whole episodes, one per column: MAML-RL's batch of episodes.

    Runs ``ceil(num_episodes / envs.num_envs)`` rounds; each round resets every
    sub-environment (round ``r`` with ``seed + r * num_envs`` when ``seed`` is given) and
    steps until every sub-environment's first episode has ended or ``horizon`` steps
    have passed. Steps after an episode's end are padding (``valid=False``).

    Returns ``Trajectories`` with ``B = num_episodes`` and ``T`` the longest episode
    (at most ``horizon``); ``time[t, b] = t`` on valid steps. Column ``b`` holds one
    episode from its first step; an episode cut at ``horizon`` has no done flag at its
    last step. ``episode_returns`` and ``episode_lengths`` have one entry per column,
    cut episodes included. Columns of the last round beyond ``num_episodes`` are dropped."""
    _check_positive("num_episodes", num_episodes)
    _check_positive("horizon", horizon)
    _check_next_step_autoreset(envs)
    device = torch.device(device)
    num_rounds = math.ceil(num_episodes / envs.num_envs)
    rounds = [
        _collect_round(
            envs,
            policy_fn,
            horizon,
            seed=None if seed is None else seed + round_index * envs.num_envs,
            device=device,
        )
        for round_index in range(num_rounds)
    ]
    longest = max(len(round_steps) for round_steps in rounds)
    columns = _concat_batch([_stack(_pad(round_steps, longest), None, None, device) for round_steps in rounds])
    return _first_columns(columns, num_episodes)


@dataclass(frozen=True)
class _Step:
    """One vector step: the environment's outputs as NumPy arrays ``[B, ...]`` (converted
    once per batch by `_stack`), the policy's outputs as tensors."""

    obs: np.ndarray
    actions: Tensor
    rewards: np.ndarray
    next_obs: np.ndarray
    terminated: np.ndarray
    truncated: np.ndarray
    valid: np.ndarray
    time: np.ndarray
    log_probs: Tensor | None


def _step(
    envs: VectorEnv, policy_fn: PolicyFn, obs: np.ndarray, *, valid: np.ndarray, time: np.ndarray,
    device: torch.device,
) -> _Step:
    """Query the policy at ``obs``, step ``envs`` and zero the reward and done flags of
    the invalid sub-environments."""
    with torch.no_grad():
        actions, log_probs = policy_fn(_as_tensor(obs, device))
    next_obs, rewards, terminated, truncated, _ = envs.step(actions.detach().cpu().numpy())
    return _Step(
        obs=obs,
        actions=actions,
        rewards=np.asarray(rewards, dtype=np.float64) * valid,
        next_obs=next_obs,
        terminated=np.asarray(terminated, dtype=bool) & valid,
        truncated=np.asarray(truncated, dtype=bool) & valid,
        valid=valid,
        time=time * valid,
        log_probs=log_probs,
    )


def _collect_round(
    envs: VectorEnv, policy_fn: PolicyFn, horizon: int, *, seed: int | None, device: torch.device
) -> list[_Step]:
    """Steps of one episode per sub-environment, until all have ended or ``horizon``."""
    obs = envs.reset(seed=seed)[0]
    running = np.ones(envs.num_envs, dtype=bool)
    steps: list[_Step] = []
    for t in range(horizon):
        time = np.full(envs.num_envs, t, dtype=np.int64)
        step = _step(envs, policy_fn, obs, valid=running, time=time, device=device)
        steps.append(step)
        running = running & ~(step.terminated | step.truncated)
        if not running.any():
            break
        obs = step.next_obs
    return steps


def _stack(
    steps: list[_Step], episode_returns: Tensor | None, episode_lengths: Tensor | None, device: torch.device
) -> Trajectories:
    """Stack steps along a new time axis onto ``device``; without episode statistics, every
    column is taken to be one episode from its first step."""
    per_step = {name: _optional(functools.partial(_stack_field, device=device), _field(steps, name))
                for name in PER_STEP_FIELDS}
    if episode_returns is None:
        episode_returns = per_step["rewards"].sum(dim=0)
        episode_lengths = per_step["valid"].sum(dim=0)
    return Trajectories(**per_step, episode_returns=episode_returns, episode_lengths=episode_lengths)


def _stack_field(values: list[Any], device: torch.device) -> Tensor:
    if isinstance(values[0], Tensor):
        return torch.stack(values).to(device)
    return _as_tensor(np.stack(values), device)


def _pad(steps: list[_Step], length: int) -> list[_Step]:
    """Extend ``steps`` to ``length`` with invalid all-zero steps."""
    padding = _Step(**{name: _optional(_zeros_like, getattr(steps[-1], name)) for name in PER_STEP_FIELDS})
    return steps + [padding] * (length - len(steps))


def _zeros_like(value: Tensor | np.ndarray) -> Tensor | np.ndarray:
    return torch.zeros_like(value) if isinstance(value, Tensor) else np.zeros_like(value)


def _concat_batch(batches: list[Trajectories]) -> Trajectories:
    """Join batches of equal ``T`` along the batch axis."""
    per_step = {
        name: _optional(functools.partial(torch.cat, dim=1), _field(batches, name))
        for name in PER_STEP_FIELDS
    }
    return Trajectories(
        **per_step,
        episode_returns=torch.cat([batch.episode_returns for batch in batches]),
        episode_lengths=torch.cat([batch.episode_lengths for batch in batches]),
    )


def _first_columns(batch: Trajectories, count: int) -> Trajectories:
    """The first ``count`` columns (episodes) of an episode batch."""
    per_step = {
        name: _optional(lambda value: value[:, :count], getattr(batch, name)) for name in PER_STEP_FIELDS
    }
    return Trajectories(
        **per_step,
        episode_returns=batch.episode_returns[:count],
        episode_lengths=batch.episode_lengths[:count],
    )


def _field(items: list[Any], name: str) -> list[Tensor] | None:
    """Field ``name`` of every item, or None where that optional field is absent."""
    values = [getattr(item, name) for item in items]
    return None if values[0] is None else values


def _optional(fn: Callable[[Any], Tensor], value: Any) -> Tensor | None:
    """``fn(value)``, passing an absent optional field (None) through."""
    return None if value is None else fn(value)


def _as_tensor(array: np.ndarray, device: torch.device) -> Tensor:
    """``array`` on ``device``; floating arrays in the default dtype, others as they are."""
    tensor = torch.as_tensor(np.asarray(array), device=device)
    return tensor.to(torch.get_default_dtype()) if tensor.is_floating_point() else tensor


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer; got {value!r}")


def _check_next_step_autoreset(envs: VectorEnv) -> None:
    mode = envs.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
    if AutoresetMode(mode) is not AutoresetMode.NEXT_STEP:
        raise ValueError(
            f"`envs` must autoreset in next-step mode (AutoresetMode.NEXT_STEP); got {mode}. "
            "Build them with `make_vector_env`."
        )
