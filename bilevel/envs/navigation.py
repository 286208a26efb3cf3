"""2-D point navigation (MAML's benchmark) in pure torch, batched over tasks and envs.

A point starts at the origin and moves by its clipped action,
``p_{t+1} = p_t + clip(a_t, -0.1, 0.1)``, and receives ``r_t = -||p_{t+1} - g||_2`` for the
task's goal ``g ~ U[-0.5, 0.5]^2``. The observation is the position; the goal is not
observed. Episodes never terminate and are truncated after 100 steps (pytorch-maml-rl's env also ends an
episode once the point is within 0.01 of the goal on both axes).

Shape convention of :class:`BatchedNavigation2D`: ``T`` tasks times ``E`` envs per task.
Goals are ``[T, 2]``; positions, observations and actions ``[T, E, 2]``; rewards and
flags ``[T, E]``. The envs of a batch step in lockstep, so all are truncated together.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor

MAX_ACTION = 0.1
GOAL_BOUND = 0.5
HORIZON = 100


@dataclass(frozen=True)
class GoalTask:
    """Reach ``goal`` = (x, y)."""

    goal: tuple[float, float]


def goals_tensor(
    tasks: list[GoalTask], device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Tensor:
    """Goals of ``tasks`` stacked into a tensor of shape ``[len(tasks), 2]``, in ``dtype`` (torch's default dtype
    when None: the batched envs then run in the dtype a float64 session expects)."""
    return torch.tensor([task.goal for task in tasks], dtype=dtype or torch.get_default_dtype(), device=device)


def navigation_step(
    position: Tensor, action: Tensor, goal: Tensor, max_action: float = MAX_ACTION
) -> tuple[Tensor, Tensor]:
    """One step: ``p' = p + clip(a, -max_action, max_action)``, ``r = -||p' - g||_2``.

    ``position`` and ``action`` are ``[..., 2]``, ``goal`` broadcasts against them. Returns
    ``(p' [..., 2], r [...])``.
    """
    next_position = position + action.clamp(-max_action, max_action)
    return next_position, -torch.linalg.vector_norm(next_position - goal, dim=-1)


def _check_dynamics(horizon: int, max_action: float) -> None:
    if not (isinstance(horizon, numbers.Integral) and not isinstance(horizon, bool) and horizon >= 1):
        raise ValueError(f"`horizon` must be an int >= 1; got {horizon!r}")
    if not 0 < max_action < math.inf:
        raise ValueError(f"`max_action` must be finite and > 0; got {max_action}")


class BatchedNavigation2D:
    """``T`` navigation tasks x ``num_envs_per_task`` envs stepped as one tensor computation.

    Runs on the device and dtype of the goals passed to :meth:`reset`.
    """

    def __init__(self, num_envs_per_task: int = 1, horizon: int = HORIZON, max_action: float = MAX_ACTION):
        _check_dynamics(horizon, max_action)
        if not (isinstance(num_envs_per_task, numbers.Integral) and num_envs_per_task >= 1):
            raise ValueError(f"`num_envs_per_task` must be an int >= 1; got {num_envs_per_task!r}")
        self.num_envs_per_task = num_envs_per_task
        self.horizon = horizon
        self.max_action = max_action
        self.goals: Tensor | None = None
        self.positions: Tensor | None = None
        self.elapsed_steps = 0

    def reset(self, goals: Tensor) -> Tensor:
        """Start every env at the origin; ``goals [T, 2]`` -> observations ``[T, E, 2]`` (zeros)."""
        if goals.ndim != 2 or goals.shape[-1] != 2:
            raise ValueError(f"goals must have shape [num_tasks, 2], got {tuple(goals.shape)}")
        self.goals = goals[:, None, :]
        self.positions = goals.new_zeros(goals.shape[0], self.num_envs_per_task, 2)
        self.elapsed_steps = 0
        return self.positions.clone()

    def step(self, actions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``actions [T, E, 2]`` -> ``(obs [T, E, 2], reward, terminated, truncated)``; others ``[T, E]``."""
        if self.positions is None or self.goals is None:
            raise RuntimeError("call reset(goals) before step")
        if self.elapsed_steps >= self.horizon:
            raise RuntimeError(f"episode already truncated after {self.horizon} steps; call reset(goals)")
        if actions.shape != self.positions.shape:
            raise ValueError(f"actions must have shape {tuple(self.positions.shape)}, got {tuple(actions.shape)}")
        self.positions, reward = navigation_step(self.positions, actions, self.goals, self.max_action)
        self.elapsed_steps += 1
        terminated = torch.zeros_like(reward, dtype=torch.bool)
        truncated = torch.full_like(terminated, self.elapsed_steps >= self.horizon)
        return self.positions.clone(), reward, terminated, truncated


class Navigation2DEnv(gym.Env):
    """Single-task Gymnasium env of the same dynamics; float32 observations, truncated at ``horizon``."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, task: GoalTask | None = None, horizon: int = HORIZON, max_action: float = MAX_ACTION):
        _check_dynamics(horizon, max_action)
        self.task = task or GoalTask((GOAL_BOUND / 2, GOAL_BOUND / 2))
        self.horizon = horizon
        self.max_action = max_action
        self.observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
        self.action_space = gym.spaces.Box(-max_action, max_action, shape=(2,), dtype=np.float32)
        self._goal = torch.tensor(self.task.goal, dtype=torch.float32)
        self._position = torch.zeros(2)
        self._elapsed_steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self._position = torch.zeros(2)
        self._elapsed_steps = 0
        return self._position.numpy().copy(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        action_tensor = torch.as_tensor(np.asarray(action, dtype=np.float32))
        self._position, reward = navigation_step(self._position, action_tensor, self._goal, self.max_action)
        self._elapsed_steps += 1
        truncated = self._elapsed_steps >= self.horizon
        return self._position.numpy().copy(), float(reward), False, truncated, {}


class Navigation2D:
    """Task family: goals ``g ~ U[-0.5, 0.5]^2``."""

    env_id = "bilevel/Navigation2D-v0"

    def sample_tasks(self, n: int, generator: np.random.Generator) -> list[GoalTask]:
        goals = generator.uniform(-GOAL_BOUND, GOAL_BOUND, size=(n, 2))
        return [GoalTask((float(x), float(y))) for x, y in goals]

    def make_env(self, task: GoalTask, max_episode_steps: int | None = None, **kwargs: Any) -> gym.Env:
        """The single-task env; ``max_episode_steps`` (the keyword of the MuJoCo families' ``make_env``)
        sets its ``horizon``, which ends the episode by truncation."""
        if max_episode_steps is not None:
            if "horizon" in kwargs and kwargs["horizon"] != max_episode_steps:
                raise ValueError(f"`max_episode_steps` ({max_episode_steps}) and `horizon` ({kwargs['horizon']}) "
                                 "disagree; give one")
            kwargs["horizon"] = max_episode_steps
        return gym.make(self.env_id, task=task, **kwargs)

    def make_batched(self, num_envs_per_task: int = 1, **kwargs: Any) -> BatchedNavigation2D:
        return BatchedNavigation2D(num_envs_per_task, **kwargs)
