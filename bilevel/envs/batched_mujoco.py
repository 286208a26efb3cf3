"""HalfCheetah-v5 as one batched vector environment, stepped by ``mujoco.rollout``.

A `SyncVectorEnv` of Gymnasium MuJoCo envs pays Python overhead per sub-environment and
step (wrappers, checks, observation and info dicts) that is comparable to the simulation
itself. `BatchedHalfCheetah` keeps the ``N`` physics states as one array ``[N, nstate]``
(MuJoCo's ``mjSTATE_FULLPHYSICS``: time, qpos, qvel), advances all of them by
``frame_skip`` physics steps in one call of ``mujoco.rollout``, and computes observations,
rewards and resets with NumPy over the batch. The dynamics, observation, reward, reset
distribution and time limit are those of ``gymnasium.envs.mujoco.half_cheetah_v5``:

    obs = (qpos[1:], qvel)                           [N, 17]
    v   = (x_after - x_before) / dt,  dt = frame_skip * timestep
    r   = reward_fn(v, a)                            default: forward_weight * v - 0.1 ||a||^2
    reset: qpos = init_qpos + U(-0.1, 0.1),  qvel = init_qvel + 0.1 N(0, 1)

Each env draws its resets from its own generator, seeded like a Gymnasium vector env's
sub-environments (``reset(seed=s)`` seeds env ``i`` with ``s + i``, or with ``s[i]`` for a
list), so env ``i`` starts from the state a ``HalfCheetah-v5`` reset with that seed starts from.

It autoresets in next-step mode (the step after an episode ends returns the reset
observation with reward 0 and ignores the action), like `bilevel.rl.make_vector_env`.
The task families build it with per-environment rewards (`velocity_rewards`,
`direction_rewards`). Not reproduced: the constraint solver's warm start between steps
(a rollout restarts it each call; states agree with Gymnasium's to about 1e-9 per step).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import mujoco
import mujoco.rollout
import numpy as np
from gymnasium.envs.mujoco.half_cheetah_v5 import HalfCheetahEnv
from gymnasium.vector import AutoresetMode, VectorEnv

from bilevel.envs.rewards import TASK_CTRL_COST_WEIGHT

__all__ = ["BatchedHalfCheetah", "direction_rewards", "velocity_rewards"]

RewardFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``reward_fn(x_velocity [N], actions [N, 6]) -> rewards [N]``."""

_STATE = mujoco.mjtState.mjSTATE_FULLPHYSICS


def velocity_rewards(target_velocities: Sequence[float], ctrl_cost_weight: float = TASK_CTRL_COST_WEIGHT) -> RewardFn:
    """``r_i = -|v_i - v*_i| - c ||a_i||^2``: the velocity family's reward, one target per env."""
    targets = np.asarray(target_velocities, dtype=np.float64)
    return lambda v, a: -np.abs(v - targets) - ctrl_cost_weight * np.square(a).sum(-1)


def direction_rewards(directions: Sequence[int], ctrl_cost_weight: float = TASK_CTRL_COST_WEIGHT) -> RewardFn:
    """``r_i = d_i v_i - c ||a_i||^2``: the direction family's reward, one direction per env."""
    signs = np.asarray(directions, dtype=np.float64)
    return lambda v, a: signs * v - ctrl_cost_weight * np.square(a).sum(-1)


