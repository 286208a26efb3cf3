"""The replay buffer: ring storage, flags, checkpoint and restore, next-step autoreset filtering."""

from __future__ import annotations

import io

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv

from bilevel.rl import ReplayBuffer


def numbered_transitions(first: int, count: int):
    """Transitions whose every field encodes their number ``n``: obs ``[n, n]``, reward ``n``,
    terminated when ``n % 3 == 0``, truncated when ``n % 3 == 1``."""
    numbers = np.arange(first, first + count)
    obs = np.stack([numbers, numbers], axis=1).astype(np.float64)
    return (
        obs,
        numbers.astype(np.float64),
        numbers.astype(np.float64),
        obs + 1,
        numbers % 3 == 0,
        numbers % 3 == 1,
    )


def check_consistent(sample) -> None:
    numbers = sample.rewards
    torch.testing.assert_close(sample.obs[:, 0], numbers)
    torch.testing.assert_close(sample.actions, numbers)
    torch.testing.assert_close(sample.next_obs[:, 1], numbers + 1)
    assert torch.equal(sample.terminated, numbers.long() % 3 == 0)
    assert torch.equal(sample.truncated, numbers.long() % 3 == 1)


def test_wraps_around_keeping_the_newest_transitions():
    buffer = ReplayBuffer(5, (2,), ())
    buffer.add(*numbered_transitions(0, 3))
    assert len(buffer) == 3
    buffer.add(*numbered_transitions(3, 4))
    assert len(buffer) == 5
    sample = buffer.sample(400, torch.Generator().manual_seed(0))
    check_consistent(sample)
    assert set(sample.rewards.tolist()) == {2.0, 3.0, 4.0, 5.0, 6.0}
    buffer.add(*numbered_transitions(10, 12))
    sample = buffer.sample(400, torch.Generator().manual_seed(0))
    assert set(sample.rewards.tolist()) == {17.0, 18.0, 19.0, 20.0, 21.0}


def test_terminated_and_truncated_are_kept_apart():
    buffer = ReplayBuffer(32, (2,), ())
    buffer.add(*numbered_transitions(0, 30))
    sample = buffer.sample(256, torch.Generator().manual_seed(1))
    check_consistent(sample)
    assert sample.terminated.any()
    assert sample.truncated.any()
    assert not (sample.terminated & sample.truncated).any()


def test_restored_buffer_reproduces_samples():
    buffer = ReplayBuffer(8, (2,), ())
    buffer.add(*numbered_transitions(0, 11))
    saved = io.BytesIO()
    torch.save(buffer.state_dict(), saved)
    saved.seek(0)
    restored = ReplayBuffer(8, (2,), ())
    restored.load_state_dict(torch.load(saved))

    original_generator, restored_generator = (
        torch.Generator().manual_seed(5),
        torch.Generator().manual_seed(5),
    )
    for first in (20, 30):
        original_sample = buffer.sample(16, original_generator)
        restored_sample = restored.sample(16, restored_generator)
        for name in ("obs", "actions", "rewards", "next_obs", "terminated", "truncated"):
            assert torch.equal(getattr(original_sample, name), getattr(restored_sample, name)), name
        buffer.add(*numbered_transitions(first, 3))
        restored.add(*numbered_transitions(first, 3))


def test_state_dict_is_a_copy():
    buffer = ReplayBuffer(4, (2,), ())
    buffer.add(*numbered_transitions(0, 2))
    state = buffer.state_dict()
    buffer.add(*numbered_transitions(2, 4))
    assert state["rewards"].tolist() == [0.0, 1.0]


