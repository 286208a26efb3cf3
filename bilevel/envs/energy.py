"""A wrapper that meters the mechanical work a MuJoCo env's actuators do, episode by episode."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np

__all__ = ["EnergyMeter"]


class EnergyMeter(gym.Wrapper):
    """Records the mechanical work of each episode, ``sum_t sum_j |tau_j q'_j|``: ``tau_j`` the torque of actuator
    ``j`` (``gear_j * data.actuator_force[j]``) and ``q'_j`` its joint's velocity (``data.qvel``). MuJoCo's
    ``data.actuator_velocity[j] = gear_j q'_j`` for a joint transmission, so the product is
    ``actuator_force * actuator_velocity`` (a crippled joint, gear 0, does no work). Summed per step, in
    watts x steps (times ``dt`` gives joules).

    ``round_energies`` holds, for each reset with a seed (one round of `collect_episodes`), the work of the
    first episode after it."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.episode_energy = 0.0
        self.round_energies: list[float] = []
        self._recording = False

    def reset(self, **kwargs: Any) -> Any:
        if kwargs.get("seed") is not None:
            self._recording = True
        self.episode_energy = 0.0
        return super().reset(**kwargs)

    def step(self, action: Any) -> Any:
        result = super().step(action)
        data = self.env.unwrapped.data
        self.episode_energy += float(np.abs(data.actuator_force * data.actuator_velocity).sum())
        if (result[2] or result[3]) and self._recording:
            self.round_energies.append(self.episode_energy)
            self._recording = False
        return result
