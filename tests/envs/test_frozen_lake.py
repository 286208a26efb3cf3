import gymnasium as gym
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.envs import (
    FrozenLake,
    FrozenLakeTask,
    evaluate_policy,
    random_map,
    shortest_path_length,
    transposed_map,
    value_iteration,
)
from bilevel.envs.frozen_lake import GAMMA, HORIZON, MAP_SIZE
from bilevel.envs.tabular import discounted_visitation, sample_episodes, stack_mdps

SIX_STEP_MAP = ("SFFF", "FHFH", "FFFH", "HFFG")

hole_layouts = st.lists(st.booleans(), min_size=MAP_SIZE * MAP_SIZE - 2, max_size=MAP_SIZE * MAP_SIZE - 2)


def layout_to_map(is_hole: list[bool]) -> tuple[str, ...]:
    cells = "S" + "".join("H" if hole else "F" for hole in is_hole) + "G"
    return tuple(cells[row * MAP_SIZE : (row + 1) * MAP_SIZE] for row in range(MAP_SIZE))


def discounted_goal_return(first_reward_step: int) -> float:
    return sum(GAMMA**t for t in range(first_reward_step, HORIZON))


def random_policy(seed: int) -> torch.Tensor:
    probabilities = np.random.default_rng(seed).dirichlet(np.ones(4), size=MAP_SIZE * MAP_SIZE)
    return torch.as_tensor(probabilities, dtype=torch.float64)


@settings(max_examples=40, deadline=None)
@given(is_hole=hole_layouts, kind=st.sampled_from(["hole", "nohole"]))
def test_transition_rows_are_distributions(is_hole, kind):
    mdp = FrozenLakeTask(layout_to_map(is_hole), kind).mdp
    assert mdp.transitions.dtype == torch.float64
    assert (mdp.transitions >= 0).all()
    torch.testing.assert_close(mdp.transitions.sum(-1), torch.ones(17, 4, dtype=torch.float64))
    assert mdp.initial_distribution.tolist() == [1.0] + [0.0] * 16


@settings(max_examples=40, deadline=None)
@given(is_hole=hole_layouts)
def test_optimal_hole_return_counts_steps_on_the_goal(is_hole):
    desc = layout_to_map(is_hole)
    path_length = shortest_path_length(desc)
    optimal = value_iteration(FrozenLakeTask(desc, "hole").mdp).expected_return.item()
    expected = 0.0 if path_length is None else discounted_goal_return(path_length - 1)
    assert optimal == pytest.approx(expected, abs=1e-12)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), hole_probability=st.floats(0.0, 0.6))
def test_random_maps_are_solvable(seed, hole_probability):
    desc = random_map(np.random.default_rng(seed), hole_probability=hole_probability)
    assert desc[0][0] == "S" and desc[-1][-1] == "G"
    assert shortest_path_length(desc) is not None


TRANSPOSED_ACTION = [3, 2, 1, 0]
"""left <-> up, down <-> right under the diagonal mirror."""


@settings(max_examples=40, deadline=None)
@given(is_hole=hole_layouts, kind=st.sampled_from(["hole", "nohole"]), seed=st.integers(0, 2**16))
def test_transposed_map_is_the_same_task_with_states_and_actions_relabelled(is_hole, kind, seed):
    desc = layout_to_map(is_hole)
    mirrored = transposed_map(desc)
    assert transposed_map(mirrored) == desc and mirrored[0][0] == "S" and mirrored[-1][-1] == "G"
    assert sorted("".join(mirrored)) == sorted("".join(desc))
    assert shortest_path_length(mirrored) == shortest_path_length(desc)
    policy = random_policy(seed)
    cell = torch.arange(MAP_SIZE * MAP_SIZE)
    mirrored_cell = (cell % MAP_SIZE) * MAP_SIZE + cell // MAP_SIZE
    mirrored_policy = torch.empty_like(policy)
    mirrored_policy[mirrored_cell[:, None], torch.tensor(TRANSPOSED_ACTION)] = policy
    value = evaluate_policy(FrozenLakeTask(desc, kind).mdp, policy).expected_return
    mirrored_value = evaluate_policy(FrozenLakeTask(mirrored, kind).mdp, mirrored_policy).expected_return
    torch.testing.assert_close(mirrored_value, value, rtol=1e-12, atol=1e-12)


