import gymnasium as gym
import numpy as np
import pytest
import torch

from bilevel.envs import AntDirection, DirectionTask, HalfCheetahDirection, HalfCheetahVelocity, VelocityTask
from bilevel.envs import rewards as analytic


def rollout(env: gym.Env, steps: int, seed: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float, bool, dict]]:
    """``(obs, action, next_obs, reward, terminated, info)`` for uniformly random actions, resetting on episode end."""
    env.action_space.seed(seed)
    obs, _ = env.reset(seed=seed)
    transitions = []
    for _ in range(steps):
        action = env.action_space.sample()
        next_obs, reward, terminated, truncated, info = env.step(action)
        transitions.append((obs, action, next_obs, float(reward), terminated, info))
        obs = env.reset()[0] if terminated or truncated else next_obs
    return transitions


def as_tensors(transitions) -> tuple[torch.Tensor, ...]:
    obs, action, next_obs, reward, terminated, _ = zip(*transitions, strict=True)
    return tuple(torch.as_tensor(np.array(x)) for x in (obs, action, next_obs, reward, terminated))


def test_velocity_reward_is_the_formula_at_the_env_velocity():
    env = HalfCheetahVelocity().make_env(VelocityTask(1.3))
    for _, action, _, reward, _, info in rollout(env, 30, seed=0):
        expected = -abs(info["x_velocity"] - 1.3) - 0.05 * np.sum(np.square(action, dtype=np.float64))
        assert reward == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("direction", [-1, 1])
def test_half_cheetah_direction_reward_is_the_formula_at_the_env_velocity(direction):
    env = HalfCheetahDirection().make_env(DirectionTask(direction))
    for _, action, _, reward, _, info in rollout(env, 30, seed=1):
        expected = direction * info["x_velocity"] - 0.05 * np.sum(np.square(action, dtype=np.float64))
        assert reward == pytest.approx(expected, abs=1e-12)


def test_ant_direction_reward_adds_contact_cost_and_survive_bonus():
    env = AntDirection().make_env(DirectionTask(-1))
    assert env.observation_space.shape == (27,)
    for _, action, _, reward, _, info in rollout(env, 30, seed=2):
        expected = -info["x_velocity"] - 0.05 * np.sum(np.square(action, dtype=np.float64))
        assert reward == pytest.approx(expected + info["reward_contact"] + info["reward_survive"], abs=1e-12)
        assert info["reward_survive"] in (0.0, 0.05)


def test_half_cheetah_obs_8_is_root_x_velocity_and_close_to_the_rewarded_velocity():
    env = gym.make("HalfCheetah-v5")
    transitions = rollout(env, 200, seed=3)
    obs, _, next_obs, _, _ = as_tensors(transitions)
    np.testing.assert_array_equal(next_obs[-1, 8].item(), env.unwrapped.data.qvel[0])
    rewarded_velocity = torch.tensor([info["x_velocity"] for *_, info in transitions])
    estimate = analytic.midpoint_x_velocity(obs, next_obs, analytic.HALF_CHEETAH_X_VELOCITY_INDEX)
    estimate_error = (estimate - rewarded_velocity).square().mean().sqrt()
    assert estimate_error < 0.25 * rewarded_velocity.std() + 0.1


@pytest.mark.parametrize(
    ("env_id", "reward_fn", "termination_fn", "tolerance"),
    [
        ("HalfCheetah-v5", analytic.half_cheetah_reward, analytic.never_terminates, 0.3),
        ("Hopper-v5", analytic.hopper_reward, analytic.hopper_termination, 0.02),
        ("Walker2d-v5", analytic.walker2d_reward, analytic.walker2d_termination, 0.05),
    ],
)
def test_analytic_reward_and_termination_match_the_env(env_id, reward_fn, termination_fn, tolerance):
    obs, action, next_obs, reward, terminated = as_tensors(rollout(gym.make(env_id), 300, seed=4))
    rms_error = (reward_fn(obs, action, next_obs) - reward).square().mean().sqrt()
    assert rms_error < tolerance
    assert torch.equal(termination_fn(next_obs), terminated)


def test_task_reward_fns_broadcast_over_tasks():
    obs = torch.randn(3, 5, 17)
    action = torch.randn(3, 5, 6)
    next_obs = torch.randn(3, 5, 17)
    targets = torch.tensor([0.0, 1.0, 2.0])[:, None]
    batched = analytic.half_cheetah_velocity_reward(obs, action, next_obs, targets)
    per_task = [
        HalfCheetahVelocity().reward_fn(VelocityTask(v))(obs[i], action[i], next_obs[i])
        for i, v in enumerate([0, 1, 2])
    ]
    torch.testing.assert_close(batched, torch.stack(per_task))
    direction_reward = HalfCheetahDirection().reward_fn(DirectionTask(-1))(obs, action, next_obs)
    velocity = (obs[..., 8] + next_obs[..., 8]) / 2
    torch.testing.assert_close(direction_reward, -velocity - 0.05 * action.square().sum(-1))


def test_direction_must_be_plus_or_minus_one():
    with pytest.raises(ValueError, match="0"):
        HalfCheetahDirection().make_env(DirectionTask(0))


@pytest.mark.parametrize(("low", "high"), [(2.0, 0.0), (0.0, float("inf")), (float("nan"), 1.0)])
def test_velocity_range_must_be_finite_and_ordered(low, high):
    with pytest.raises(ValueError, match=f"low={low}, high={high}"):
        HalfCheetahVelocity(low, high)
