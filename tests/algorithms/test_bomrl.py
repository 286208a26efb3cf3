"""BO-MRL on tabular Frozen Lake: exact hypergradients, closed forms, the CLI."""

import functools
import json

import pytest
import torch

from bilevel import cli
from bilevel.algorithms._tabular import TaskStatistics, exact_statistics
from bilevel.algorithms.bomrl import (
    adapt_logits,
    adaptation_loss,
    adaptation_residual,
    exact_meta_objective,
    forward_kl_adaptation,
    regularised_lower_bound_gain,
    reverse_kl_adaptation,
)
from bilevel.envs import FrozenLake, stack_mdps
from bilevel.inner import adam, unroll
from bilevel.runs.loop import load_learner

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

    loss = functools.partial(adaptation_loss, behaviour_logits=meta_logits, advantages=statistics.advantages,
                             visitation=statistics.visitation, lam=lam, distance=distance)
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


def test_d1_and_d2_ignore_the_visitation_weights_of_visited_states(family, meta_logits):
    statistics = statistics_of(family, meta_logits)
    reweighted = TaskStatistics(statistics.advantages, 3.0 * statistics.visitation)
    for distance in ("D1", "D2"):
        assert torch.allclose(adapt_logits(meta_logits, statistics, 0.3, distance),
                              adapt_logits(meta_logits, reweighted, 0.3, distance))


@pytest.mark.parametrize(("distance", "lam", "name"), [("D4", 0.1, "D4"), ("D1", 0.0, "lam"), ("D2", -1.0, "lam")])
def test_bad_adaptation_options_raise_naming_them(family, meta_logits, distance, lam, name):
    with pytest.raises(ValueError, match=name):
        adapt_logits(meta_logits, statistics_of(family, meta_logits), lam, distance)


def train_argv(run_dir, iterations, *extra):
    return ["train", "bomrl", "--env", "frozenlake-hole", "--iterations", str(iterations), "--episodes", "20",
            "--tasks-per-batch", "2", "--device", "cpu", "--run-dir", str(run_dir), "--no-progress", *extra]


def test_cli_smoke_resume_equals_straight_run_and_eval(tmp_path):
    assert cli.main(train_argv(tmp_path / "straight", 3)) == 0
    assert cli.main(train_argv(tmp_path / "resumed", 2)) == 0
    assert cli.main(["train", "bomrl", "--resume", str(tmp_path / "resumed"), "--iterations", "3",
                     "--no-progress"]) == 0
    _, straight = load_learner(tmp_path / "straight")
    _, resumed = load_learner(tmp_path / "resumed")
    assert resumed.iteration == straight.iteration == 3
    assert torch.equal(resumed.logits, straight.logits)
    assert not torch.equal(straight.logits, torch.zeros_like(straight.logits))

    assert cli.main(["eval", str(tmp_path / "straight"), "--rounds", "2", "--exact", "True"]) == 0
    result = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert result["bomrl_2"] >= result["bomrl_0"]
    assert result["optimum"] >= max(result[f"{method}_{k}"] for method in ("bomrl", "pg_meta") for k in range(3))


@pytest.mark.parametrize(("option", "value"), [("--distance", "D7"), ("--lam", "0"), ("--lam", "-0.5")])
def test_cli_bad_input_exits_2_naming_it(tmp_path, capsys, option, value):
    assert cli.main([*train_argv(tmp_path / "run", 1), option, value]) == 2
    assert option.removeprefix("--") in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
