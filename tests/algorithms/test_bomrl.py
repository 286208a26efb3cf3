"""BO-MRL on tabular Frozen Lake: exact hypergradients, closed forms, the CLI."""

import functools
import json

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from bilevel import cli
from bilevel.algorithms._tabular import (
    TaskStatistics,
    collect_statistics,
    episode_statistics,
    exact_statistics,
    model_statistics,
    sample_statistics,
)
from bilevel.algorithms.bomrl import (
    BOMRLLearner,
    adapt_logits,
    adaptation_loss,
    adaptation_residual,
    exact_meta_objective,
    forward_kl_adaptation,
    one_round_gap_bound,
    regularised_lower_bound_gain,
    reverse_kl_adaptation,
    task_return,
)
from bilevel.envs import FrozenLake, stack_mdps, transposed_map, value_iteration
from bilevel.envs.tabular import Episodes, discounted_visitation
from bilevel.inner import adam, unroll
from bilevel.runs.loop import load_learner, make_config

LAMBDAS = {"D1": 0.3, "D2": 0.3, "D3": 1.0}


@pytest.fixture(scope="module")
def family():
    return FrozenLake("hole")


@pytest.fixture(scope="module")
def meta_logits():
    return 0.5 * torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))


def newton_minimise(loss, logits, steps):
    """A generic solver: Newton steps on ``loss`` with curvatures taken in absolute value."""
    flat_loss = lambda flat: loss(flat.reshape(logits.shape))  # noqa: E731
    flat = logits.reshape(-1)
    for _ in range(steps):
        curvatures, directions = torch.linalg.eigh(torch.func.hessian(flat_loss)(flat))
        gradient = torch.func.grad(flat_loss)(flat)
        flat = flat - directions @ ((directions.T @ gradient) / curvatures.abs().clamp(min=1e-10))
    return flat.reshape(logits.shape)


def statistics_of(family, logits, index=0):
    return exact_statistics(family.train_tasks()[index].mdp, logits)


@pytest.mark.parametrize("distance", ["D1", "D2", "D3"])
def test_hypergradient_equals_finite_differences_of_exact_meta_objective(family, meta_logits, distance):
    mdps = stack_mdps([task.mdp for task in family.train_tasks()[:2]])
    objective = functools.partial(exact_meta_objective, mdps=mdps, lam=LAMBDAS[distance], distance=distance)
    gradient = torch.func.grad(objective)(meta_logits)
    generator = torch.Generator().manual_seed(1)
    for _ in range(2):
        direction = torch.randn(16, 4, dtype=torch.float64, generator=generator)
        step = 1e-5
        finite_difference = (objective(meta_logits + step * direction) - objective(meta_logits - step * direction)) / (
            2 * step
        )
        assert float((gradient * direction).sum()) == pytest.approx(float(finite_difference), rel=1e-6)


def test_hypergradient_is_finite_when_adaptation_saturates_the_softmax(family):
    mdps = stack_mdps([task.mdp for task in family.train_tasks()[:2]])
    objective = functools.partial(exact_meta_objective, mdps=mdps, lam=0.005, distance="D2")
    gradient = torch.func.grad(objective)(torch.zeros(16, 4, dtype=torch.float64))
    assert torch.isfinite(gradient).all() and gradient.abs().max() > 0


@pytest.mark.parametrize("distance", ["D1", "D2"])
def test_closed_forms_are_stationary_and_agree_with_an_iterative_solve(family, meta_logits, distance):
    statistics = statistics_of(family, meta_logits)
    lam = LAMBDAS[distance]
    closed_form = {"D1": forward_kl_adaptation, "D2": reverse_kl_adaptation}[distance]
    adapted = closed_form(meta_logits, statistics.advantages, lam)
    residual = adaptation_residual(adapted, meta_logits, *statistics, lam, distance)
    assert residual.abs().max() < 1e-10

    loss = functools.partial(
        adaptation_loss,
        behaviour_logits=meta_logits,
        advantages=statistics.advantages,
        visitation=statistics.visitation,
        lam=lam,
        distance=distance,
    )
    iterative = newton_minimise(loss, unroll(loss, meta_logits, adam(0.05), 300), steps=40)
    assert torch.allclose(torch.softmax(iterative, -1), torch.softmax(adapted, -1), atol=1e-8)
    assert loss(adapted) <= loss(iterative) + 1e-12


