"""Collection on Ray actors equals the same collection in this process, worker by worker."""

import functools

import gymnasium as gym
import pytest
import ray
import torch

from bilevel.nets import GaussianMLPPolicy
from bilevel.rl import collect, make_vector_env
from bilevel.rl.distributed import RayCollector, sampling_policy_fn

make_envs = functools.partial(make_vector_env, functools.partial(gym.make, "Pendulum-v1"), 2)
make_policy = functools.partial(GaussianMLPPolicy, 3, 1)


def test_ray_batch_is_the_workers_local_batches_joined():
    torch.manual_seed(0)
    policy = make_policy()
    params = {name: value.detach().clone() for name, value in policy.state_dict().items()}
    collector = RayCollector(make_envs, make_policy, num_workers=2)
    try:
        assert collector.num_envs == 4
        batch = collector.collect(params, num_steps=30, seed=7)
    finally:
        collector.close()
        ray.shutdown()

    local = []
    for worker in range(2):
        seed = 7 + worker * 10_000
        local.append(collect(make_envs(), sampling_policy_fn(policy, torch.Generator().manual_seed(seed)), 30,
                             seed=seed))
    assert batch.obs.shape == (30, 4, 3) and batch.actions.shape == (30, 4, 1)
    torch.testing.assert_close(batch.obs, torch.cat([b.obs for b in local], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(batch.actions, torch.cat([b.actions for b in local], dim=1), rtol=0, atol=0)
    torch.testing.assert_close(batch.rewards, torch.cat([b.rewards for b in local], dim=1), rtol=0, atol=0)
    assert torch.equal(batch.valid, torch.cat([b.valid for b in local], dim=1))


def test_bad_worker_count_is_named():
    with pytest.raises(ValueError, match="num_workers"):
        RayCollector(make_envs, make_policy, num_workers=0)