class EndsAfterTwoSteps(gym.Env):
    """Observation ``[episode id, step]``; the episode terminates after two steps."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, shape=(), dtype=np.float32)

    def __init__(self):
        self.episode, self.step_count = -1, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode, self.step_count = self.episode + 1, 0
        return np.array([self.episode, 0.0], dtype=np.float32), {}

    def step(self, action):
        self.step_count += 1
        obs = np.array([self.episode, self.step_count], dtype=np.float32)
        return obs, 1.0, self.step_count == 2, False, {}


def fill_from_vector_env(make_env, steps: int) -> ReplayBuffer:
    """Step two next-step-autoreset copies of ``make_env`` ``steps`` times, storing each step with
    `add_vector_step` and checking that it returns ``terminated | truncated``, the next step's autoresets."""
    envs = SyncVectorEnv([make_env, make_env], autoreset_mode=AutoresetMode.NEXT_STEP)
    buffer = ReplayBuffer(100, (2,), ())
    obs, _ = envs.reset(seed=0)
    is_reset_step = np.zeros(2, dtype=bool)
    for _ in range(steps):
        actions = np.zeros(2, dtype=np.float32)
        next_obs, rewards, terminated, truncated, _ = envs.step(actions)
        returned = buffer.add_vector_step(obs, actions, rewards, next_obs, terminated, truncated, is_reset_step)
        assert torch.equal(returned, torch.as_tensor(terminated | truncated))
        is_reset_step, obs = returned, next_obs
    envs.close()
    return buffer


def test_add_vector_step_drops_autoreset_steps():
    buffer = fill_from_vector_env(EndsAfterTwoSteps, 9)
    assert len(buffer) == 2 * 6
    stored = buffer.state_dict()
    torch.testing.assert_close(stored["next_obs"][:, 0], stored["obs"][:, 0])
    torch.testing.assert_close(stored["next_obs"][:, 1], stored["obs"][:, 1] + 1)
    assert torch.equal(stored["terminated"], stored["next_obs"][:, 1] == 2)


class NeverEnds(EndsAfterTwoSteps):
    def step(self, action):
        obs, reward, _, truncated, info = super().step(action)
        return obs, reward, False, truncated, info


def test_add_vector_step_returns_the_next_autoresets_after_truncation_too():
    """Episodes cut by a three-step time limit: the returned flags are ``terminated | truncated`` (the next
    step is an autoreset either way), the truncated transitions are stored as truncated, not terminated, and
    every autoreset step is dropped."""
    buffer = fill_from_vector_env(lambda: gym.wrappers.TimeLimit(NeverEnds(), max_episode_steps=3), 8)
    assert len(buffer) == 2 * 6
    stored = buffer.state_dict()
    assert not stored["terminated"].any()
    assert torch.equal(stored["truncated"], stored["next_obs"][:, 1] == 3)
    torch.testing.assert_close(stored["next_obs"][:, 1], stored["obs"][:, 1] + 1)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(0, (2,), ())
    buffer = ReplayBuffer(4, (2,), ())
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(1)
    obs, actions, rewards, next_obs, terminated, truncated = numbered_transitions(0, 3)
    with pytest.raises(ValueError, match="next_obs"):
        buffer.add(obs, actions, rewards, next_obs[:2], terminated, truncated)
    with pytest.raises(ValueError, match="obs"):
        buffer.add(obs[:, :1], actions, rewards, next_obs, terminated, truncated)
    buffer.add(obs, actions, rewards, next_obs, terminated, truncated)
    with pytest.raises(ValueError, match="batch_size"):
        buffer.sample(0)
    with pytest.raises(ValueError, match="is_reset_step"):
        buffer.add_vector_step(
            obs, actions, rewards, next_obs, terminated, truncated, np.zeros(2, dtype=bool)
        )
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(5, (2,), ()).load_state_dict(buffer.state_dict())
    for flags in (terminated.astype(np.float64) * 0.5, truncated.astype(np.int64) * 2):
        with pytest.raises(ValueError, match="bool flags"):
            buffer.add(obs, actions, rewards, next_obs, flags, truncated)
    buffer.add(obs, actions, rewards, next_obs, terminated.astype(np.int64), truncated)
    state = buffer.state_dict()
    for position, size in ((99, state["size"]), (1, 2)):
        with pytest.raises(ValueError, match=f"position {position} and size {size}"):
            stored = {k: v[:size] for k, v in state.items() if torch.is_tensor(v)}
            ReplayBuffer(4, (2,), ()).load_state_dict({**state, "position": position, "size": size, **stored})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_buffer_on_cuda_samples_with_a_cpu_generator():
    buffer = ReplayBuffer(8, (2,), (), device="cuda")
    buffer.add(*numbered_transitions(0, 5))
    sample = buffer.sample(16, torch.Generator().manual_seed(0))
    assert sample.obs.is_cuda
    check_consistent(sample)