class BatchedHalfCheetah(VectorEnv):
    """``num_envs`` HalfCheetah-v5 envs stepped as one batch (see the module docstring).

    ``reward_fn`` maps ``(x_velocity [N], actions [N, 6])`` to rewards ``[N]`` (default:
    HalfCheetah-v5's ``forward_reward_weight * v - ctrl_cost_weight ||a||^2``);
    ``threads`` > 0 steps the batch on that many threads of MuJoCo's rollout pool.
    ``model_edit(model)`` may edit the shared ``MjModel`` once (a perturbation)."""

    metadata: ClassVar[dict[str, Any]] = {"autoreset_mode": AutoresetMode.NEXT_STEP}

    def __init__(
        self,
        num_envs: int,
        *,
        reward_fn: RewardFn | None = None,
        max_episode_steps: int = 1000,
        forward_reward_weight: float = 1.0,
        ctrl_cost_weight: float = 0.1,
        reset_noise_scale: float = 0.1,
        threads: int = 0,
        model_edit: Callable[[mujoco.MjModel], None] | None = None,
    ) -> None:
        if not isinstance(num_envs, int) or num_envs < 1:
            raise ValueError(f"`num_envs` must be a positive integer; got {num_envs!r}")
        if not isinstance(max_episode_steps, int) or max_episode_steps < 1:
            raise ValueError(f"`max_episode_steps` must be a positive integer; got {max_episode_steps!r}")
        if not isinstance(threads, int) or threads < 0:
            raise ValueError(f"`threads` must be an integer >= 0; got {threads!r}")
        template = HalfCheetahEnv()
        self.model, self.frame_skip = template.model, template.frame_skip
        if model_edit is not None:
            model_edit(self.model)
        self.dt = self.frame_skip * self.model.opt.timestep
        self.init_qpos, self.init_qvel = template.init_qpos.copy(), template.init_qvel.copy()
        self._datas = [mujoco.MjData(self.model) for _ in range(max(threads, 1))]
        template.close()

        self.num_envs = num_envs
        self.max_episode_steps = max_episode_steps
        self.reset_noise_scale = reset_noise_scale
        self.reward_fn = reward_fn or (
            lambda v, a: forward_reward_weight * v - ctrl_cost_weight * np.square(a).sum(-1))
        self._rollout = mujoco.rollout.Rollout(nthread=threads)
        nq, nv = self.model.nq, self.model.nv
        self._qpos = slice(1, 1 + nq)
        self._qvel = slice(1 + nq, 1 + nq + nv)
        assert mujoco.mj_stateSize(self.model, _STATE) >= 1 + nq + nv
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (nq - 1 + nv,), np.float64)
        low, high = self.model.actuator_ctrlrange.T.astype(np.float32)
        self.single_action_space = gym.spaces.Box(low, high, dtype=np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)

        self._state = np.zeros((num_envs, mujoco.mj_stateSize(self.model, _STATE)))
        self._trajectory = np.zeros((num_envs, self.frame_skip, self._state.shape[1]))
        self._models = [self.model] * num_envs
        self._elapsed = np.zeros(num_envs, dtype=np.int64)
        self._needs_reset = np.zeros(num_envs, dtype=bool)
        self._was_reset = False
        self._rngs = [np.random.default_rng() for _ in range(num_envs)]

    def _reset_states(self, mask: np.ndarray) -> None:
        scale = self.reset_noise_scale
        for i in np.flatnonzero(mask):
            rng = self._rngs[i]
            self._state[i] = 0.0
            self._state[i, self._qpos] = self.init_qpos + rng.uniform(-scale, scale, self.model.nq)
            self._state[i, self._qvel] = self.init_qvel + scale * rng.standard_normal(self.model.nv)
        self._elapsed[mask] = 0

    def _observe(self) -> np.ndarray:
        return np.concatenate([self._state[:, self._qpos][:, 1:], self._state[:, self._qvel]], axis=1)

    def reset(self, *, seed: int | Sequence[int] | None = None, options: dict[str, Any] | None = None):
        """Reset every env. ``seed`` (an int ``s``: env ``i`` gets ``s + i``; or ``N`` ints) reseeds the
        envs' generators as Gymnasium's ``reset(seed=...)`` does. Returns ``(obs [N, 17], {})``."""
        if seed is not None:
            seeds = [seed + i for i in range(self.num_envs)] if isinstance(seed, (int, np.integer)) else list(seed)
            if len(seeds) != self.num_envs:
                raise ValueError(f"`seed` must be an int or {self.num_envs} ints; got {len(seeds)} seeds")
            self._rngs = [np.random.default_rng(int(s)) for s in seeds]
        self._reset_states(np.ones(self.num_envs, dtype=bool))
        self._needs_reset[:] = False
        self._was_reset = True
        return self._observe(), {}

    def step(self, actions: np.ndarray):
        """Advance every env by one step of ``frame_skip`` physics steps; returns
        ``(obs [N, 17], rewards [N], terminated [N], truncated [N], {"x_velocity": [N]})``."""
        if not self._was_reset:
            raise gym.error.ResetNeeded("call reset() before step()")
        actions = np.asarray(actions, dtype=np.float64)
        if actions.shape != (self.num_envs, self.model.nu):
            raise ValueError(f"actions must have shape {(self.num_envs, self.model.nu)}; got {actions.shape}")
        if not np.all(np.isfinite(actions)):
            raise ValueError(f"actions must be finite; got {actions[~np.isfinite(actions).all(1)][0]}")
        x_before = self._state[:, self._qpos.start].copy()
        controls = np.repeat(actions[:, None, :], self.frame_skip, axis=1)
        self._rollout.rollout(self._models, self._datas, self._state, controls, nstep=self.frame_skip,
                              skip_checks=True, state=self._trajectory)
        self._state = self._trajectory[:, -1].copy()
        x_velocity = (self._state[:, self._qpos.start] - x_before) / self.dt
        rewards = self.reward_fn(x_velocity, actions)
        self._elapsed += 1
        truncated = self._elapsed >= self.max_episode_steps

        resetting = self._needs_reset
        if resetting.any():
            self._reset_states(resetting)
            rewards = np.where(resetting, 0.0, rewards)
            x_velocity = np.where(resetting, 0.0, x_velocity)
            truncated = truncated & ~resetting
        terminated = np.zeros(self.num_envs, dtype=bool)
        self._needs_reset = truncated.copy()
        return self._observe(), rewards, terminated, truncated, {"x_velocity": x_velocity}

    def close_extras(self, **kwargs: Any) -> None:
        self._rollout.close()
