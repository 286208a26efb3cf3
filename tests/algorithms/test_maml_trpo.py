"""MAML-TRPO: the meta-gradient through `unroll`, the batched adaptation, learning, and runs from the CLI."""

import json

import pytest
import torch

from bilevel import cli, tree
from bilevel.algorithms.maml_trpo import (
    MAMLTRPO,
    Behaviour,
    InnerLoop,
    TaskData,
    adapt,
    adapt_tasks,
    behaviour_of,
    meta_objectives,
    task_surrogate_loss,
)
from bilevel.nets import GaussianMLPPolicy
from bilevel.runs import RunFolder, train
from bilevel.runs.loop import load_learner, make_config, seed_everything

DTYPE = torch.float64
TASKS, STEPS, EPISODES, OBS_DIM, ACT_DIM = 3, 6, 4, 2, 2
TINY_NAVIGATION = {"env": "navigation-2d", "meta_batch_size": 4, "episodes_per_task": 4, "horizon": 20,
                   "hidden": (16, 16), "device": "cpu"}


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Two threads on a shared two-core machine run these small batched ops several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic_tasks(seed: int, policy: torch.nn.Module, params: dict) -> tuple[TaskData, TaskData, Behaviour]:
    """Train and validation batches of ``TASKS`` tasks, ragged episodes, and a behaviour policy that is
    not the adapted one (so the importance ratios differ from 1)."""
    generator = torch.Generator().manual_seed(seed)

    def batch() -> TaskData:
        lengths = torch.randint(2, STEPS + 1, (TASKS, 1, EPISODES), generator=generator)
        valid = torch.arange(STEPS)[None, :, None] < lengths
        return TaskData(torch.randn(TASKS, STEPS, EPISODES, OBS_DIM, generator=generator, dtype=DTYPE),
                        torch.randn(TASKS, STEPS, EPISODES, ACT_DIM, generator=generator, dtype=DTYPE),
                        torch.randn(TASKS, STEPS, EPISODES, generator=generator, dtype=DTYPE) * valid, valid)

    train_batch, valid_batch = batch(), batch()
    behaviour_params = tree.map(
        lambda p: p + 0.1 * torch.randn((TASKS, *p.shape), generator=generator, dtype=DTYPE), params)
    return train_batch, valid_batch, behaviour_of(policy, behaviour_params, valid_batch)


def float64_policy(hidden: tuple[int, ...]) -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(OBS_DIM, ACT_DIM, hidden=hidden).to(DTYPE)
    return policy, tree.detach(tree.params_of(policy))


def cli_options(values: dict) -> list[str]:
    return [token for key, value in values.items()
            for token in ("--" + key.replace("_", "-"), *map(str, value if isinstance(value, tuple) else (value,)))]


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_meta_gradient_through_unroll_matches_central_differences():
    policy, params = float64_policy(hidden=())
    train_batch, valid_batch, behaviour = synthetic_tasks(1, policy, params)
    inner = InnerLoop(policy, lr=0.5, steps=2)
    meta_loss, _ = meta_objectives(train_batch, valid_batch, behaviour, inner)

    gradient, _ = tree.ravel(torch.func.grad(meta_loss)(params))
    flat, unravel = tree.ravel(params)
    eps = 1e-6
    with torch.no_grad():
        finite_differences = torch.stack([
            (meta_loss(unravel(flat + eps * e)) - meta_loss(unravel(flat - eps * e))) / (2 * eps)
            for e in torch.eye(len(flat), dtype=DTYPE)
        ])
    assert relative_error(gradient, finite_differences) < 1e-6

    first_order_loss, _ = meta_objectives(train_batch, valid_batch, behaviour, inner._replace(first_order=True))
    first_order_gradient, _ = tree.ravel(torch.func.grad(first_order_loss)(params))
    assert relative_error(first_order_gradient, finite_differences) > 1e-3