def test_d3_solver_reaches_a_stationary_point(family, meta_logits):
    statistics = statistics_of(family, meta_logits)
    adapted = adapt_logits(meta_logits, statistics, LAMBDAS["D3"], "D3")
    residual = adaptation_residual(adapted, meta_logits, *statistics, LAMBDAS["D3"], "D3")
    assert residual.abs().max() < 1e-10


@pytest.mark.parametrize("distance", ["D1", "D2", "D3"])
@pytest.mark.parametrize("lam", [0.05, 0.5, 3.0])
@pytest.mark.parametrize("task_index", [0, 3])
def test_adaptation_never_lowers_the_regularised_lower_bound(family, meta_logits, distance, lam, task_index):
    statistics = statistics_of(family, meta_logits, task_index)
    adapted = adapt_logits(meta_logits, statistics, lam, distance)
    gain = regularised_lower_bound_gain(adapted, meta_logits, *statistics, lam, distance)
    assert gain >= -1e-12
    perturbed = adapted + 0.01 * torch.randn(16, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    assert gain >= regularised_lower_bound_gain(perturbed, meta_logits, *statistics, lam, distance) - 1e-12


@settings(max_examples=50, deadline=None)
@given(
    logits=st.lists(st.floats(-60, 60), min_size=4, max_size=4),
    advantages=st.lists(st.floats(-2, 2), min_size=4, max_size=4, unique=True),
    lam=st.floats(1e-3, 3.0),
)
@example(logits=[0.0, -9.0, -9.0, 8.0], advantages=[0.0, 1.0, -1.0, 3.1956740240095096e-50], lam=0.015625)
@example(logits=[-40.0, 0.0, -40.0, -40.0], advantages=[0.3, 0.0, -0.5, -0.5], lam=0.1)
def test_d1_follows_the_best_advantage_whatever_its_prior_where_d2_weighs_the_prior(logits, advantages, lam):
    """One state, ``b = argmax_a A(a)``, ``gap(a) = A(b) - A(a)``. D1 (``pi(a) = lambda pi_phi(a) / (mu - A(a))``,
    ``A(b) < mu <= A(b) + lambda``): ``pi(b) >= 1 - lambda (1 - pi_phi(b)) / min_{a != b} gap(a)`` however small
    ``pi_phi(b)`` is, and ``pi(a) >= lambda pi_phi(a) / (lambda + gap(a))``. D2: the odds are the prior's times
    ``exp(gap / lambda)`` exactly, so an action the meta-policy rules out needs a gap of ``lambda log(odds)``."""
    phi = torch.tensor([logits], dtype=torch.float64)
    advantage = torch.tensor([advantages], dtype=torch.float64)
    behaviour = torch.softmax(phi, dim=-1)
    best = advantage.argmax(dim=-1, keepdim=True)
    gaps = advantage.gather(-1, best) - advantage
    smallest_gap = gaps.scatter(-1, best, float("inf")).min(dim=-1).values
    forward = torch.softmax(forward_kl_adaptation(phi, advantage, lam), dim=-1)
    best_floor = 1 - lam * (1 - behaviour.gather(-1, best).squeeze(-1)) / smallest_gap
    assert torch.all(forward.gather(-1, best).squeeze(-1) >= best_floor - 1e-12)
    assert torch.all(forward >= lam * behaviour / (lam + gaps) * (1 - 1e-9))
    reverse = torch.log_softmax(reverse_kl_adaptation(phi, advantage, lam), dim=-1)
    log_odds = reverse - reverse.gather(-1, best)
    expected = torch.log(behaviour) - torch.log(behaviour.gather(-1, best)) - gaps / lam
    assert torch.allclose(log_odds, expected, rtol=0, atol=1e-8)


def test_d1_and_d2_ignore_the_visitation_weights_of_visited_states(family, meta_logits):
    statistics = statistics_of(family, meta_logits)
    reweighted = TaskStatistics(statistics.advantages, 3.0 * statistics.visitation)
    for distance in ("D1", "D2"):
        assert torch.allclose(
            adapt_logits(meta_logits, statistics, 0.3, distance), adapt_logits(meta_logits, reweighted, 0.3, distance)
        )


@pytest.mark.parametrize(("distance", "lam", "name"), [("D4", 0.1, "D4"), ("D1", 0.0, "lam"), ("D2", -1.0, "lam")])
def test_bad_adaptation_options_raise_naming_them(family, meta_logits, distance, lam, name):
    with pytest.raises(ValueError, match=name):
        adapt_logits(meta_logits, statistics_of(family, meta_logits), lam, distance)


def train_argv(run_dir, iterations, *extra):
    return [
        "train",
        "bomrl",
        "--env",
        "frozenlake-hole",
        "--iterations",
        str(iterations),
        "--episodes",
        "20",
        "--tasks-per-batch",
        "2",
        "--device",
        "cpu",
        "--run-dir",
        str(run_dir),
        "--no-progress",
        *extra,
    ]


@pytest.mark.parametrize("sampler", ["tensors", "gym"])
def test_cli_smoke_resume_equals_straight_run_and_eval(tmp_path, sampler):
    assert cli.main(train_argv(tmp_path / "straight", 3, "--sampler", sampler)) == 0
    assert cli.main(train_argv(tmp_path / "resumed", 2, "--sampler", sampler)) == 0
    assert (
        cli.main(["train", "bomrl", "--resume", str(tmp_path / "resumed"), "--iterations", "3", "--no-progress"]) == 0
    )
    _, straight = load_learner(tmp_path / "straight")
    _, resumed = load_learner(tmp_path / "resumed")
    assert resumed.iteration == straight.iteration == 3
    assert torch.equal(resumed.logits, straight.logits)
    assert not torch.equal(straight.logits, torch.zeros_like(straight.logits))

    assert cli.main(["eval", str(tmp_path / "straight"), "--rounds", "2", "--exact", "True"]) == 0
    result = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert result["bomrl_2"] >= result["bomrl_0"]
    assert result["optimum"] >= max(result[f"{method}_{k}"] for method in ("bomrl", "pg_meta") for k in range(3))
    assert result["bound_gap"] > 0

    assert cli.main(["archive", str(tmp_path / "straight"), "--to", str(tmp_path / "records")]) == 0
    assert cli.main(["eval", str(tmp_path / "records" / "straight"), "--rounds", "2", "--exact", "True"]) == 0
    assert json.loads((tmp_path / "records" / "straight" / "eval.json").read_text()) == result, (
        "a record's logits evaluate as its run's checkpoint does")


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--distance", "D7"),
        ("--lam", "0"),
        ("--lam", "-0.5"),
        ("--eval-lam", "-1"),
        ("--sampler", "dice"),
        ("--estimator", "td"),
    ],
)
def test_cli_bad_input_exits_2_naming_it(tmp_path, capsys, option, value):
    assert cli.main([*train_argv(tmp_path / "run", 1), option, value]) == 2
    assert option.removeprefix("--").replace("-", "_") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_episodes_from_the_tensors_and_from_the_gym_env_give_the_same_statistics(family, meta_logits):
    task = family.train_tasks()[1]
    from_tensors, steps = sample_statistics(task.mdp, meta_logits, 6000, torch.Generator().manual_seed(0))
    from_gym, gym_steps = collect_statistics(task, meta_logits, 6000, seed=1)
    assert abs(steps - gym_steps) < 0.05 * gym_steps
    torch.testing.assert_close(from_tensors.visitation, from_gym.visitation, atol=0.03, rtol=0)
    visited = exact_statistics(task.mdp, meta_logits).visitation > 0.3
    torch.testing.assert_close(from_tensors.advantages[visited], from_gym.advantages[visited], atol=0.1, rtol=0)


