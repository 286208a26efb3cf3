"""Meta-batch collection: the batched HalfCheetah path agrees with the Gymnasium vector-env path."""

import numpy as np
import pytest
import torch

from bilevel import tree
from bilevel.envs import make_family
from bilevel.nets import GaussianMLPPolicy
from bilevel.rl.meta_batches import TaskSampler, sample_batched_tasks, sample_gym_tasks

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
