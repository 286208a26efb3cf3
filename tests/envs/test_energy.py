"""EnergyMeter: the work of the actuators, sum_t sum_j |gear_j ctrl_j qdot_j|, per episode."""

import gymnasium as gym
import mujoco
import numpy as np
import pytest

from bilevel.envs import EnergyMeter, perturb


def _work_by_hand(env: gym.Env, actions: np.ndarray) -> float:
    """The same sum from the model's own fields, stepping MuJoCo directly: torque ``gear * clip(ctrl)``
    times the joint's velocity at the start of the last substep of each env step (where MuJoCo
    evaluates the actuator forces that step's `data` reports)."""
    model, data = env.unwrapped.model, env.unwrapped.data
    low, high = model.actuator_ctrlrange.T
    dofs = model.jnt_dofadr[model.actuator_trnid[:, 0]]
    work = 0.0
    for action in actions:
        data.ctrl[:] = action
        mujoco.mj_step(model, data, nstep=env.unwrapped.frame_skip - 1)
        velocity = data.qvel[dofs].copy()
        mujoco.mj_step(model, data)
        work += float(np.abs(model.actuator_gear[:, 0] * np.clip(action, low, high) * velocity).sum())
    return work


@pytest.mark.parametrize("crippled", [False, True])
def test_the_metered_work_equals_torque_times_joint_velocity(crippled):
    actions = np.random.default_rng(0).uniform(-1, 1, size=(30, 6))
    metered, by_hand = (gym.make("HalfCheetah-v5", max_episode_steps=30) for _ in range(2))
    if crippled:
        metered, by_hand = (perturb(e, "crippled-joint", joint="bthigh") for e in (metered, by_hand))
    meter = EnergyMeter(metered)  # outermost, as `mbmpo.make_env` wraps it
    meter.reset(seed=3)
    by_hand.reset(seed=3)
    for action in actions:
        meter.step(action)
    expected = _work_by_hand(by_hand, actions)
    assert meter.round_energies == [pytest.approx(expected, rel=1e-9)]
    assert expected > 1.0


def test_no_action_does_no_work_and_only_the_first_episode_after_a_seeded_reset_is_kept():
    meter = EnergyMeter(gym.make("HalfCheetah-v5", max_episode_steps=5))
    meter.reset(seed=0)
    for _ in range(5):
        meter.step(np.zeros(6))
    meter.reset()
    for _ in range(5):
        meter.step(np.ones(6))
    assert meter.round_energies == [0.0]
    meter.reset(seed=1)
    for _ in range(5):
        meter.step(np.ones(6))
    assert len(meter.round_energies) == 2 and meter.round_energies[1] > 0.0
