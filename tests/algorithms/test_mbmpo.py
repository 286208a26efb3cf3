"""Minimum-attention MB-MPO: the penalised inner step, its batching, its effect, and runs from the CLI."""

import json
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.func import functional_call, vmap

from bilevel import cli, tree
from bilevel.algorithms.mbmpo import (
    AttentionPenalty,
    InnerLoop,
    MBMPOConfig,
    adapt,
    adapt_models,
    attention_terms,
    behaviour_of,
    imagine_models,
    meta_kl_outputs,
    meta_loss_and_kl,
    meta_objectives,
    meta_update,
    model_data,
    policy_distribution,
)
from bilevel.algorithms.mbmpo_analysis import mean_abs_jacobian, plot_mbmpo, samples_to_fraction
from bilevel.envs.rewards import half_cheetah_reward
from bilevel.linalg import gauss_newton_vector_operator, hessian_vector_operator
from bilevel.nets import GaussianMLPPolicy, ProbabilisticEnsemble
from bilevel.rl.meta_batches import TaskData
from bilevel.runs.folder import RunFolder
from bilevel.runs.loop import evaluate_run, load_learner

TINY = ["--horizon", "10", "--initial-random-steps", "30", "--episodes-per-model", "1", "--meta-steps", "1",
        "--imagined-trajectories", "4", "--imagined-horizon", "6", "--ensemble-size", "3", "--num-elites", "2",
        "--model-hidden", "16", "16", "--model-max-epochs", "2", "--hidden", "8", "8", "--inner-lr", "0.05",
        "--attention-weight", "0.5", "--first-order", "true", "--cg-iters", "3", "--device", "cpu", "--no-progress"]
"""A run in seconds: the second-order path is tested on its own below."""


def random_data(generator, models=None, steps=5, batch=3, obs_dim=3, act_dim=2, dtype=torch.float64):
    lead = (steps, batch) if models is None else (models, steps, batch)
    valid = torch.ones(lead, dtype=torch.bool)
    valid[..., -1, 0] = False
    return TaskData(torch.randn(*lead, obs_dim, generator=generator, dtype=dtype),
                    torch.randn(*lead, act_dim, generator=generator, dtype=dtype),
                    torch.randn(lead, generator=generator, dtype=dtype), valid)


def small_policy(obs_dim=3, act_dim=2, hidden=(4,), seed=0):
    torch.manual_seed(seed)
    policy = GaussianMLPPolicy(obs_dim, act_dim, hidden=hidden, init_log_std=-0.5).double()
    return policy, tree.params_of(policy, detach=True)


def test_penalty_gradient_through_unroll_matches_finite_differences():
    generator = torch.Generator().manual_seed(0)
    policy, meta_params = small_policy()
    pre, post = random_data(generator), random_data(generator)
    penalty = AttentionPenalty(0.7, spatial_weight=1.0, temporal_weight=0.3, dt=0.1)
    inner = InnerLoop(policy, lr=0.05, steps=2, penalty=penalty)

    def penalty_after_adaptation(params):
        return attention_terms(policy, adapt(params, pre, inner), post.obs, post.valid, penalty).total

    analytic = torch.func.grad(penalty_after_adaptation)(meta_params)
    eps = 1e-6
    for _ in range(3):
        direction = tree.map(lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype), meta_params)
        numeric = (penalty_after_adaptation(tree.axpy(eps, direction, meta_params))
                   - penalty_after_adaptation(tree.axpy(-eps, direction, meta_params))) / (2 * eps)
        directional = tree.dot(analytic, direction)
        assert abs(float(directional)) > 1e-2
        torch.testing.assert_close(directional, numeric.detach(), rtol=1e-7, atol=1e-9)