def test_sampled_statistics_are_batched_over_tasks(family, meta_logits):
    tasks = family.train_tasks()[:2]
    logits = torch.stack([meta_logits, -meta_logits])
    statistics, _ = sample_statistics(
        stack_mdps([t.mdp for t in tasks]), logits, 3000, torch.Generator().manual_seed(2)
    )
    assert statistics.advantages.shape == (2, 16, 4) and statistics.visitation.shape == (2, 16)
    for index, task in enumerate(tasks):
        exact = exact_statistics(task.mdp, logits[index]).visitation
        torch.testing.assert_close(statistics.visitation[index], exact, atol=0.03, rtol=0.05)


def test_validation_maps_are_left_out_of_meta_training():
    config = make_config("bomrl", {"iterations": 3, "num_validation": 3, "exact": True, "device": "cpu"})
    learner = BOMRLLearner(config, torch.device("cpu"))
    train = learner.family.train_tasks()
    assert learner.meta_train_tasks == train[:7] and learner.split_tasks("validation") == train[7:]
    result = learner.evaluate(rounds=1, split="validation", exact=False, lam=0.2, baselines=False, estimator="model")
    assert result["lam"] == 0.2 and "pg_meta_0" not in result and result["bomrl_1"] > result["bomrl_0"]
    with pytest.raises(ValueError, match="split"):
        learner.evaluate(split="holdout")