def test_batched_adaptation_and_objective_equal_a_loop_over_tasks():
    policy, params = float64_policy(hidden=(8,))
    train_batch, valid_batch, behaviour = synthetic_tasks(2, policy, params)
    inner = InnerLoop(policy, lr=0.1, steps=3)

    batched = adapt_tasks(params, train_batch, inner)
    for task in range(TASKS):
        looped = adapt(params, TaskData(*(field[task] for field in train_batch)), inner)
        for name in params:
            torch.testing.assert_close(batched[name][task], looped[name], rtol=1e-12, atol=1e-12)
        assert not torch.equal(looped["log_std"], params["log_std"])

    meta_loss, meta_kl = meta_objectives(train_batch, valid_batch, behaviour, inner)
    looped_losses = [task_surrogate_loss(params, TaskData(*(f[i] for f in train_batch)),
                                         TaskData(*(f[i] for f in valid_batch)), Behaviour(*(f[i] for f in behaviour)),
                                         inner) for i in range(TASKS)]
    torch.testing.assert_close(meta_loss(params), torch.stack(looped_losses).mean(), rtol=1e-12, atol=1e-12)
    assert float(meta_kl(params)) > 0


def test_meta_kl_is_kl_from_the_data_collecting_policy_to_the_new_one():
    """Away from theta_old, ``meta_kl(theta)`` is ``mean_tasks mean_valid KL(pi_old(.|s) || pi_{theta'(theta)}(.|s))``
    as `torch.distributions.kl_divergence` computes it from the two policies on the validation states, and not
    the reverse ``KL(new || old)`` (the two agree to second order at theta_old, so TRPO's Fisher cannot tell)."""
    policy, params = float64_policy(hidden=(8,))
    train_batch, valid_batch, _ = synthetic_tasks(3, policy, params)
    inner = InnerLoop(policy, lr=0.1, steps=1)
    collecting = tree.detach(adapt_tasks(params, train_batch, inner))
    behaviour = behaviour_of(policy, collecting, valid_batch)
    _, meta_kl = meta_objectives(train_batch, valid_batch, behaviour, inner)
    generator = torch.Generator().manual_seed(7)
    moved = tree.map(lambda p: p + 0.3 * torch.randn(p.shape, generator=generator, dtype=DTYPE), params)

    def distribution(task_params: dict, obs: torch.Tensor) -> torch.distributions.Distribution:
        mean = torch.func.functional_call(policy.mean_net, {name.removeprefix("mean_net."): value for name, value
                                                            in task_params.items() if name != "log_std"}, (obs,))
        return torch.distributions.Independent(torch.distributions.Normal(mean, task_params["log_std"].exp()), 1)

    forward, reverse = [], []
    for task in range(TASKS):
        train_task = TaskData(*(field[task] for field in train_batch))
        obs, valid = valid_batch.obs[task], valid_batch.valid[task].to(DTYPE)
        old = distribution({name: value[task] for name, value in collecting.items()}, obs)
        new = distribution(adapt(moved, train_task, inner), obs)
        forward.append((torch.distributions.kl_divergence(old, new) * valid).sum() / valid.sum())
        reverse.append((torch.distributions.kl_divergence(new, old) * valid).sum() / valid.sum())
    expected, reversed_kl = torch.stack(forward).mean(), torch.stack(reverse).mean()

    with torch.no_grad():
        kl = meta_kl(moved)
    assert float(expected) > 1e-2
    assert relative_error(reversed_kl, expected) > 1e-2, "the directions must differ for the test to tell them apart"
    torch.testing.assert_close(kl, expected, rtol=1e-10, atol=0.0)
    assert float(meta_kl(params)) < 1e-20


@pytest.mark.slow
def test_meta_training_on_navigation_raises_the_post_adaptation_return(tmp_path):
    config = make_config("maml-trpo", {**TINY_NAVIGATION, "meta_batch_size": 10, "episodes_per_task": 10,
                                       "horizon": 100, "hidden": (64, 64), "iterations": 5})
    learner = train("maml-trpo", config, tmp_path / "run", progress=False)
    rows = RunFolder(tmp_path / "run").read_metrics()
    assert all(row["trpo_accepted"] == 1.0 and row["trpo_kl"] <= config.max_kl for row in rows)
    assert rows[-1]["return_after"] > rows[0]["return_after"] + 15

    seed_everything(config.seed)
    initial = MAMLTRPO(config, torch.device("cpu"))
    before_training = initial.evaluate(tasks=10, episodes=10)
    after_training = learner.evaluate(tasks=10, episodes=10)
    assert after_training["return_after_stochastic"] > before_training["return_after_stochastic"] + 15
    assert after_training["return_after_stochastic"] > after_training["return_before_stochastic"]