def test_one_inner_step_descends_the_policy_gradient_loss_plus_the_penalty():
    """One `adapt` step is ``theta - beta grad(L_PG + alpha P)(theta)`` with ``L_PG = -mean_valid[log pi(a|s) A]`` and
    ``P = alpha_x mean_valid ||d mu / d s||_F^2 + alpha_t mean_valid-pairs ||(mu(s_t+1) - mu(s_t)) / dt||^2`` written
    here from their definitions, for ``alpha > 0`` (so the penalty is added, not subtracted), on ragged episodes."""
    generator = torch.Generator().manual_seed(8)
    policy, meta_params = small_policy()
    data = random_data(generator, steps=6, batch=4)
    lengths = torch.tensor([6, 2, 4, 1])
    valid = torch.arange(6)[:, None] < lengths
    data = TaskData(data.obs, data.actions, data.advantages * valid, valid)
    alpha, spatial_weight, temporal_weight, dt, lr = 0.7, 1.0, 0.3, 0.1, 0.05
    inner = InnerLoop(policy, lr=lr, steps=1, penalty=AttentionPenalty(alpha, spatial_weight, temporal_weight, dt))

    def mean_action(params, obs):
        return functional_call(policy.mean_net, {name.removeprefix("mean_net."): value for name, value
                                                 in params.items() if name != "log_std"}, (obs,))

    def masked_mean(values, mask):
        mask = mask.to(values.dtype)
        return (values * mask).sum() / mask.sum()

    def pg_loss(params):
        normal = torch.distributions.Normal(mean_action(params, data.obs), params["log_std"].exp())
        return -masked_mean(normal.log_prob(data.actions).sum(-1) * data.advantages, valid)

    def penalty(params):
        jacobians = vmap(vmap(torch.func.jacrev(lambda s: mean_action(params, s))))(data.obs)
        spatial = masked_mean(jacobians.pow(2).sum((-2, -1)), valid)
        means = mean_action(params, data.obs)
        rates = ((means[1:] - means[:-1]) / dt).pow(2).sum(-1)
        temporal = masked_mean(rates, valid[1:] & valid[:-1])
        return spatial_weight * spatial + temporal_weight * temporal

    def descended(sign):
        gradient = torch.func.grad(lambda p: pg_loss(p) + sign * alpha * penalty(p))(meta_params)
        return tree.ravel(tree.map(lambda p, g: p - lr * g, meta_params, gradient))[0]

    expected, wrong_sign = descended(1.0), descended(-1.0)
    step = tree.ravel(adapt(meta_params, data, inner))[0]
    assert float((expected - wrong_sign).norm()) > 1e-3
    torch.testing.assert_close(step, expected, rtol=1e-10, atol=1e-12)


