"""Locomotion task families on Gymnasium's v5 MuJoCo envs: HalfCheetah velocity and direction, Ant direction.

The forward velocity ``v`` of a step is the env's own ``info["x_velocity"]``: the change of
the root (HalfCheetah) or torso (Ant) x position over the step divided by ``dt``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, SupportsFloat

import gymnasium as gym
import numpy as np
from gymnasium.envs.mujoco.ant_v5 import AntEnv
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from torch import Tensor

from bilevel.envs.batched_mujoco import BatchedHalfCheetah, direction_rewards, velocity_rewards
from bilevel.envs.rewards import (
    TASK_CTRL_COST_WEIGHT,
    half_cheetah_direction_reward,
    half_cheetah_velocity_reward,
)

DEFAULT_MAX_EPISODE_STEPS = 200
ANT_HEALTHY_REWARD = 0.05
ANT_INFO_REWARD_TERMS = ("reward_contact", "reward_survive")

RewardFn = Callable[[Tensor, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class VelocityTask:
    """Run forward at ``target_velocity`` (m/s)."""

    target_velocity: float


@dataclass(frozen=True)
class DirectionTask:
    """Run along ``direction`` in {-1, +1} of the x axis."""

    direction: int


class VelocityReward(gym.Wrapper):
    """Replaces the reward by ``r = -|v - v*| - c ||a||^2`` with ``v = info["x_velocity"]``.

    ``c`` is ``ctrl_cost_weight`` (0.05) and ``a`` the action as passed to ``step``.
    The original reward stays available as ``info["base_reward"]``.
    """

    def __init__(self, env: gym.Env, target_velocity: float, ctrl_cost_weight: float = TASK_CTRL_COST_WEIGHT):
        super().__init__(env)
        self.target_velocity = float(target_velocity)
        self.ctrl_cost_weight = ctrl_cost_weight

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, base_reward, terminated, truncated, info = self.env.step(action)
        ctrl_cost = self.ctrl_cost_weight * float(np.sum(np.square(action, dtype=np.float64)))
        reward = -abs(info["x_velocity"] - self.target_velocity) - ctrl_cost
        return obs, reward, terminated, truncated, {**info, "base_reward": base_reward}


class DirectionReward(gym.Wrapper):
    """Replaces the reward by ``r = d * v - c ||a||^2 + sum_k info[k]`` with ``v = info["x_velocity"]``.

    ``d`` is ``direction``, ``c`` is ``ctrl_cost_weight`` (0.05) and ``k`` runs over
    ``info_reward_terms``: reward terms the base env reports in ``info`` that the task keeps
    (Ant direction keeps ``reward_contact`` and ``reward_survive``). The original reward
    stays available as ``info["base_reward"]``.
    """

    def __init__(
        self,
        env: gym.Env,
        direction: int,
        ctrl_cost_weight: float = TASK_CTRL_COST_WEIGHT,
        info_reward_terms: Sequence[str] = (),
    ):
        super().__init__(env)
        if direction not in (-1, 1):
            raise ValueError(f"direction must be -1 or +1, got {direction!r}")
        self.direction = direction
        self.ctrl_cost_weight = ctrl_cost_weight
        self.info_reward_terms = tuple(info_reward_terms)

    def step(self, action: Any) -> tuple[Any, SupportsFloat, bool, bool, dict[str, Any]]:
        obs, base_reward, terminated, truncated, info = self.env.step(action)
        ctrl_cost = self.ctrl_cost_weight * float(np.sum(np.square(action, dtype=np.float64)))
        kept_terms = sum(float(info[key]) for key in self.info_reward_terms)
        reward = self.direction * info["x_velocity"] - ctrl_cost + kept_terms
        return obs, reward, terminated, truncated, {**info, "base_reward": base_reward}


def make_half_cheetah_velocity_env(task: VelocityTask | None = None, **kwargs: Any) -> gym.Env:
    """HalfCheetah-v5 (``kwargs`` go to it) with the velocity reward; ``task`` defaults to v* = 1."""
    task = task or VelocityTask(1.0)
    return VelocityReward(HalfCheetahEnv(**kwargs), task.target_velocity)


def make_half_cheetah_direction_env(task: DirectionTask | None = None, **kwargs: Any) -> gym.Env:
    """HalfCheetah-v5 (``kwargs`` go to it) with the direction reward; ``task`` defaults to d = +1."""
    task = task or DirectionTask(1)
    return DirectionReward(HalfCheetahEnv(**kwargs), task.direction)


def make_ant_direction_env(task: DirectionTask | None = None, **kwargs: Any) -> gym.Env:
    """Ant-v5 with the direction reward ``d * v - 0.05 ||a||^2 - contact cost + survive bonus``.

    Contact handling: the external contact forces ``cfrc_ext`` are left out of the
    observation (27 dimensions instead of 105), as their clipped values are mostly zero and
    dominate the input; the Ant-v5 contact cost ``5e-4 ||clip(cfrc_ext, -1, 1)||^2`` stays
    in the reward; the survive bonus is 0.05 per healthy step (pytorch-maml-rl's value,
    Ant-v5's own 1.0 rewards standing still); an episode terminates when the torso height
    leaves [0.2, 1.0]. Keyword arguments override these Ant-v5 settings.
    """
    task = task or DirectionTask(1)
    ant_settings = {"include_cfrc_ext_in_observation": False, "healthy_reward": ANT_HEALTHY_REWARD, **kwargs}
    return DirectionReward(AntEnv(**ant_settings), task.direction, info_reward_terms=ANT_INFO_REWARD_TERMS)


class HalfCheetahVelocity:
    """Task family: HalfCheetah-v5 with target velocities ``v* ~ U[low, high]`` (default [0, 2])."""

    env_id = "bilevel/HalfCheetahVel-v0"

    def __init__(self, low: float = 0.0, high: float = 2.0):
        if not -math.inf < low <= high < math.inf:
            raise ValueError(f"target velocities need finite `low` <= `high`; got low={low}, high={high}")
        self.low = low
        self.high = high

    def sample_tasks(self, n: int, generator: np.random.Generator) -> list[VelocityTask]:
        return [VelocityTask(float(v)) for v in generator.uniform(self.low, self.high, size=n)]

    def make_env(
        self, task: VelocityTask, max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS, **kwargs: Any
    ) -> gym.Env:
        return gym.make(self.env_id, task=task, max_episode_steps=max_episode_steps, **kwargs)

    def make_batched_env(
        self, tasks: Sequence[VelocityTask], max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS, **kwargs: Any
    ) -> BatchedHalfCheetah:
        """One env per task, all stepped as one batch (`BatchedHalfCheetah`, same dynamics and reward)."""
        rewards = velocity_rewards([task.target_velocity for task in tasks])
        return BatchedHalfCheetah(len(tasks), reward_fn=rewards, max_episode_steps=max_episode_steps, **kwargs)

    def reward_fn(self, task: VelocityTask) -> RewardFn:
        """``reward_fn(obs, action, next_obs)`` of ``task``; see :mod:`bilevel.envs.rewards`."""
        return functools.partial(half_cheetah_velocity_reward, target_velocity=task.target_velocity)


class _DirectionFamily:
    env_id: str

    def sample_tasks(self, n: int, generator: np.random.Generator) -> list[DirectionTask]:
        return [DirectionTask(int(d)) for d in generator.choice([-1, 1], size=n)]

    def train_tasks(self) -> list[DirectionTask]:
        """Both directions: with two tasks a held-out split is impossible, so train and test coincide."""
        return [DirectionTask(-1), DirectionTask(1)]

    def test_tasks(self) -> list[DirectionTask]:
        return self.train_tasks()

    def make_env(
        self, task: DirectionTask, max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS, **kwargs: Any
    ) -> gym.Env:
        return gym.make(self.env_id, task=task, max_episode_steps=max_episode_steps, **kwargs)


class HalfCheetahDirection(_DirectionFamily):
    """Task family: HalfCheetah-v5 running forward (d = +1) or backward (d = -1)."""

    env_id = "bilevel/HalfCheetahDir-v0"

    def make_batched_env(
        self, tasks: Sequence[DirectionTask], max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS, **kwargs: Any
    ) -> BatchedHalfCheetah:
        """One env per task, all stepped as one batch (`BatchedHalfCheetah`, same dynamics and reward)."""
        rewards = direction_rewards([task.direction for task in tasks])
        return BatchedHalfCheetah(len(tasks), reward_fn=rewards, max_episode_steps=max_episode_steps, **kwargs)

    def reward_fn(self, task: DirectionTask) -> RewardFn:
        """``reward_fn(obs, action, next_obs)`` of ``task``; see :mod:`bilevel.envs.rewards`."""
        return functools.partial(half_cheetah_direction_reward, direction=float(task.direction))


class AntDirection(_DirectionFamily):
    """Task family: Ant-v5 walking along +x (d = +1) or -x (d = -1); see :func:`make_ant_direction_env`."""

    env_id = "bilevel/AntDir-v0"
