"""Meta-batch collection: the batched HalfCheetah path agrees with the Gymnasium vector-env path; the per-task
advantages and the batched sampler's masking agree with references written out here."""

import numpy as np
import pytest
import torch

from bilevel import tree
from bilevel.envs import make_family
from bilevel.nets import GaussianMLPPolicy
from bilevel.rl.meta_batches import (
    TaskEpisodes,
    TaskSampler,
    sample_batched_tasks,
    sample_gym_tasks,
    standardized_advantages,
    task_data,
)

HORIZON = 12


def setup(env):
    family = make_family(env)
    tasks = family.sample_tasks(3, np.random.default_rng(0))
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(17, 6, hidden=(8,), init_log_std=-0.5)
    return family, tasks, policy, tree.detach(tree.params_of(policy))


def collect_both(env, generator_seed, episodes=4, num_envs=4, per_task=False):
    family, tasks, policy, params = setup(env)
    if per_task:
        params = tree.map(lambda leaf: torch.stack([leaf + 0.1 * i for i in range(len(tasks))]), params)
    common = dict(per_task=per_task, env_seed=11, num_envs=num_envs)

    def generator():
        return None if generator_seed is None else torch.Generator().manual_seed(generator_seed)

    gym = sample_gym_tasks(family, tasks, policy, params, episodes, HORIZON, generator(), **common)
    batched = sample_batched_tasks(family, tasks, policy, params, episodes, HORIZON, generator(), **common)
    return gym, batched