def test_batched_inner_step_equals_a_loop_over_models():
    generator = torch.Generator().manual_seed(1)
    policy, meta_params = small_policy()
    data = random_data(generator, models=4)
    inner = InnerLoop(policy, lr=0.1, steps=2, penalty=AttentionPenalty(1.0, 1.0, 0.5, dt=0.05))
    batched = adapt_models(meta_params, data, inner)
    for model in range(4):
        one = adapt(meta_params, TaskData(*(x[model] for x in data)), inner)
        for name in one:
            torch.testing.assert_close(batched[name][model], one[name], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(batched["mean_net.0.weight"][0], batched["mean_net.0.weight"][1])


def adapted_jacobian_after_meta_updates(alpha, iterations=1):
    """``mean ||d mu / d s||^2`` of the per-model adapted policies on a fixed batch imagined in a tiny
    ensemble (HalfCheetah's sizes and reward), after ``iterations`` meta-updates with weight ``alpha``."""
    torch.manual_seed(0)
    ensemble = ProbabilisticEnsemble(17, 6, ensemble_size=2, num_elites=2, hidden=(16,), predict_reward=False)
    policy = GaussianMLPPolicy(17, 6, hidden=(8, 8))
    meta_params = tree.params_of(policy, detach=True)
    obs_mean, obs_std = torch.zeros(17), torch.ones(17)
    generator = torch.Generator().manual_seed(0)
    start_states = torch.randn(6, 17, generator=generator).expand(2, -1, -1)
    penalty = AttentionPenalty(alpha, spatial_weight=1.0, temporal_weight=0.01, dt=0.05)
    inner = InnerLoop(policy, lr=0.05, steps=1, penalty=penalty)

    def imagined(params, per_model):
        batch = imagine_models(ensemble, policy, params, start_states, 6, half_cheetah_reward, None, obs_mean,
                               obs_std, generator, per_model=per_model)
        return model_data(batch, obs_mean, obs_std, 0.99, 1.0)

    pre = imagined(meta_params, per_model=False)
    post = imagined(tree.detach(adapt_models(meta_params, pre, inner)), per_model=True)
    for _ in range(iterations):
        adapted_params = tree.detach(adapt_models(meta_params, pre, inner))
        meta_params, info = meta_update(meta_params, pre, post, adapted_params, inner, max_kl=0.05, cg_iters=3)
        assert info.accepted
    adapted_params = adapt_models(meta_params, pre, inner)
    unweighted = penalty._replace(weight=1.0, temporal_weight=0.0)
    spatial = [attention_terms(policy, tree.map(lambda x, m=m: x[m], adapted_params), post.obs[m], post.valid[m],
                               unweighted).spatial for m in range(2)]
    return float(torch.stack(spatial).mean())


def test_attention_weight_lowers_the_adapted_policys_jacobian():
    plain, penalised = adapted_jacobian_after_meta_updates(0.0), adapted_jacobian_after_meta_updates(1.0)
    assert penalised < 0.8 * plain


def train_argv(run_dir, iterations):
    return ["train", "mbmpo", "--env", "halfcheetah", "--seed", "3", "--iterations", str(iterations), *TINY,
            "--run-dir", str(run_dir)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-iteration run straight through, and one trained for 2 iterations then resumed to 3."""
    root = tmp_path_factory.mktemp("mbmpo")
    assert cli.main(train_argv(root / "straight", 3)) == 0
    assert cli.main(train_argv(root / "resumed", 2)) == 0
    assert cli.main(["train", "mbmpo", "--resume", str(root / "resumed"), "--iterations", "3", "--no-progress"]) == 0
    return root / "straight", root / "resumed"


def test_cli_smoke_run_resume_and_out_of_distribution_eval(runs):
    straight_dir, resumed_dir = runs
    _, straight = load_learner(straight_dir)
    _, resumed = load_learner(resumed_dir)
    assert straight.iteration == resumed.iteration == 3
    assert straight.env_steps == resumed.env_steps == 30 + 2 * 10 * 3
    for name, value in straight.meta_params.items():
        assert torch.equal(value, resumed.meta_params[name]), name
    for name, value in straight.ensemble.state_dict().items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, resumed.ensemble.state_dict()[name]), name
    straight_rows = [row.split(",") for row in (straight_dir / "metrics.csv").read_text().splitlines()]
    resumed_rows = [row.split(",") for row in (resumed_dir / "metrics.csv").read_text().splitlines()]
    header = straight_rows[0]
    for key in ("return", "jacobian_sq", "jerk_sq", "energy", "env_steps", "trpo_kl"):
        assert key in header
    timing = {header.index("seconds"), header.index("env_steps_per_second")}
    for straight_row, resumed_row in zip(straight_rows, resumed_rows, strict=True):
        assert [v for i, v in enumerate(straight_row) if i not in timing] == [
            v for i, v in enumerate(resumed_row) if i not in timing]

    assert cli.main(["eval", str(resumed_dir), "--perturb", "crippled-joint", "--episodes", "2",
                     "--adaptation-episodes", "2", "--adaptation-steps", "1"]) == 0
    result = json.loads((resumed_dir / "eval.json").read_text())
    assert result["options"]["perturb"] == "crippled-joint"
    assert result["samples_0"] == 0 and result["samples_1"] == 2 * 10
    assert result["energy_0"] > 0 and result["horizon"] == 10


@pytest.mark.parametrize(("env", "batches"), [("halfcheetah", 1), ("hopper", None)])
def test_the_random_phase_holds_at_least_initial_random_steps_real_steps(env, batches):
    from bilevel.algorithms.mbmpo import MBMPO

    config = MBMPOConfig(env=env, horizon=100, initial_random_steps=300, device="cpu")
    config.validate()
    learner = MBMPO(config, torch.device("cpu"))
    try:
        random_batches = learner._random_episodes()
    finally:
        learner.close()
    steps = sum(int(batch.valid.sum()) for batch in random_batches)
    assert steps >= 300 and steps - int(random_batches[-1].valid.sum()) < 300
    if batches is not None:
        assert len(random_batches) == batches and steps == 300, "episodes that run to the horizon: one batch"
    else:
        assert len(random_batches) > 1, "a random Hopper falls within tens of steps, so one batch is short"


@pytest.mark.parametrize("env", ["hopper", "walker2d"])
def test_cli_smoke_run_and_out_of_distribution_eval_on_the_terminating_envs(tmp_path, env):
    run_dir = tmp_path / env
    argv = ["train", "mbmpo", "--env", env, "--seed", "0", "--iterations", "2", *TINY, "--run-dir", str(run_dir)]
    assert cli.main(argv) == 0
    header, *rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
    assert len(rows) == 2
    for key in ("return", "jacobian_sq", "imagined_return_post_last", "trpo_kl"):
        assert all(math.isfinite(float(row[header.index(key)])) for row in rows), key
    for perturbation in ("mass", "crippled-joint", "slope"):
        assert cli.main(["eval", str(run_dir), "--perturb", perturbation, "--episodes", "2",
                         "--adaptation-episodes", "2", "--adaptation-steps", "1"]) == 0
        result = json.loads((run_dir / "eval.json").read_text())
        assert result["options"]["perturb"] == perturbation and math.isfinite(result["return_1"])
        assert 0 < result["samples_1"] <= 2 * 10


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--env", "ant"], "ant"),
        (["--attention-weight", "-1"], "attention_weight"),
        (["--num-elites", "9"], "num_elites"),
        (["--meta-steps", "0"], "meta_steps"),
        (["--initial-random-steps", "5"], "initial_random_steps"),
    ],
)
def test_bad_input_exits_2_naming_it(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    assert cli.main(["train", "mbmpo", "--iterations", "1", *argv, "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_an_archived_record_evaluates_as_its_run_without_the_checkpoint(runs, tmp_path, capsys):
    """The record keeps the meta-policy and normaliser (`evaluation_state.pt`, kilobytes, not the checkpoint's
    ensemble and data); ``bilevel eval`` on it equals the run's evaluation, and it cannot be resumed."""
    run = runs[1]
    records = tmp_path / "records"
    assert cli.main(["archive", str(run), "--to", str(records)]) == 0
    record = records / run.name
    assert not (record / "checkpoints").exists()
    assert (record / "evaluation_state.pt").stat().st_size < (run / "checkpoints" / "last.pt").stat().st_size / 10
    options = {"perturb": "slope", "episodes": 1, "adaptation_episodes": 1, "adaptation_steps": 1}
    assert evaluate_run(record, options) == evaluate_run(run, options)
    assert json.loads((record / "eval.json").read_text())["iteration"] == 3
    _, learner = load_learner(record, evaluation_only=True)
    assert learner.env_steps == 30 + 2 * 10 * 3 and learner.data["obs"].shape[0] == 0
    with pytest.raises(ValueError, match=r"has no checkpoint$"):
        load_learner(record)
    assert cli.main(["train", "mbmpo", "--resume", str(record), "--iterations", "4", "--no-progress"]) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_bad_eval_options_raise_value_error_naming_them(runs, capsys):
    assert cli.main(["eval", str(runs[0]), "--perturb", "moon"]) == 2
    assert "perturb" in capsys.readouterr().err
    assert cli.main(["eval", str(runs[0]), "--episodes", "0"]) == 2
    assert "episodes" in capsys.readouterr().err
    for bad in ("0", "True", "nan"):
        assert cli.main(["eval", str(runs[0]), "--adaptation-lr", bad]) == 2
        assert "adaptation_lr" in capsys.readouterr().err
    with pytest.raises(ValueError, match="temporal_weight"):
        MBMPOConfig(temporal_weight=-0.1).validate()


def test_the_real_data_step_size_is_the_training_one_unless_given(runs):
    """The default meta-test equals one with ``adaptation_lr = inner_lr`` in every round, and another
    step size changes the returns after the first inner step but not before it."""
    run = runs[0]
    options = {"episodes": 1, "adaptation_episodes": 1, "adaptation_steps": 1}
    inner_lr = json.loads((run / "config.json").read_text())["config"]["inner_lr"]
    default = evaluate_run(run, options)
    same = evaluate_run(run, {**options, "adaptation_lr": inner_lr})
    other = evaluate_run(run, {**options, "adaptation_lr": 10 * inner_lr})
    keys = [k for k in default if k.startswith(("return_", "jacobian_sq_"))]
    assert all(default[k] == same[k] for k in keys) and default["adaptation_lr"] == inner_lr
    assert other["return_0"] == default["return_0"] and other["return_1"] != default["return_1"]


def test_bilevel_plot_draws_the_mbmpo_figures(runs, tmp_path, capsys):
    assert cli.main(["eval", str(runs[0]), "--perturb", "mass", "--episodes", "1", "--adaptation-episodes", "1",
                     "--adaptation-steps", "1"]) == 0
    (runs[0] / "eval-mass.json").write_text((runs[0] / "eval.json").read_text())
    assert cli.main(["eval", str(runs[0]), "--perturb", "None", "--episodes", "1", "--adaptation-episodes", "1",
                     "--adaptation-steps", "1"]) == 0
    out = tmp_path / "plots" / "return.png"
    assert cli.main(["plot", *map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    for name in ("return.png", "alpha_sweep.png", "adaptation.png", "jacobian_heatmap.png", "ood.md"):
        assert (out.parent / name).stat().st_size > 0
        assert str(out.parent / name) in printed
    table = (out.parent / "ood.md").read_text().splitlines()
    cells = [[cell.strip() for cell in row.split("|")[1:-1]] for row in table[2:]]
    assert [row[:4] for row in cells] == [["0.5", "mass", "1", "training"], ["0.5", "none", "1", "training"]]
    assert cells[1][6] == "0", "the in-distribution run reaches 90% of its own return before adaptation"

    records = tmp_path / "records"
    assert cli.main(["archive", str(runs[0]), "--to", str(records)]) == 0
    from_records = tmp_path / "from-records" / "return.png"
    assert cli.main(["plot", str(records / runs[0].name), "--out", str(from_records)]) == 0
    assert (from_records.parent / "ood.md").read_text() == (out.parent / "ood.md").read_text()
    assert (from_records.parent / "jacobian_heatmap.png").stat().st_size > 0, "drawn from the evaluation state"
    jacobians = [mean_abs_jacobian(load_learner(folder, "cpu", evaluation_only=True)[1])
                 for folder in (runs[0], records / runs[0].name)]
    assert jacobians[0].shape == (6, 17) and bool((jacobians[0] > 0).any())
    torch.testing.assert_close(jacobians[1], jacobians[0], rtol=0, atol=0)

    first_steps = RunFolder(runs[0]).read_metrics()[0]["env_steps"]
    assert cli.main(["plot", *map(str, runs), "--out", str(out), "--xmax", str(first_steps)]) == 0
    assert cli.main(["plot", *map(str, runs), "--out", str(out), "--xmax", str(first_steps - 1)]) == 2
    assert f"env_steps <= {first_steps - 1:g}" in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"no 'return' row with env_steps <= {first_steps - 1:g}"):
        plot_mbmpo(runs, tmp_path / "cut", x_max=first_steps - 1)


@given(returns=st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=1, max_size=8),
       reference=st.floats(-1e3, 1e3, allow_nan=False), fraction=st.floats(0.05, 1.0))
def test_samples_to_fraction_is_the_first_round_at_the_threshold(returns, reference, fraction):
    samples = [1000.0 * k for k in range(len(returns))]
    steps = samples_to_fraction(samples, returns, reference, fraction)
    threshold = reference - (1 - fraction) * abs(reference)
    reached = [k for k, r in enumerate(returns) if r >= threshold]
    if reached:
        assert steps == samples[reached[0]]
    else:
        assert math.isinf(steps)
    if reference > 0:
        assert all(r < fraction * reference for r in returns[:len(returns) if not reached else reached[0]])


def test_samples_to_fraction_rejects_bad_input():
    with pytest.raises(ValueError, match="fraction"):
        samples_to_fraction([0.0], [1.0], 1.0, fraction=0.0)
    with pytest.raises(ValueError, match="differ in length"):
        samples_to_fraction([0.0, 1.0], [1.0], 1.0)


def test_imagination_clips_actions_and_states_and_steps_the_model_mean():
    torch.manual_seed(0)
    ensemble = ProbabilisticEnsemble(17, 6, ensemble_size=2, num_elites=2, hidden=(16,), predict_reward=False)
    policy = GaussianMLPPolicy(17, 6, hidden=(8,), init_log_std=1.0)
    params = tree.params_of(policy, detach=True)
    start_states = torch.randn(5, 17).expand(2, -1, -1)
    box = (torch.full((17,), -0.5), torch.full((17,), 0.5))

    def rollout(seed, **options):
        return imagine_models(ensemble, policy, params, start_states, 4, half_cheetah_reward, None, torch.zeros(17),
                              torch.ones(17), torch.Generator().manual_seed(seed), per_model=False, **options)

    clipped = rollout(0, action_bounds=(-torch.ones(6), torch.ones(6)), state_bounds=box, model_noise=False)
    assert clipped.actions.abs().max() > 1
    assert clipped.next_obs.abs().max() <= 0.5
    applied = clipped.actions.clamp(-1, 1)
    torch.testing.assert_close(clipped.rewards, half_cheetah_reward(clipped.obs, applied, clipped.next_obs))
    mean_step = ensemble.predict_members(clipped.obs[0], applied[0], deterministic=True).next_obs.clamp(*box)
    torch.testing.assert_close(clipped.next_obs[0], mean_step)
    sampled = rollout(0)
    assert not torch.allclose(sampled.next_obs[0], ensemble.predict_members(
        sampled.obs[0], sampled.actions[0], deterministic=True).next_obs)


def test_policy_distribution_equals_functional_call_bitwise_and_under_vmap():
    generator = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    policy = GaussianMLPPolicy(5, 3, hidden=(7, 6), init_log_std=-0.3)
    params = tree.params_of(policy, detach=True)
    params = tree.map(lambda x: x + 0.1 * torch.randn(x.shape, generator=generator), params)
    obs = torch.randn(4, 9, 5, generator=generator)
    fast = policy_distribution(policy, params, obs)
    reference = functional_call(policy, params, (obs,))
    assert torch.equal(fast.mean, reference.mean) and torch.equal(fast.log_std, reference.log_std)
    per_model = tree.map(lambda x: x + 0.1 * torch.randn(3, *x.shape, generator=generator), params)

    def moments(fn):
        return vmap(lambda p, o: (lambda d: (d.mean, d.log_std))(fn(p, o)))(per_model, obs[:3])

    for fast_part, reference_part in zip(moments(lambda p, o: policy_distribution(policy, p, o)),
                                         moments(lambda p, o: functional_call(policy, p, (o,))), strict=True):
        assert torch.equal(fast_part, reference_part)


def meta_step_problem(alpha, generator):
    """A meta-step's data for 3 models: ``(meta_params, pre, post, inner, adapted, behaviour)``, ``adapted``
    the models' adapted parameters at ``meta_params`` and ``behaviour`` their policies on ``post``."""
    policy, meta_params = small_policy()
    pre, post = random_data(generator, models=3), random_data(generator, models=3)
    inner = InnerLoop(policy, lr=0.1, steps=1, penalty=AttentionPenalty(alpha, 1.0, 0.5, dt=0.05))
    adapted = tree.detach(adapt_models(meta_params, pre, inner))
    return meta_params, pre, post, inner, adapted, behaviour_of(policy, adapted, post)


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_line_search_objective_is_meta_objectives_in_one_pass(alpha):
    generator = torch.Generator().manual_seed(5)
    meta_params, pre, post, inner, _, behaviour = meta_step_problem(alpha, generator)
    meta_loss, meta_kl = meta_objectives(pre, post, behaviour, inner)
    moved = tree.map(lambda x: x + 0.05 * torch.randn(x.shape, generator=generator, dtype=x.dtype), meta_params)
    for params in (meta_params, moved):
        loss, kl = meta_loss_and_kl(pre, post, behaviour, inner)(params)
        assert torch.equal(loss, meta_loss(params)) and torch.equal(kl, meta_kl(params))
    assert float(meta_kl(moved)) > 0


@pytest.mark.parametrize("alpha", [0.0, 0.7])
def test_gauss_newton_fisher_products_and_meta_update_equal_the_exact_ones(alpha):
    """At theta_old, ``output_kl(outputs(theta))`` is the meta-KL, its Gauss-Newton products equal the meta-KL's
    Hessian-vector products (through the second-order penalised inner step) and the TRPO step agrees, in float64."""
    generator = torch.Generator().manual_seed(6)
    meta_params, pre, post, inner, adapted, behaviour = meta_step_problem(alpha, generator)
    _, meta_kl = meta_objectives(pre, post, behaviour, inner)
    outputs, output_kl = meta_kl_outputs(pre, post, behaviour, inner)
    moved = tree.map(lambda x: x + 0.05 * torch.randn(x.shape, generator=generator, dtype=x.dtype), meta_params)
    for params in (meta_params, moved):
        torch.testing.assert_close(output_kl(outputs(params)), meta_kl(params), rtol=1e-12, atol=0.0)
    exact = hessian_vector_operator(meta_kl, meta_params)
    gauss_newton = gauss_newton_vector_operator(outputs, output_kl, meta_params)
    for _ in range(2):
        v = tree.map(lambda x: torch.randn(x.shape, generator=generator, dtype=x.dtype), meta_params)
        torch.testing.assert_close(tree.ravel(gauss_newton(v))[0], tree.ravel(exact(v))[0], rtol=1e-9, atol=1e-12)
    options = {"max_kl": 1e-3, "cg_iters": 3, "damping": 1e-2}
    exact_step, exact_info = meta_update(meta_params, pre, post, adapted, inner, **options)
    step, info = meta_update(meta_params, pre, post, adapted, inner, "gauss-newton", **options)
    assert info.accepted and info.backtracks == exact_info.backtracks
    torch.testing.assert_close(tree.ravel(step)[0], tree.ravel(exact_step)[0], rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="fisher_product"):
        meta_update(meta_params, pre, post, adapted, inner, "diagonal", **options)
    with pytest.raises(ValueError, match=r"fisher_product.*diagonal"):
        MBMPOConfig(fisher_product="diagonal").validate()


def _evaluation(perturb, returns, seed=None, adaptation_lr=None):
    options = {"perturb": perturb, "episodes": 5, "adaptation_episodes": 5, "adaptation_steps": len(returns) - 1}
    options.update({k: v for k, v in (("seed", seed), ("adaptation_lr", adaptation_lr)) if v is not None})
    result = {"options": options, "adaptation_lr": adaptation_lr or 0.1}
    for k, value in enumerate(returns):
        result.update({f"return_{k}": value, f"samples_{k}": 1000.0 * k})
    return result


def test_the_chosen_step_is_the_best_in_distribution_and_the_curves_use_only_its_evaluations(tmp_path):
    """Selection reads only training-dynamics evaluations at the selection seed (mean return after the
    adapted rounds; the in-distribution return before adaptation and the other seeds do not count),
    and the out-of-distribution curves are those of seed 0 with the chosen step."""
    from bilevel.algorithms.mbmpo_analysis import (
        SELECTION_SEED,
        chosen_adaptation_lr,
        evaluation_curves,
        evaluations,
    )

    files = {
        "eval-select-lr0.1": _evaluation(None, [300.0, 900.0, 100.0, 100.0], SELECTION_SEED, 0.1),  # mean 366.7
        "eval-select-lr0.05": _evaluation(None, [300.0, 400.0, 500.0, 600.0], SELECTION_SEED, 0.05),  # mean 500
        "eval-select-lr0.02": _evaluation(None, [999.0, 350.0, 400.0, 450.0], SELECTION_SEED, 0.02),  # mean 400
        "eval-seed2-lr0.01": _evaluation(None, [300.0, 990.0, 990.0, 990.0], 2, 0.01),
        "eval-mass-seed1-lr0.01": _evaluation("mass", [300.0, 990.0, 990.0, 990.0], SELECTION_SEED, 0.01),
        "eval-None": _evaluation(None, [310.0, 320.0, 330.0, 340.0]),
        "eval-mass": _evaluation("mass", [200.0, 210.0, 220.0, 230.0]),
        "eval-lr0.05-None": _evaluation(None, [310.0, 420.0, 530.0, 640.0], adaptation_lr=0.05),
        "eval-lr0.05-mass": _evaluation("mass", [200.0, 300.0, 400.0, 500.0], adaptation_lr=0.05),
        "eval-lr0.02-mass": _evaluation("mass", [200.0, 250.0, 260.0, 270.0], adaptation_lr=0.02),
    }
    for name, result in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(result))
    assert chosen_adaptation_lr(evaluations(tmp_path)) == 0.05
    assert evaluation_curves(tmp_path) == {"none": ([0.0, 1000.0, 2000.0, 3000.0], [310.0, 420.0, 530.0, 640.0]),
                                           "mass": ([0.0, 1000.0, 2000.0, 3000.0], [200.0, 300.0, 400.0, 500.0])}
    assert evaluation_curves(tmp_path, None)["mass"][1] == [200.0, 210.0, 220.0, 230.0]
    assert evaluation_curves(tmp_path, 0.02) == {"mass": ([0.0, 1000.0, 2000.0, 3000.0], [200.0, 250.0, 260.0, 270.0])}
    for name in ("eval-select-lr0.1", "eval-select-lr0.02"):
        (tmp_path / f"{name}.json").unlink()
    assert chosen_adaptation_lr(evaluations(tmp_path)) is None, "one candidate is no choice"
    assert evaluation_curves(tmp_path)["mass"][1] == [200.0, 210.0, 220.0, 230.0]


def test_imagination_steps_the_elite_members_not_the_first_ones():
    """With elites ``[0, 2, 3]`` of 4 members, model ``m`` of the rollout steps with member ``elite_idx[m]``."""
    torch.manual_seed(2)
    ensemble = ProbabilisticEnsemble(4, 2, ensemble_size=4, num_elites=3, hidden=(16,), predict_reward=False)
    elites = torch.tensor([0, 2, 3])
    with torch.no_grad():
        ensemble.elite_idx.copy_(elites)
        ensemble.target_std.fill_(0.5)
    policy = GaussianMLPPolicy(4, 2, hidden=(8,), init_log_std=-1.0)
    params = tree.params_of(policy, detach=True)
    start_states = torch.randn(5, 4).expand(3, -1, -1)

    def reward_fn(obs, act, next_obs):
        return -(next_obs**2).sum(-1)

    out = imagine_models(ensemble, policy, params, start_states, 3, reward_fn, None, torch.zeros(4), torch.ones(4),
                         torch.Generator().manual_seed(0), per_model=False, model_noise=False)
    for t in range(3):
        expected = ensemble.predict_members(out.obs[t], out.actions[t], member_idx=elites, deterministic=True)
        torch.testing.assert_close(out.next_obs[t], expected.next_obs)
    first_members = ensemble.predict_members(out.obs[0], out.actions[0], member_idx=torch.arange(3),
                                             deterministic=True).next_obs
    assert (first_members[1:] - out.next_obs[0, 1:]).abs().max() > 1e-2