def test_six_step_map_optimal_return():
    assert shortest_path_length(SIX_STEP_MAP) == 6
    optimal = value_iteration(FrozenLakeTask(SIX_STEP_MAP, "hole").mdp).expected_return.item()
    assert optimal == pytest.approx(1.6383, abs=1e-4)
    assert optimal == pytest.approx(discounted_goal_return(5), abs=1e-12)


@pytest.mark.parametrize(("kind", "num_train"), [("hole", 10), ("nohole", 20)])
def test_default_splits_are_disjoint_solvable_and_fixed(kind, num_train):
    family = FrozenLake(kind)
    train_maps = {task.desc for task in family.train_tasks()}
    test_maps = {task.desc for task in family.test_tasks()}
    assert len(train_maps) == num_train and len(test_maps) == 10
    assert not train_maps & test_maps
    assert all(shortest_path_length(desc) is not None for desc in train_maps | test_maps)
    assert family.train_tasks() == FrozenLake(kind).train_tasks()


def test_sample_tasks_draws_training_maps(rng):
    family = FrozenLake("hole", num_train=3, num_test=2)
    assert set(family.sample_tasks(20, rng)) <= set(family.train_tasks())


def monte_carlo_returns(env: gym.Env, policy: np.ndarray, episodes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cumulative_policy = policy.cumsum(-1)
    returns = np.zeros(episodes)
    env.reset(seed=seed)
    for episode in range(episodes):
        obs, _ = env.reset()
        discount, done = 1.0, False
        while not done:
            action = min(int(np.searchsorted(cumulative_policy[obs], rng.random())), 3)
            obs, reward, terminated, truncated, _ = env.step(action)
            returns[episode] += discount * reward
            discount *= GAMMA
            done = terminated or truncated
    return returns


@pytest.mark.parametrize("kind", ["hole", "nohole"])
def test_exact_policy_value_matches_monte_carlo(kind):
    task = FrozenLakeTask(SIX_STEP_MAP, kind)
    policy = random_policy(seed=1)
    exact = evaluate_policy(task.mdp, policy).expected_return.item()
    env = FrozenLake(kind).make_env(task)
    returns = monte_carlo_returns(env, policy.numpy(), episodes=1500, seed=2)
    standard_error = returns.std(ddof=1) / np.sqrt(len(returns))
    assert abs(returns.mean() - exact) < 4 * standard_error


def test_hole_env_terminates_with_minus_one_and_nohole_env_continues():
    into_hole = [2, 1]
    for kind, hole_reward, terminal in [("hole", -1.0, True), ("nohole", -0.5, False)]:
        env = FrozenLake(kind).make_env(FrozenLakeTask(SIX_STEP_MAP, kind))
        env.reset(seed=0)
        _, reward_0, *_ = env.step(into_hole[0])
        obs, reward_1, terminated, truncated, _ = env.step(into_hole[1])
        assert (obs, reward_0, reward_1, terminated, truncated) == (5, 0.0, hole_reward, terminal, False)


def test_goal_is_absorbing_and_pays_every_step():
    env = FrozenLake("hole").make_env(FrozenLakeTask(SIX_STEP_MAP, "hole"))
    env.reset(seed=0)
    rewards = [env.step(action)[1] for action in [2, 2, 1, 1, 1, 2, 0, 3, 3]]
    assert rewards == [0.0] * 5 + [1.0] * 4


def test_optimal_greedy_policy_attains_the_discounted_optimum():
    mdp = FrozenLakeTask(SIX_STEP_MAP, "nohole").mdp
    optimal = value_iteration(mdp, finite_horizon=False)
    greedy = torch.nn.functional.one_hot(optimal.action_values.argmax(-1), 4).to(torch.float64)
    evaluated = evaluate_policy(mdp, greedy, finite_horizon=False)
    torch.testing.assert_close(evaluated.state_values, optimal.state_values, rtol=0, atol=1e-10)


def test_finite_horizon_value_approaches_discounted_value():
    mdp = FrozenLakeTask(SIX_STEP_MAP, "nohole").mdp
    policy = random_policy(seed=3)
    finite = evaluate_policy(mdp, policy).expected_return
    infinite = evaluate_policy(mdp, policy, finite_horizon=False).expected_return
    assert abs(finite - infinite).item() <= GAMMA**HORIZON / (1 - GAMMA)


def test_policy_evaluation_is_differentiable_and_batched():
    mdps = stack_mdps([task.mdp for task in FrozenLake("hole", num_train=3, num_test=1).train_tasks()])
    logits = torch.randn(3, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def batched_return(logits: torch.Tensor) -> torch.Tensor:
        return evaluate_policy(mdps, logits.softmax(-1)).expected_return

    assert batched_return(logits).shape == (3,)
    direction = torch.randn_like(logits)
    (gradient,) = torch.autograd.grad(batched_return(logits.requires_grad_()).sum(), logits)
    step = 1e-6
    finite_difference = (
        batched_return(logits + step * direction).sum() - batched_return(logits - step * direction).sum()
    ) / (2 * step)
    assert (gradient * direction).sum().item() == pytest.approx(finite_difference.item(), rel=1e-6)
    single = evaluate_policy(FrozenLake("hole").train_tasks()[1].mdp, logits[1].softmax(-1)).expected_return
    torch.testing.assert_close(batched_return(logits)[1], single)


def test_policy_evaluation_composes_with_torch_func():
    mdp = FrozenLakeTask(SIX_STEP_MAP, "nohole").mdp
    logits = torch.randn(5, 16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))

    def expected_return(logits: torch.Tensor) -> torch.Tensor:
        return evaluate_policy(mdp, logits.softmax(-1)).expected_return

    per_policy_gradients = torch.func.vmap(torch.func.grad(expected_return))(logits)
    torch.testing.assert_close(per_policy_gradients[2], torch.func.grad(expected_return)(logits[2]))


@pytest.mark.parametrize("kind", ["hole", "nohole"])
def test_sampled_episodes_match_exact_return_and_visitation(kind):
    mdps = stack_mdps([task.mdp for task in FrozenLake(kind, num_train=2, num_test=1).train_tasks()])
    policy = torch.stack([random_policy(seed=4), random_policy(seed=5)])
    episodes = sample_episodes(mdps, policy, 4000, torch.Generator().manual_seed(0))
    assert episodes.states.shape == episodes.rewards.shape == episodes.alive.shape == (2, 4000, HORIZON)
    assert not (episodes.alive[..., 1:] & ~episodes.alive[..., :-1]).any()
    discounts = GAMMA ** torch.arange(HORIZON, dtype=torch.float64)
    returns = (episodes.rewards * discounts).sum(-1)
    exact = evaluate_policy(mdps, policy).expected_return
    standard_error = returns.std(dim=-1) / 4000**0.5
    assert ((returns.mean(-1) - exact).abs() < 4 * standard_error).all()
    visits = torch.zeros(2, 17, dtype=torch.float64).scatter_add_(
        -1, episodes.states.reshape(2, -1), (episodes.alive * discounts).reshape(2, -1)
    )
    torch.testing.assert_close(visits[:, :16] / 4000, discounted_visitation(mdps, policy)[:, :16], atol=0.05, rtol=0)


def test_discounted_visitation_sums_to_the_discounted_horizon_without_termination():
    mdp = FrozenLakeTask(SIX_STEP_MAP, "nohole").mdp
    visitation = discounted_visitation(mdp, random_policy(seed=6))
    assert visitation.sum().item() == pytest.approx((1 - GAMMA**HORIZON) / (1 - GAMMA), abs=1e-12)
    assert visitation[-1] == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_train": -3}, "`num_train`.*-3"),
        ({"num_test": -4}, "`num_test`.*-4"),
        ({"hole_probability": 1.0}, "`hole_probability`.*1.0"),
        ({"hole_probability": float("nan")}, "`hole_probability`.*nan"),
    ],
)
def test_bad_family_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        FrozenLake("hole", **options)


def test_too_few_distinct_maps_is_an_error_not_a_hang(monkeypatch):
    """Without holes only one map exists: asking for two stops after `MAX_MAP_DRAWS` draws."""
    monkeypatch.setattr("bilevel.envs.frozen_lake.MAX_MAP_DRAWS", 50)
    with pytest.raises(ValueError, match=r"only 1 distinct.*asked for 2"):
        FrozenLake("hole", num_train=1, num_test=1, hole_probability=0.0)
