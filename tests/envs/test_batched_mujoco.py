"""The batched HalfCheetah steps, rewards and autoresets like Gymnasium's HalfCheetah-v5."""

import re

import gymnasium as gym
import numpy as np
import pytest
import torch

from bilevel.envs.batched_mujoco import BatchedHalfCheetah
from bilevel.envs.locomotion import DirectionTask, HalfCheetahDirection, HalfCheetahVelocity, VelocityTask
from bilevel.rl import collect


def gymnasium_twins(batched, make=lambda: gym.make("HalfCheetah-v5")):
    """One Gymnasium env per batched env, set to the same physics state."""
    envs = []
    for i in range(batched.num_envs):
        env = make()
        env.reset(seed=i)
        env.unwrapped.set_state(batched._state[i, batched._qpos], batched._state[i, batched._qvel])
        envs.append(env)
    return envs


def test_steps_match_gymnasium_half_cheetah():
    batched = BatchedHalfCheetah(3)
    obs, _ = batched.reset(seed=0)
    twins = gymnasium_twins(batched)
    np.testing.assert_allclose(obs, np.stack([env.unwrapped._get_obs() for env in twins]), atol=0)
    actions = np.random.default_rng(1).uniform(-1, 1, (40, 3, 6))
    for action in actions:
        obs, rewards, terminated, truncated, info = batched.step(action)
        expected = [env.step(a) for env, a in zip(twins, action, strict=True)]
        np.testing.assert_allclose(obs, np.stack([e[0] for e in expected]), atol=1e-9)
        np.testing.assert_allclose(rewards, [e[1] for e in expected], atol=1e-9)
        np.testing.assert_allclose(info["x_velocity"], [e[4]["x_velocity"] for e in expected], atol=1e-9)
        assert not terminated.any() and not truncated.any()


@pytest.mark.parametrize(
    ("family", "tasks"),
    [(HalfCheetahVelocity(), [VelocityTask(0.3), VelocityTask(1.7)]),
     (HalfCheetahDirection(), [DirectionTask(-1), DirectionTask(1)])],
)
def test_family_batched_env_has_each_task_reward(family, tasks):
    batched = family.make_batched_env(tasks)
    batched.reset(seed=3)
    twins = []
    for i, task in enumerate(tasks):
        env = family.make_env(task)
        env.reset(seed=i)
        env.unwrapped.set_state(batched._state[i, batched._qpos], batched._state[i, batched._qvel])
        twins.append(env)
    for action in np.random.default_rng(4).uniform(-1, 1, (10, len(tasks), 6)):
        _, rewards, *_ = batched.step(action)
        np.testing.assert_allclose(rewards, [env.step(a)[1] for env, a in zip(twins, action, strict=True)],
                                   atol=1e-9)


def test_next_step_autoreset_and_collection_across_resets():
    batched = BatchedHalfCheetah(2, max_episode_steps=4)
    obs, _ = batched.reset(seed=0)
    for _ in range(4):
        obs, rewards, terminated, truncated, _ = batched.step(np.ones((2, 6)))
    assert truncated.all() and not terminated.any()
    ended_obs = obs.copy()
    obs, rewards, terminated, truncated, _ = batched.step(np.ones((2, 6)))
    assert (rewards == 0).all() and not truncated.any()
    assert np.abs(obs - ended_obs).max() > 0.1 and np.abs(obs).max() < 0.5, "a fresh reset state"

    generator = torch.Generator().manual_seed(0)

    def policy_fn(observation):
        actions = torch.rand(observation.shape[0], 6, generator=generator) * 2 - 1
        return actions, torch.zeros(observation.shape[0])

    batch = collect(batched, policy_fn, 15, seed=5)
    assert batch.valid[:, 0].tolist() == [True] * 4 + [False] + [True] * 4 + [False] + [True] * 4 + [False]
    assert batch.episode_lengths.tolist() == [4] * 6
    assert torch.equal(batch.truncated[:, 0], torch.tensor(([False] * 3 + [True, False]) * 3))


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="num_envs"):
        BatchedHalfCheetah(0)
    batched = BatchedHalfCheetah(1)
    batched.reset(seed=0)
    with pytest.raises(ValueError, match="nan"):
        batched.step(np.full((1, 6), np.nan))


def test_step_needs_a_reset_and_actions_of_the_batch_shape():
    """Actions with the right number of entries but the wrong shape would be reshaped into other envs'
    controls: they are refused, as is a step from the all-zero state before any reset."""
    batched = BatchedHalfCheetah(2)
    with pytest.raises(gym.error.ResetNeeded):
        batched.step(np.zeros((2, 6)))
    batched.reset(seed=0)
    for shape in [(3, 4), (12,), (6, 2)]:
        with pytest.raises(ValueError, match=re.escape(f"(2, 6); got {shape}")):
            batched.step(np.zeros(shape))