@pytest.mark.parametrize("env", ["halfcheetah-vel", "halfcheetah-dir"])
@pytest.mark.parametrize(("episodes", "num_envs", "per_task"), [(4, 4, False), (5, 2, True)])
def test_mean_action_batches_are_identical(env, episodes, num_envs, per_task):
    gym, batched = collect_both(env, None, episodes, num_envs, per_task)
    assert batched.obs.shape == gym.obs.shape == (3, HORIZON, episodes, 17)
    for name in ("valid", "time"):
        assert torch.equal(getattr(batched, name), getattr(gym, name)), name
    torch.testing.assert_close(batched.obs[:, 0], gym.obs[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(batched.actions[:, 0], gym.actions[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(batched.rewards[:, 0], gym.rewards[:, 0], rtol=0, atol=1e-6)
    # later steps differ by MuJoCo's solver warm start (about 1e-9 a step), grown by the dynamics
    for name in ("obs", "actions", "rewards", "next_obs"):
        torch.testing.assert_close(getattr(batched, name), getattr(gym, name), rtol=1e-3, atol=1e-3)


def test_stochastic_batches_have_the_same_statistics():
    family, tasks, policy, params = setup("halfcheetah-dir")
    tasks = [tasks[0]] * 2
    common = dict(per_task=False, env_seed=0, num_envs=20)
    gym = sample_gym_tasks(family, tasks, policy, params, 20, HORIZON, torch.Generator().manual_seed(0), **common)
    batched = sample_batched_tasks(family, tasks, policy, params, 20, HORIZON, torch.Generator().manual_seed(1),
                                   **common)
    assert not torch.equal(gym.actions, batched.actions)
    for name in ("actions", "rewards"):
        a, b = getattr(gym, name), getattr(batched, name)
        assert abs(float(a.mean() - b.mean())) < 4 * float(a.std()) / a.numel() ** 0.5 + 1e-3, name
        assert float(b.std()) == pytest.approx(float(a.std()), rel=0.1), name


def test_sampler_chooses_the_batched_env_unless_forced_off():
    family, _, policy, _ = setup("halfcheetah-vel")
    device = torch.device("cpu")
    assert TaskSampler("halfcheetah-vel", family, policy, HORIZON, device).uses_batched_env
    assert not TaskSampler("halfcheetah-vel", family, policy, HORIZON, device, batched_envs=False).uses_batched_env
    assert not TaskSampler("halfcheetah-vel", family, policy, HORIZON, device, asynchronous=True).uses_batched_env
    ant = make_family("ant-dir")
    assert not TaskSampler("ant-dir", ant, policy, HORIZON, device).uses_batched_env


def ragged_episodes(lengths, horizon=7, obs_dim=2, act_dim=1, seed=0):
    """One task's ``TaskEpisodes`` ``[T, B]`` in float64, episode ``b`` ``lengths[b]`` steps long; the padding
    after an episode's end holds garbage observations, actions and rewards, and time 0 (as collected)."""
    generator = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    obs = torch.randn(horizon, batch, obs_dim, generator=generator, dtype=torch.float64)
    next_obs = torch.cat([obs[1:], torch.randn(1, batch, obs_dim, generator=generator, dtype=torch.float64)])
    actions = torch.randn(horizon, batch, act_dim, generator=generator, dtype=torch.float64)
    rewards = torch.randn(horizon, batch, generator=generator, dtype=torch.float64) + 1.0
    valid = torch.arange(horizon)[:, None] < torch.tensor(lengths)
    time = torch.arange(horizon)[:, None].expand(horizon, batch) * valid
    return TaskEpisodes(obs, actions, rewards, next_obs, valid, time)


def reference_advantages(episodes, gamma, gae_lambda, damping=1e-5):
    """Standardised GAE over the linear feature baseline, with loops over episodes and steps: returns
    ``G_t = sum_l gamma^l r_{t+l}`` to the episode's end; ``w`` the ridge fit of ``G`` on
    ``phi(s, t) = [s, s^2, u, u^2, u^3, 1]`` (``u = t / 100``) over the valid steps only; ``delta_t = r_t
    + gamma V(s'_t, t + 1) - V(s_t, t)`` (no bootstrap at the end); ``A_t = sum_l (gamma lambda)^l
    delta_{t+l}``; then ``(A - mean) / (std + 1e-8)`` over the valid steps, 0 elsewhere."""

    def features(s, t):
        u = torch.tensor([t / 100.0], dtype=torch.float64)
        return torch.cat([s, s**2, u, u**2, u**3, torch.ones(1, dtype=torch.float64)])

    horizon, batch = episodes.rewards.shape
    lengths = episodes.valid.sum(0).tolist()
    rows, targets = [], []
    for b in range(batch):
        for t in range(lengths[b]):
            rows.append(features(episodes.obs[t, b], t))
            targets.append(sum(gamma**k * episodes.rewards[t + k, b] for k in range(lengths[b] - t)))
    design, targets = torch.stack(rows), torch.stack(targets)
    weights = torch.linalg.solve(design.T @ design + damping * torch.eye(design.shape[1], dtype=torch.float64),
                                 design.T @ targets)
    advantages = torch.zeros(horizon, batch, dtype=torch.float64)
    for b in range(batch):
        length = lengths[b]
        deltas = []
        for t in range(length):
            value = features(episodes.obs[t, b], t) @ weights
            next_value = features(episodes.next_obs[t, b], t + 1) @ weights if t + 1 < length else 0.0
            deltas.append(episodes.rewards[t, b] + gamma * next_value - value)
        for t in range(length):
            advantages[t, b] = sum((gamma * gae_lambda) ** k * deltas[t + k] for k in range(length - t))
    values = advantages[episodes.valid]
    mean = values.mean()
    std = ((values - mean) ** 2).mean().sqrt()
    return (advantages - mean) / (std + 1e-8) * episodes.valid


def test_standardized_advantages_equal_a_loop_reference_on_ragged_episodes():
    episodes = ragged_episodes([7, 3, 5, 1, 6])
    gamma, gae_lambda = 0.9, 0.6
    expected = reference_advantages(episodes, gamma, gae_lambda)
    got = standardized_advantages(episodes, gamma, gae_lambda)
    assert float(expected[episodes.valid].std()) > 0.5 and torch.all(expected[~episodes.valid] == 0)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)
    swapped = reference_advantages(episodes, gae_lambda, gamma)
    assert (swapped - expected).abs().max() > 1e-3, "the test must tell gamma from gae_lambda"


def test_task_data_stacks_per_task_reference_advantages():
    tasks = [ragged_episodes([7, 2, 4], seed=1), ragged_episodes([5, 7, 1], seed=2)]
    episodes = TaskEpisodes(*(torch.stack(values) for values in zip(*tasks, strict=True)))
    gamma, gae_lambda = 0.95, 0.5
    data = task_data(episodes, gamma, gae_lambda)
    for name in ("obs", "actions", "valid"):
        assert torch.equal(getattr(data, name), getattr(episodes, name)), name
    assert data.advantages.shape == (2, 7, 3)
    for index, one in enumerate(tasks):
        torch.testing.assert_close(data.advantages[index], reference_advantages(one, gamma, gae_lambda),
                                   rtol=1e-9, atol=1e-10)


FAKE_STOPS = {0: [1, 3, 99, 0], 1: [2, 0, 4, 99]}
"""Task ``i``'s episode ``b`` of the fake batched env terminates at step ``FAKE_STOPS[i][b]`` (99: never)."""


class FakeBatchedEnv:
    """``make_batched_env``'s interface: each env reads its episode from its reset seed, observes ``[t, seed]``,
    and keeps stepping and rewarding (``10 + t``) after it terminated, as a batched env does before a reset."""

    def __init__(self, tasks, max_episode_steps):
        self.tasks, self.horizon = tasks, max_episode_steps

    def reset(self, seed):
        task, episode = np.divmod(np.asarray(seed), 10**6)
        self.stops = np.array([FAKE_STOPS[int(i)][int(b)] for i, b in zip(task, episode, strict=True)])
        self.t, self.seeds = 0, np.asarray(seed, dtype=float)
        return self._obs(), {}

    def _obs(self):
        return np.stack([np.full(len(self.seeds), float(self.t)), self.seeds], -1)

    def step(self, actions):
        assert actions.shape == (len(self.seeds), 1)
        rewards = np.full(len(self.seeds), 10.0 + self.t)
        terminated = self.stops == self.t
        self.t += 1
        truncated = np.full(len(self.seeds), self.t >= self.horizon)
        return self._obs(), rewards, terminated, truncated, {}

    def close(self):
        pass


class FakeFamily:
    @staticmethod
    def make_batched_env(tasks, max_episode_steps):
        return FakeBatchedEnv(tasks, max_episode_steps)


@pytest.mark.parametrize(("episodes", "num_envs"), [(4, 4), (4, 2)])
def test_batched_sampler_masks_rewards_and_time_after_an_episode_ends(episodes, num_envs):
    horizon = 6
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(2, 1, hidden=(4,))
    batch = sample_batched_tasks(FakeFamily(), ["a", "b"], policy, tree.detach(tree.params_of(policy)), episodes,
                                 horizon, None, per_task=False, env_seed=0, num_envs=num_envs)
    steps = torch.arange(horizon)[None, :, None]
    stops = torch.tensor([FAKE_STOPS[0], FAKE_STOPS[1]])[:, None, :]
    valid = steps <= stops
    assert batch.valid.shape == (2, horizon, episodes)
    assert torch.equal(batch.valid, valid)
    assert torch.equal(batch.time, steps.expand_as(valid) * valid)
    torch.testing.assert_close(batch.rewards, (10.0 + steps) * valid, rtol=0, atol=0, check_dtype=False)
    torch.testing.assert_close(batch.episode_returns(), ((10.0 + steps) * valid).sum(1), check_dtype=False)
    assert torch.equal(batch.obs[..., 0][valid], steps.expand_as(valid)[valid].float())
