import numpy as np
import pytest
import torch

from bilevel.envs import BatchedNavigation2D, GoalTask, Navigation2D, goals_tensor


def test_batched_navigation_equals_a_loop_of_single_task_envs(rng):
    family = Navigation2D()
    tasks = family.sample_tasks(4, rng)
    num_envs = 3
    actions = rng.uniform(-0.3, 0.3, size=(100, len(tasks), num_envs, 2)).astype(np.float32)
    batched = family.make_batched(num_envs)
    batched_obs = [batched.reset(goals_tensor(tasks))]
    batched_steps = [batched.step(torch.from_numpy(step_actions)) for step_actions in actions]
    batched_obs += [obs for obs, *_ in batched_steps]
    for task_index, task in enumerate(tasks):
        for env_index in range(num_envs):
            env = family.make_env(task)
            obs, _ = env.reset(seed=0)
            np.testing.assert_array_equal(obs, batched_obs[0][task_index, env_index].numpy())
            for t, step_actions in enumerate(actions):
                obs, reward, terminated, truncated, _ = env.step(step_actions[task_index, env_index])
                next_obs, batched_reward, batched_terminated, batched_truncated = batched_steps[t]
                np.testing.assert_array_equal(obs, next_obs[task_index, env_index].numpy())
                assert reward == batched_reward[task_index, env_index].item()
                assert terminated == batched_terminated[task_index, env_index].item()
                assert truncated == batched_truncated[task_index, env_index].item() == (t == 99)


def test_step_clips_actions_and_rewards_negative_distance():
    env = BatchedNavigation2D(num_envs_per_task=1)
    env.reset(torch.tensor([[0.3, -0.4]]))
    obs, reward, _, _ = env.step(torch.tensor([[[1.0, -0.05]]]))
    torch.testing.assert_close(obs, torch.tensor([[[0.1, -0.05]]]))
    torch.testing.assert_close(reward, -torch.tensor([[np.hypot(0.2, 0.35)]], dtype=torch.float32))


def test_goals_are_uniform_in_the_square(rng):
    goals = goals_tensor(Navigation2D().sample_tasks(2000, rng))
    assert goals.abs().max() <= 0.5
    torch.testing.assert_close(goals.mean(0), torch.zeros(2), atol=0.03, rtol=0)


def test_stepping_past_the_horizon_raises():
    env = BatchedNavigation2D(horizon=2)
    env.reset(goals_tensor([GoalTask((0.1, 0.1))]))
    for _ in range(2):
        env.step(torch.zeros(1, 1, 2))
    with pytest.raises(RuntimeError, match="truncated"):
        env.step(torch.zeros(1, 1, 2))


def test_bad_goal_shape_names_the_shape():
    with pytest.raises(ValueError, match=r"\(2,\)"):
        BatchedNavigation2D().reset(torch.zeros(2))


@pytest.mark.parametrize("horizon", [30, 150])
def test_make_env_max_episode_steps_sets_the_horizon(horizon):
    """The gym sampler passes ``max_episode_steps``; the env's own horizon must follow it, longer or shorter."""
    env = Navigation2D().make_env(GoalTask((0.1, 0.1)), max_episode_steps=horizon)
    env.reset(seed=0)
    steps, done = 0, False
    while not done:
        _, _, terminated, truncated, _ = env.step(np.zeros(2, np.float32))
        steps, done = steps + 1, terminated or truncated
    assert steps == horizon


@pytest.mark.parametrize(("options", "name"), [({"num_envs_per_task": 0}, "num_envs_per_task"),
                                               ({"horizon": -3}, "horizon"), ({"max_action": 0.0}, "max_action")])
def test_bad_batched_options_are_named(options, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        BatchedNavigation2D(**options)
