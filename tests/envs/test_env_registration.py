import gymnasium as gym
import pytest
from gymnasium.utils.env_checker import check_env

import bilevel.envs as envs
from bilevel.envs.registry import ENVS


@pytest.mark.filterwarnings("ignore:.*different from the unwrapped version")
@pytest.mark.filterwarnings("ignore:.*Box observation space m..imum value is")
@pytest.mark.parametrize("env_id", sorted(ENVS))
def test_registered_env_passes_gymnasium_checker(env_id):
    env = gym.make(env_id)
    check_env(env, skip_render_check=True)
    env.close()


def test_register_all_is_idempotent():
    envs.register_all()
    envs.register_all()
    assert all(env_id in gym.registry for env_id in ENVS)


@pytest.mark.parametrize("name", envs.family_names())
def test_every_family_samples_tasks_and_makes_their_envs(name, rng):
    family = envs.make_family(name)
    tasks = family.sample_tasks(3, rng)
    assert len(tasks) == 3
    env = family.make_env(tasks[0])
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    env.close()


def test_unknown_family_names_the_value_and_the_valid_names():
    with pytest.raises(ValueError, match=r"'halfcheetah-fly'.*halfcheetah-vel"):
        envs.make_family("halfcheetah-fly")


def test_unknown_frozen_lake_kind_names_the_value():
    with pytest.raises(ValueError, match="'slippery'"):
        envs.make_family("frozenlake", kind="slippery")
