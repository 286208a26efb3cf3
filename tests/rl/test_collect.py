"""Collection from vector environments stores exactly the real transitions across autoresets."""

from __future__ import annotations

import functools

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.vector import AsyncVectorEnv, AutoresetMode, SyncVectorEnv
from gymnasium.wrappers import TimeLimit

from bilevel.rl import Trajectories, collect, collect_episodes, make_vector_env


class CounterEnv(gym.Env):
    """Observation ``[episode id, step in episode]``; terminates after ``episode_length`` steps.

    The reward ``10 * step + action`` ties each reward to its step and action."""

    observation_space = gym.spaces.Box(0.0, np.inf, shape=(2,), dtype=np.float32)
    action_space = gym.spaces.Discrete(3)

    def __init__(self, episode_length: int):
        self.episode_length = episode_length
        self.episode = -1
        self.step_count = 0

    def _obs(self) -> np.ndarray:
        return np.array([self.episode, self.step_count], dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.episode += 1
        self.step_count = 0
        return self._obs(), {}

    def step(self, action):
        self.step_count += 1
        reward = 10.0 * self.step_count + int(action)
        return self._obs(), reward, self.step_count >= self.episode_length, False, {}


def make_counter(episode_length: int, time_limit: int | None = None) -> gym.Env:
    env = CounterEnv(episode_length)
    return env if time_limit is None else TimeLimit(env, max_episode_steps=time_limit)


ENV_SPECS = [(3, None), (5, 4), (2, 2), (7, None)]
"""(termination length, time limit) per sub-environment: pure termination, pure truncation, both
at once, and an episode longer than a short batch."""


def counter_envs(asynchronous: bool):
    env_fns = [functools.partial(make_counter, length, limit) for length, limit in ENV_SPECS]
    vector_env_class = AsyncVectorEnv if asynchronous else SyncVectorEnv
    return vector_env_class(env_fns, autoreset_mode=AutoresetMode.NEXT_STEP)


def step_policy(obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A deterministic policy whose action and log-probability are read off the observation."""
    step = obs[:, 1]
    return (step % 3).long(), -step


def episode_end(length: int, limit: int | None) -> int:
    return length if limit is None else min(length, limit)


def check_real_transitions(batch: Trajectories) -> None:
    """Every valid step is one step of one episode of the counter env, with the true next obs."""
    steps = batch.flatten_valid()
    obs_step, next_step = steps["obs"][:, 1], steps["next_obs"][:, 1]
    torch.testing.assert_close(steps["next_obs"][:, 0], steps["obs"][:, 0])
    torch.testing.assert_close(next_step, obs_step + 1)
    torch.testing.assert_close(steps["actions"], (obs_step % 3).long())
    torch.testing.assert_close(steps["rewards"], 10.0 * next_step + steps["actions"])
    torch.testing.assert_close(steps["log_probs"], -obs_step)
    torch.testing.assert_close(steps["time"], obs_step.long())


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_collect_stores_only_real_transitions(asynchronous):
    envs = counter_envs(asynchronous)
    try:
        batch = collect(envs, step_policy, num_steps=12, seed=0)
    finally:
        envs.close()
    assert (batch.num_steps, batch.batch_size) == (12, len(ENV_SPECS))
    check_real_transitions(batch)
    for b, (length, limit) in enumerate(ENV_SPECS):
        end = episode_end(length, limit)
        done = batch.terminated[:, b] | batch.truncated[:, b]
        expected_valid = torch.tensor([t % (end + 1) != end for t in range(12)])
        assert torch.equal(batch.valid[:, b], expected_valid), f"sub-env {b}"
        assert torch.equal(done, batch.valid[:, b] & (batch.next_obs[:, b, 1] == end))
        assert torch.equal(batch.terminated[:, b], done & (batch.next_obs[:, b, 1] == length))
        assert torch.equal(batch.truncated[:, b], done & (end == limit))
        first_steps = batch.obs[:, b, 1] == 0
        assert torch.equal(first_steps, batch.valid[:, b] & (batch.time[:, b] == 0))
        episode_ids = batch.obs[batch.valid[:, b], b, 0]
        torch.testing.assert_close(episode_ids, torch.arange(12)[batch.valid[:, b]].div(end + 1).floor())
    assert not (batch.rewards[~batch.valid]).any()
    assert not (batch.terminated | batch.truncated)[~batch.valid].any()


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_final_observation_is_recorded_on_truncation(asynchronous):
    envs = counter_envs(asynchronous)
    try:
        batch = collect(envs, step_policy, num_steps=11)
    finally:
        envs.close()
    truncation_only = 1
    truncated_steps = batch.truncated[:, truncation_only].nonzero().squeeze(1)
    assert truncated_steps.tolist() == [3, 8]
    for t in truncated_steps.tolist():
        final_obs = batch.next_obs[t, truncation_only]
        reset_obs = batch.obs[t + 2, truncation_only]
        assert final_obs.tolist() == [t // 5, 4.0]
        assert reset_obs.tolist() == [t // 5 + 1, 0.0]
        assert not batch.valid[t + 1, truncation_only]


def test_episode_statistics_count_finished_episodes():
    envs = counter_envs(asynchronous=False)
    try:
        batch = collect(envs, step_policy, num_steps=12)
    finally:
        envs.close()
    expected_lengths, expected_returns = [], []
    for length, limit in ENV_SPECS:
        end = episode_end(length, limit)
        episode_return = sum(10.0 * (step + 1) + step % 3 for step in range(end))
        finished = (12 + 1) // (end + 1)
        expected_lengths += [end] * finished
        expected_returns += [episode_return] * finished
    assert sorted(batch.episode_lengths.tolist()) == sorted(expected_lengths)
    assert sorted(batch.episode_returns.tolist()) == sorted(expected_returns)


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
def test_collect_episodes_holds_one_whole_episode_per_column(asynchronous):
    envs = counter_envs(asynchronous)
    try:
        batch = collect_episodes(envs, step_policy, num_episodes=6, horizon=6, seed=3)
    finally:
        envs.close()
    check_real_transitions(batch)
    ends = [min(episode_end(length, limit), 6) for length, limit in ENV_SPECS]
    assert batch.batch_size == 6
    assert batch.num_steps == max(ends)
    for b in range(6):
        end = ends[b % len(ENV_SPECS)]
        assert batch.valid[:, b].tolist() == [t < end for t in range(batch.num_steps)]
        assert batch.obs[:end, b, 1].tolist() == list(range(end))
        assert batch.obs[:end, b, 0].unique().numel() == 1
        assert batch.episode_lengths[b] == end
        assert batch.episode_returns[b] == pytest.approx(sum(10.0 * (s + 1) + s % 3 for s in range(end)))
    cut_by_horizon = 3
    assert not (batch.terminated[:, cut_by_horizon] | batch.truncated[:, cut_by_horizon]).any()


def test_collect_on_cartpole_is_reproducible_and_on_device():
    envs = make_vector_env(lambda: gym.make("CartPole-v1"), 3)

    def random_policy(obs, generator):
        actions = torch.randint(2, (obs.shape[0],), generator=generator)
        return actions, torch.full((obs.shape[0],), -np.log(2.0))

    try:
        batches = [
            collect(
                envs, functools.partial(random_policy, generator=torch.Generator().manual_seed(1)), 60, seed=7
            )
            for _ in range(2)
        ]
    finally:
        envs.close()
    for name in ("obs", "actions", "rewards", "next_obs", "terminated", "valid"):
        assert torch.equal(getattr(batches[0], name), getattr(batches[1], name)), name
    assert batches[0].obs.dtype == torch.get_default_dtype()
    assert batches[0].to("cpu").obs.device.type == "cpu"
    ended = batches[0].terminated[:-1]
    assert ended.any()
    assert not batches[0].valid[1:][ended].any()


def test_make_vector_env_builds_next_step_autoreset_envs():
    for asynchronous in (False, True):
        envs = make_vector_env(functools.partial(make_counter, 3), 2, asynchronous=asynchronous)
        try:
            assert AutoresetMode(envs.metadata["autoreset_mode"]) is AutoresetMode.NEXT_STEP
            assert envs.num_envs == 2
        finally:
            envs.close()


def test_bad_arguments_are_rejected():
    envs = counter_envs(asynchronous=False)
    same_step_envs = SyncVectorEnv(
        [functools.partial(make_counter, 3)], autoreset_mode=AutoresetMode.SAME_STEP
    )
    try:
        with pytest.raises(ValueError, match="num_steps"):
            collect(envs, step_policy, -1)
        with pytest.raises(ValueError, match="num_episodes"):
            collect_episodes(envs, step_policy, 0, horizon=5)
        with pytest.raises(ValueError, match="horizon"):
            collect_episodes(envs, step_policy, 2, horizon=0)
        with pytest.raises(ValueError, match="envs"):
            collect(same_step_envs, step_policy, 5)
        with pytest.raises(ValueError, match="num_envs"):
            make_vector_env(functools.partial(make_counter, 3), 0)
    finally:
        envs.close()
        same_step_envs.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_collect_places_the_batch_on_the_learner_device():
    envs = counter_envs(asynchronous=False)
    try:
        batch = collect(envs, step_policy, num_steps=6, device="cuda")
    finally:
        envs.close()
    assert all(tensor.is_cuda for tensor in batch.flatten_valid().values())
    assert batch.episode_returns.is_cuda
    check_real_transitions(batch.to("cpu"))