def test_transposed_maps_add_mirrors_of_meta_training_maps_only():
    config = make_config("bomrl", {"num_validation": 3, "transposed_maps": True, "device": "cpu"})
    learner = BOMRLLearner(config, torch.device("cpu"))
    train, test = learner.family.train_tasks(), learner.family.test_tasks()
    originals, mirrors = learner.meta_train_tasks[:7], learner.meta_train_tasks[7:]
    assert originals == train[:7] and len(mirrors) == 6
    other_maps = {task.desc for task in [*train[7:], *test]}
    assert {task.desc for task in mirrors} <= {transposed_map(task.desc) for task in originals} - other_maps
    assert len({task.desc for task in learner.meta_train_tasks}) == 13


@pytest.mark.parametrize("distance", ["D1", "D2"])
def test_gap_bound_vanishes_at_the_optimum_and_is_positive_elsewhere(family, distance):
    mdps = stack_mdps([task.mdp for task in family.train_tasks()[:3]])
    bound = one_round_gap_bound(torch.zeros(16, 4, dtype=torch.float64), mdps, 0.1, distance)
    assert bound["bound_gap"] > 0 and bound["bound_1"] < bound["bound_optimal_return"]
    assert bound["bound_optimal_return"] == pytest.approx(1.6383, abs=1e-3)
    single = stack_mdps([family.train_tasks()[0].mdp])
    optimal = value_iteration(single)
    greedy = optimal.action_values[0, :16].argmax(-1)
    optimal_logits = torch.log(torch.nn.functional.one_hot(greedy, 4).to(torch.float64).clamp(min=1e-12))
    assert float(task_return(single, optimal_logits[None])[0]) == pytest.approx(float(optimal.expected_return[0]),
                                                                              abs=1e-8)
    near = one_round_gap_bound(optimal_logits, single, 0.1, distance, rounds=1)
    assert near["bound_gap"] < 1e-8 and near["bound_1"] == pytest.approx(float(optimal.expected_return[0]), abs=1e-8)


@pytest.mark.parametrize("distance", ["D1", "D2"])
def test_gap_bound_is_its_formula(family, meta_logits, distance):
    """``lambda (1 + gamma) / (1 - gamma) E_tau sum_s nu_phi(s) KL_s`` with ``KL_s = KL(pi* || pi_phi)`` for D1 and
    ``KL(pi_phi || pi*)`` for D2 (probabilities clipped at 1e-4), ``nu_phi`` the meta-policy's discounted visitation
    normalised over the map's cells, written out per task and state."""
    tasks = family.train_tasks()[:2]
    mdps = stack_mdps([task.mdp for task in tasks])
    lam, rounds = 0.3, 2
    bound = one_round_gap_bound(meta_logits, mdps, lam, distance, rounds=rounds)
    total = 0.0
    for task in tasks:
        logits = meta_logits
        for _ in range(rounds):
            logits = adapt_logits(logits, exact_statistics(task.mdp, logits), lam, distance)
        star, meta = torch.softmax(logits, -1).clamp(min=1e-4), torch.softmax(meta_logits, -1).clamp(min=1e-4)
        p, q = (star, meta) if distance == "D1" else (meta, star)
        visitation = discounted_visitation(task.mdp, torch.softmax(meta_logits, -1))[:16]
        weights = visitation / visitation.sum()
        total += sum(float(weights[s]) * float((p[s] * (p[s] / q[s]).log()).sum()) for s in range(16))
    gamma = float(mdps.gamma)
    assert bound["bound_kl"] == pytest.approx(total / len(tasks), rel=1e-9)
    assert bound["bound_gap"] == pytest.approx(lam * (1 + gamma) / (1 - gamma) * total / len(tasks), rel=1e-9)