def test_cli_train_resume_equals_straight_run_and_eval(tmp_path):
    base = ["train", "maml-trpo", *cli_options(TINY_NAVIGATION), "--no-progress", "--checkpoint-every", "1"]
    assert cli.main([*base, "--iterations", "3", "--run-dir", str(tmp_path / "straight")]) == 0
    assert cli.main([*base, "--iterations", "2", "--run-dir", str(tmp_path / "resumed")]) == 0
    assert cli.main(["train", "maml-trpo", "--resume", str(tmp_path / "resumed"), "--iterations", "3",
                     "--no-progress"]) == 0

    _, straight = load_learner(tmp_path / "straight")
    _, resumed = load_learner(tmp_path / "resumed")
    assert resumed.iteration == straight.iteration == 3
    for name in straight.meta_params:
        assert torch.equal(straight.meta_params[name], resumed.meta_params[name])
    rows = RunFolder(tmp_path / "resumed").read_metrics()
    assert [row["return_after"] for row in rows] == [
        row["return_after"] for row in RunFolder(tmp_path / "straight").read_metrics()]
    assert {"return_before", "trpo_kl", "trpo_improvement", "trpo_backtracks", "trpo_accepted"} <= set(rows[0])

    assert cli.main(["eval", str(tmp_path / "straight"), "--tasks", "3", "--adaptation-steps", "2"]) == 0
    result = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert result["tasks"] == 3 and result["adaptation_steps"] == 2 and result["horizon"] == 20
    for key in ("before", "after"):
        assert -20 * 1.5 < result[f"return_{key}_deterministic"] < 0
        assert result[f"return_{key}_stochastic"] != result[f"return_{key}_deterministic"]
        for mode in ("stochastic", "deterministic"):
            per_task = [result[f"return_{key}_{mode}_task{i}"] for i in range(3)]
            assert len(set(per_task)) == 3, "three goals, three different returns"
            assert result[f"return_{key}_{mode}"] == pytest.approx(sum(per_task) / 3, rel=1e-6)

    assert cli.main(["archive", str(tmp_path / "straight"), "--to", str(tmp_path / "records")]) == 0
    assert cli.main(["eval", str(tmp_path / "records" / "straight"), "--tasks", "3", "--adaptation-steps", "2"]) == 0
    assert json.loads((tmp_path / "records" / "straight" / "eval.json").read_text()) == result


def test_cli_halfcheetah_velocity_one_iteration(tmp_path):
    run = tmp_path / "cheetah"
    argv = ["train", "maml-trpo", "--env", "halfcheetah-vel", "--meta-batch-size", "2", "--episodes-per-task", "2",
            "--horizon", "5", "--hidden", "8", "--iterations", "1", "--device", "cpu", "--no-progress",
            "--run-dir", str(run)]
    assert cli.main(argv) == 0
    (row,) = RunFolder(run).read_metrics()
    assert row["env_steps"] == 2 * 2 * 2 * 5
    assert -5 * 4 < row["return_before"] < 0
    _, learner = load_learner(run)
    assert learner.meta_params["mean_net.0.weight"].shape == (8, 17)


@pytest.mark.parametrize(
    ("override", "message"),
    [({"inner_lr": 0.0}, "inner_lr"), ({"ls_ratio": 1.5}, "ls_ratio"), ({"hidden": (0,)}, "hidden"),
     ({"meta_batch_size": 0}, "meta_batch_size"), ({"gae_lambda": 2.0}, "gae_lambda"),
     ({"env": "frozenlake-hole"}, "frozenlake-hole")],
)
def test_bad_config_raises_value_error_naming_it(override, message):
    with pytest.raises(ValueError, match=message):
        make_config("maml-trpo", {**TINY_NAVIGATION, **override})


def test_cli_bad_input_exits_2_naming_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "maml-trpo", "--env", "navigation-2d", "--max-kl", "-1", "--run-dir", str(run)]) == 2
    assert "max_kl" in capsys.readouterr().err
    assert not run.exists()

    base = ["train", "maml-trpo", "--meta-batch-size", "2", "--episodes-per-task", "2", "--horizon", "5",
            "--iterations", "1", "--device", "cpu", "--no-progress", "--run-dir", str(run)]
    assert cli.main(base) == 0
    capsys.readouterr()
    assert cli.main(["eval", str(run), "--adaptation-steps", "-1"]) == 2
    assert "adaptation_steps" in capsys.readouterr().err
    assert cli.main(["eval", str(run), "--tasks", "0"]) == 2
    assert "tasks" in capsys.readouterr().err