def test_model_estimator_is_exact_on_a_deterministic_map_once_every_reachable_pair_is_tried(family, meta_logits):
    task = family.train_tasks()[2]
    statistics, _ = sample_statistics(task.mdp, meta_logits, 3000, torch.Generator().manual_seed(3), "model")
    exact = exact_statistics(task.mdp, meta_logits)
    reachable = exact.visitation > 1e-3
    torch.testing.assert_close(statistics.advantages[reachable], exact.advantages[reachable], atol=1e-10, rtol=0)
    torch.testing.assert_close(statistics.visitation, exact.visitation, atol=0.05, rtol=0.05)


def handmade_episodes():
    """Three episodes of five steps on three cells (0-2) and a sink (3), two actions; the second enters the sink at
    step 1 (its reward -1 kept, its later steps dead). Cell 2's action 1 is tried only at an episode's last step,
    which has no recorded successor."""
    return Episodes(
        states=torch.tensor([[0, 1, 2, 0, 1], [0, 2, 3, 3, 3], [1, 1, 0, 2, 2]]),
        actions=torch.tensor([[0, 1, 0, 0, 1], [1, 0, 0, 0, 0], [0, 0, 1, 0, 1]]),
        rewards=torch.tensor([[0.0, 1, 0, 0, 1], [0, -1, 0, 0, 0], [0, 0, 0, 1, 1]], dtype=torch.float64),
        alive=torch.tensor([[True] * 5, [True, True, False, False, False], [True] * 5]),
    )


def test_episode_and_model_statistics_equal_loops_over_handmade_episodes():
    """Monte-Carlo: ``Q^``, ``V^`` average the return-to-go over the alive visits; the model estimator builds
    ``P^`` and ``R^`` from the alive steps that have a successor, evaluates ``policy`` over ``H`` steps with ``V^``
    averaging only the tried actions (renormalised ``pi``), and leaves untried pairs at advantage 0."""
    episodes, gamma, horizon = handmade_episodes(), 0.9, 5
    policy = torch.softmax(torch.tensor([[0.3, -0.2], [1.0, 0.1], [-0.5, 0.4]], dtype=torch.float64), -1)
    states, actions, rewards, alive = (x.tolist() for x in episodes)

    returns = {}
    visits = [(b, t) for b in range(3) for t in range(horizon) if alive[b][t]]
    for b, t in visits:
        returns[b, t] = sum(gamma ** (k - t) * rewards[b][k] for k in range(t, horizon) if alive[b][k])
    mc = episode_statistics(episodes, 3, 2, gamma)
    for s in range(3):
        v = [returns[b, t] for b, t in visits if states[b][t] == s]
        for a in range(2):
            q = [returns[b, t] for b, t in visits if states[b][t] == s and actions[b][t] == a]
            expected = sum(q) / len(q) - sum(v) / len(v) if q else 0.0
            assert float(mc.advantages[s, a]) == pytest.approx(expected, abs=1e-12), ("mc", s, a)
    visitation = [sum(gamma**t for b, t in visits if states[b][t] == s) / 3 for s in range(3)]
    torch.testing.assert_close(mc.visitation, torch.tensor(visitation, dtype=torch.float64), rtol=1e-12, atol=0)

    counts, reward_sums = {}, {}
    for b, t in visits:
        if t + 1 < horizon:
            key = (states[b][t], actions[b][t])
            counts.setdefault(key, {}).setdefault(states[b][t + 1], 0)
            counts[key][states[b][t + 1]] += 1
            reward_sums[key] = reward_sums.get(key, 0.0) + rewards[b][t]
    assert (2, 1) not in counts, "the pair tried only at a last step has no model"
    values, q_values = [0.0] * 4, {}
    for _ in range(horizon):
        q_values = {key: reward_sums[key] / sum(nexts.values())
                    + gamma * sum(n * values[s2] for s2, n in nexts.items()) / sum(nexts.values())
                    for key, nexts in counts.items()}
        for s in range(3):
            tried = [a for a in range(2) if (s, a) in q_values]
            weight = sum(float(policy[s, a]) for a in tried)
            values[s] = sum(float(policy[s, a]) * q_values[s, a] for a in tried) / weight if tried else 0.0
    model = model_statistics(episodes, policy, 4, gamma, horizon)
    for s in range(3):
        for a in range(2):
            expected = q_values[s, a] - values[s] if (s, a) in q_values else 0.0
            assert float(model.advantages[s, a]) == pytest.approx(expected, abs=1e-12), ("model", s, a)
    torch.testing.assert_close(model.visitation, mc.visitation)
