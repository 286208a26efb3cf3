"""Neural BO-MRL: the implicit hypergradient against finite differences and a differentiated unroll,
the adaptation's ascent, and runs from the CLI with resume."""

import functools
import itertools
import json
import warnings

import pytest
import torch
from torch.distributions import Independent, Normal, kl_divergence
from torch.func import vmap

from bilevel import cli, tree
from bilevel.algorithms import bomrl_neural
from bilevel.algorithms.bomrl_neural import (
    IMPLICIT_SOLVERS,
    Adaptation,
    AdaptationBatch,
    BOMRLNeural,
    adapt_tasks,
    adaptation_batches,
    adaptation_loss,
    adaptation_residual,
    distance,
    hypergradients,
    implicit_adaptation,
    lower_bound_gain,
    soft_clip,
    solve_adaptation,
)
from bilevel.implicit import LinearSolveWarning
from bilevel.nets import GaussianMLPPolicy
from bilevel.rl import importance_weighted_loss, reinforce_loss
from bilevel.rl.meta_batches import TaskData, action_distribution, task_data
from bilevel.runs import RunFolder
from bilevel.runs.loop import load_learner, make_config

DTYPE = torch.float64
STEPS, EPISODES, OBS_DIM, ACT_DIM = 6, 4, 2, 2
CONVERGED = {"lam": 5.0, "lr": 0.03, "steps": 100}
NEWTON_STEPS = 6
TINY_NAVIGATION = {
    "env": "navigation-2d",
    "meta_batch_size": 2,
    "episodes_per_task": 2,
    "horizon": 10,
    "hidden": (8,),
    "adapt_steps": 3,
    "device": "cpu",
}


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_policy() -> tuple[torch.nn.Module, dict]:
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(OBS_DIM, ACT_DIM, hidden=()).to(DTYPE)
    return policy, tree.detach(tree.params_of(policy))


def synthetic_batch(policy: torch.nn.Module, params: dict, generator: torch.Generator) -> AdaptationBatch:
    """Ragged episodes with random states, actions and advantages, collected (log-probs) by ``params``."""
    lengths = torch.randint(2, STEPS + 1, (1, EPISODES), generator=generator)
    weights = (torch.arange(STEPS)[:, None] < lengths).to(DTYPE)
    obs = torch.randn(STEPS, EPISODES, OBS_DIM, generator=generator, dtype=DTYPE)
    actions = torch.randn(STEPS, EPISODES, ACT_DIM, generator=generator, dtype=DTYPE)
    advantages = torch.randn(STEPS, EPISODES, generator=generator, dtype=DTYPE) * weights
    with torch.no_grad():
        log_probs = action_distribution(policy, params, obs).log_prob(actions)
    return AdaptationBatch(obs, actions, advantages, weights, log_probs)


def outer_loss(policy: torch.nn.Module, fresh: AdaptationBatch):
    """A fixed importance-weighted surrogate on another batch, standing in for ``-J(theta)``."""

    def loss(params: dict) -> torch.Tensor:
        log_probs = action_distribution(policy, params, fresh.obs).log_prob(fresh.actions)
        return importance_weighted_loss(log_probs, fresh.log_probs, fresh.advantages, fresh.weights)

    return loss


def converged_solver(init: dict, meta_params: dict, batch: AdaptationBatch, adaptation: Adaptation) -> dict:
    """The module's Adam adaptation, then Newton steps on the 8 parameters: a stationary point to
    rounding (the hypergradient assumes one; Adam alone stalls near 1e-10 on these batches)."""
    flat, unravel = tree.ravel(solve_adaptation(init, meta_params, batch, adaptation))

    def objective(x: torch.Tensor) -> torch.Tensor:
        return adaptation_loss(unravel(x), meta_params, batch, adaptation)

    for _ in range(NEWTON_STEPS):
        flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), torch.func.grad(objective)(flat))
    return unravel(flat)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("distance", ["D1", "D2", "D3"])
def test_implicit_hypergradient_equals_finite_differences_of_the_converged_adaptation(distance):
    """Tolerance 1e-8 (measured: ~1e-10): central differences with eps = 1e-5 err by O(eps^2) relative,
    the solution's residual is ~1e-15 and CG is exact on 8 unknowns; dropping the adaptation's
    Jacobian (the plain outer gradient at theta*) errs by about 0.1."""
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(1)
    batch, fresh = synthetic_batch(policy, phi, generator), synthetic_batch(policy, phi, generator)
    adaptation = Adaptation(policy, distance, **CONVERGED)
    loss = outer_loss(policy, fresh)
    adapted = implicit_adaptation(batch, adaptation, converged_solver, max_iter=50, tol=1e-12, damping=0.0)

    theta = adapted(phi)
    assert float(tree.norm(adaptation_residual(theta, phi, batch, adaptation))) < 1e-12
    implicit, _ = tree.ravel(torch.func.grad(lambda p: loss(adapted(p)))(phi))
    assert adapted.diagnostics.converged and adapted.diagnostics.calls == 1

    flat, unravel = tree.ravel(phi)
    eps = 1e-5
    shifts = torch.cat([torch.eye(len(flat), dtype=DTYPE), -torch.eye(len(flat), dtype=DTYPE)]) * eps

    def converged_outer(shift: torch.Tensor) -> torch.Tensor:
        shifted = unravel(flat + shift)
        return loss(converged_solver(shifted, shifted, batch, adaptation))

    with torch.no_grad():
        values = vmap(converged_outer)(shifts)
    finite_differences = (values[: len(flat)] - values[len(flat) :]) / (2 * eps)
    assert relative_error(implicit, finite_differences) < 1e-8

    without_adaptation_jacobian, _ = tree.ravel(torch.func.grad(loss)(theta))
    assert relative_error(without_adaptation_jacobian, finite_differences) > 1e-2


@pytest.mark.slow
def test_implicit_hypergradient_equals_the_differentiated_adam_unroll():
    """The module's own solver (Adam, no Newton): differentiating 300 unrolled Adam steps agrees with
    the implicit hypergradient at their end to 1e-4 (measured 5e-6; Adam's residual there is 6e-8)."""
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(1)
    batch, fresh = synthetic_batch(policy, phi, generator), synthetic_batch(policy, phi, generator)
    adaptation = Adaptation(policy, "D1", **{**CONVERGED, "steps": 300})
    loss = outer_loss(policy, fresh)
    adapted = implicit_adaptation(batch, adaptation, max_iter=50, tol=1e-12, damping=0.0)
    implicit, _ = tree.ravel(torch.func.grad(lambda p: loss(adapted(p)))(phi))
    unrolled, _ = tree.ravel(torch.func.grad(lambda p: loss(solve_adaptation(p, p, batch, adaptation)))(phi))
    assert relative_error(implicit, unrolled) < 1e-4


@pytest.mark.parametrize("distance", ["D1", "D2", "D3"])
def test_adaptation_never_lowers_the_regularised_objective(distance):
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(2)
    for lam, lr in ((0.5, 1e-3), (0.1, 1e-2)):
        batch = synthetic_batch(policy, phi, generator)
        adaptation = Adaptation(policy, distance, lam, lr, steps=1)
        objective = functools.partial(adaptation_loss, meta_params=phi, batch=batch, adaptation=adaptation)
        params, start = phi, float(objective(phi))
        for _ in range(25):
            params = solve_adaptation(params, phi, batch, adaptation)
            assert float(objective(params)) <= start


def test_batched_adaptation_equals_the_implicit_forward_per_task():
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(3)
    batches = [synthetic_batch(policy, phi, generator) for _ in range(3)]
    adaptation = Adaptation(policy, "D1", 0.5, 1e-2, steps=20)
    stacked = AdaptationBatch(*(torch.stack(fields) for fields in zip(*batches, strict=True)))
    batched = adapt_tasks(phi, stacked, adaptation)
    for task, batch in enumerate(batches):
        looped = implicit_adaptation(batch, adaptation)(phi)
        for name in phi:
            torch.testing.assert_close(batched[name][task], looped[name], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solve", IMPLICIT_SOLVERS)
def test_vmapped_hypergradients_equal_the_per_task_pullbacks(solve):
    """`hypergradients` (one vmap over tasks) against `implicit_adaptation`'s pullback task by task, the
    path the training step took before: the same numbers to rounding, solves cut short (4 iterations,
    unconverged) included, and the same residuals."""
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(4)
    batches = [synthetic_batch(policy, phi, generator) for _ in range(3)]
    adaptation = Adaptation(policy, "D1", 0.5, 1e-2, steps=20, clip=0.2)
    stacked = AdaptationBatch(*(torch.stack(fields) for fields in zip(*batches, strict=True)))
    adapted = adapt_tasks(phi, stacked, adaptation)
    cotangents = tree.map(lambda leaf: torch.randn(leaf.shape, generator=generator, dtype=DTYPE), adapted)
    options = {"max_iter": 4, "tol": 1e-12, "damping": 1e-2}
    batched, info = hypergradients(phi, adapted, stacked, cotangents, adaptation, solve=solve, **options)
    for task, batch in enumerate(batches):
        solver = implicit_adaptation(batch, adaptation, solve=solve, **options)
        theta, pullback = torch.func.vjp(solver, phi)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", LinearSolveWarning)
            (looped,) = pullback(tree.map(lambda leaf, task=task: leaf[task], cotangents))
        for name in phi:
            torch.testing.assert_close(theta[name], adapted[name][task], rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(batched[name][task], looped[name], rtol=1e-10, atol=1e-12)
        assert float(info.residual_norm[task]) == pytest.approx(solver.diagnostics.residual_norm, rel=1e-10)
        assert not bool(info.converged[task])


def test_newton_adaptation_reaches_a_stationary_point_and_never_lowers_the_objective():
    """Newton-CG (CG exact on the 8 unknowns) drives the optimality residual from ~1e-1 to below 1e-10,
    where 100 Adam steps leave it above 1e-4; every prefix of its iterations has a lower loss."""
    policy, phi = linear_policy()
    batch = synthetic_batch(policy, phi, torch.Generator().manual_seed(1))
    newton = Adaptation(policy, "D1", CONVERGED["lam"], 0.0, 12, solver="newton", cg_iters=20, tol=1e-12)
    adam = Adaptation(policy, "D1", **CONVERGED)
    residual = functools.partial(adaptation_residual, meta_params=phi, batch=batch, adaptation=newton)
    assert float(tree.norm(residual(phi))) > 1e-2
    assert float(tree.norm(residual(solve_adaptation(phi, phi, batch, adam)))) > 1e-4
    assert float(tree.norm(residual(solve_adaptation(phi, phi, batch, newton)))) < 1e-10
    losses = [
        float(adaptation_loss(solve_adaptation(phi, phi, batch, newton._replace(steps=k)), phi, batch, newton))
        for k in range(8)
    ]
    assert all(later <= earlier for earlier, later in itertools.pairwise(losses))
    stacked = AdaptationBatch(*(torch.stack([field, field]) for field in batch))
    batched = adapt_tasks(phi, stacked, newton._replace(steps=4))
    looped = solve_adaptation(phi, phi, batch, newton._replace(steps=4))
    for name in phi:
        torch.testing.assert_close(batched[name][1], looped[name], rtol=1e-8, atol=1e-10)


def test_soft_clip_is_a_smooth_pessimistic_bounded_ratio():
    ratios = torch.linspace(0.0, 5.0, 201, dtype=DTYPE)[:, None]
    advantages = torch.tensor([[-2.0, -0.5, 0.5, 3.0]], dtype=DTYPE)
    clipped = soft_clip(ratios, advantages, 0.2) * advantages
    assert (clipped <= ratios * advantages + 1e-12).all()
    assert (clipped <= 1.2 * advantages.clamp_min(0)).all()
    ppo = torch.minimum(ratios * advantages, ratios.clamp(0.8, 1.2) * advantages)
    assert (clipped <= ppo + 1e-12).all()
    near_one = torch.tensor([0.999, 1.0, 1.001], dtype=DTYPE, requires_grad=True)
    (slope,) = torch.autograd.grad(soft_clip(near_one, torch.ones(3, dtype=DTYPE), 0.2).sum(), near_one)
    torch.testing.assert_close(slope, torch.ones(3, dtype=DTYPE), rtol=0, atol=1e-4)


@pytest.mark.parametrize("solver", ["adam", "newton"])
def test_clipped_bound_and_trust_region_keep_the_adaptation_close(solver):
    """lambda 0.02 with a large learning rate: the unclipped ratio runs away (D1 > 1); the clipped bound
    keeps lambda D1 <= (1 + eps) mean(A+) and a trust region keeps D1 <= max_distance, the regularised
    objective never below its start."""
    policy, phi = linear_policy()
    batch = synthetic_batch(policy, phi, torch.Generator().manual_seed(5))
    lr = 0.3 if solver == "adam" else 0.0
    free = Adaptation(policy, "D1", 0.02, lr, 40, solver=solver, cg_iters=20)
    reached = functools.partial(distance, meta_params=phi, batch=batch, policy=policy, kind="D1")
    assert float(reached(solve_adaptation(phi, phi, batch, free))) > 1.0
    clipped = free._replace(clip=0.2)
    bound = 1.2 * float((batch.advantages.clamp_min(0) * batch.weights).sum() / batch.weights.sum()) / 0.02
    assert float(reached(solve_adaptation(phi, phi, batch, clipped))) <= bound
    for adaptation in (free._replace(max_distance=0.05), clipped._replace(max_distance=0.05)):
        theta = solve_adaptation(phi, phi, batch, adaptation)
        assert float(reached(theta)) <= 0.05
        assert float(adaptation_loss(theta, phi, batch, adaptation)) <= float(
            adaptation_loss(phi, phi, batch, adaptation)
        )
    assert float(lower_bound_gain(phi, batch, policy, 0.2)) == pytest.approx(
        float(lower_bound_gain(phi, batch, policy))
    )


def cli_options(values: dict) -> list[str]:
    return [
        token
        for key, value in values.items()
        for token in ("--" + key.replace("_", "-"), *map(str, value if isinstance(value, tuple) else (value,)))
    ]


def test_cli_train_resume_equals_straight_run_and_eval(tmp_path):
    base = ["train", "bomrl-neural", *cli_options(TINY_NAVIGATION), "--no-progress", "--checkpoint-every", "1"]
    assert cli.main([*base, "--iterations", "2", "--run-dir", str(tmp_path / "straight")]) == 0
    assert cli.main([*base, "--iterations", "1", "--run-dir", str(tmp_path / "resumed")]) == 0
    assert (
        cli.main(["train", "bomrl-neural", "--resume", str(tmp_path / "resumed"), "--iterations", "2", "--no-progress"])
        == 0
    )

    _, straight = load_learner(tmp_path / "straight")
    _, resumed = load_learner(tmp_path / "resumed")
    assert resumed.iteration == straight.iteration == 2
    assert straight.env_steps == 2 * 2 * 2 * 2 * 10
    for name in straight.meta_params:
        assert torch.equal(straight.meta_params[name], resumed.meta_params[name])
    rows = RunFolder(tmp_path / "resumed").read_metrics()
    assert [row["return_after"] for row in rows] == [
        row["return_after"] for row in RunFolder(tmp_path / "straight").read_metrics()
    ]
    expected = {
        "return_before",
        "hypergradient_norm",
        "adaptation_gain",
        "implicit_cg_residual",
        "implicit_cg_converged",
        "implicit_residual_relative",
        "trpo_kl",
        "trpo_accepted",
    }
    assert expected <= set(rows[0])
    assert all(row["trpo_accepted"] == 1.0 and row["adaptation_gain_min"] >= 0 for row in rows)

    assert cli.main(["eval", str(tmp_path / "straight"), "--tasks", "2", "--adaptation-steps", "4"]) == 0
    result = json.loads((tmp_path / "straight" / "eval.json").read_text())
    assert result["tasks"] == 2 and result["adaptation_steps"] == 4 and result["horizon"] == 10
    for key in ("before", "after"):
        assert -10 * 1.5 < result[f"return_{key}_deterministic"] < 0
        assert result[f"return_{key}_stochastic"] != result[f"return_{key}_deterministic"]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"distance": "D4"}, "distance"),
        ({"lam": 0.0}, "lam"),
        ({"adapt_steps": 0}, "adapt_steps"),
        ({"adapt_solver": "lbfgs"}, "lbfgs"),
        ({"adapt_clip": 1.5}, "adapt_clip"),
        ({"adapt_max_distance": -1.0}, "adapt_max_distance"),
        ({"implicit_damping": -1.0}, "implicit_damping"),
        ({"implicit_solver": "gmres"}, "gmres"),
        ({"env": "frozenlake-hole"}, "frozenlake-hole"),
    ],
)
def test_bad_config_raises_value_error_naming_it(override, message):
    with pytest.raises(ValueError, match=message):
        make_config("bomrl-neural", {**TINY_NAVIGATION, **override})


def moved(params: dict, generator: torch.Generator, scale: float = 0.4) -> dict:
    """``params`` shifted by a random perturbation in every leaf (``log_std`` included: unequal stds)."""
    return {
        name: leaf + scale * torch.randn(leaf.shape, generator=generator, dtype=leaf.dtype)
        for name, leaf in params.items()
    }


def gaussian(policy: torch.nn.Module, params: dict, obs: torch.Tensor) -> Independent:
    """``pi_params(.|s)`` rebuilt as a `torch.distributions` diagonal Gaussian, independently of the module's KL."""
    distribution = action_distribution(policy, params, obs)
    return Independent(Normal(distribution.mean, distribution.log_std.exp()), 1)


def test_distances_are_the_kl_divergences_in_their_documented_directions():
    """D1 = mean_valid KL(pi_phi || pi_theta) and D2 = mean_valid KL(pi_theta || pi_phi) on ragged masks,
    against `torch.distributions.kl_divergence`; with unequal stds the two directions differ by far more
    than the tolerance, so a swap cannot pass. `adaptation_loss` carries the same distance."""
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(6)
    batch = synthetic_batch(policy, phi, generator)
    assert 0 < float(batch.weights.mean()) < 1
    theta = moved(phi, generator)
    meta, adapted = gaussian(policy, phi, batch.obs), gaussian(policy, theta, batch.obs)

    def mean_valid(values: torch.Tensor) -> torch.Tensor:
        return (values * batch.weights).sum() / batch.weights.sum()

    expected = {"D1": mean_valid(kl_divergence(meta, adapted)), "D2": mean_valid(kl_divergence(adapted, meta))}
    assert abs(float(expected["D1"] - expected["D2"])) > 0.1 * float(expected["D1"])
    gain = lower_bound_gain(theta, batch, policy)
    for kind, reference in expected.items():
        torch.testing.assert_close(distance(theta, phi, batch, policy, kind), reference, rtol=1e-12, atol=0)
        adaptation = Adaptation(policy, kind, 0.7, 1e-3, 1)
        torch.testing.assert_close(
            adaptation_loss(theta, phi, batch, adaptation), 0.7 * reference - gain, rtol=1e-12, atol=1e-14
        )


@pytest.mark.parametrize("clip", [0.0, 0.2])
def test_lower_bound_gain_at_theta_away_from_phi_is_the_documented_formula(clip):
    """``mean_valid[c(rho, A) A]`` with ``rho = pi_theta(a|s) / pi_phi(a|s)`` (``c`` the identity unclipped,
    the smooth pessimistic clip otherwise), written out by hand at theta != phi: an inverted ratio
    ``pi_phi / pi_theta`` differs there (at theta = phi both are 1)."""
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(7)
    batch = synthetic_batch(policy, phi, generator)
    theta = moved(phi, generator)
    rho = torch.exp(gaussian(policy, theta, batch.obs).log_prob(batch.actions) - batch.log_probs)
    assert float(((rho - 1).abs() * batch.weights).max()) > 0.5
    if clip:
        shifted = rho - 1
        optimistic = shifted * batch.advantages > 0
        assert optimistic[batch.weights > 0].any() and (~optimistic[batch.weights > 0]).any()
        rho = torch.where(optimistic, 1 + clip * torch.tanh(shifted / clip), rho)
    expected = (rho * batch.advantages * batch.weights).sum() / batch.weights.sum()
    torch.testing.assert_close(lower_bound_gain(theta, batch, policy, clip), expected, rtol=1e-12, atol=1e-14)


def test_adaptation_batches_weight_only_valid_steps():
    """`adaptation_batches` weights the valid steps 1 and the padding 0, so whatever lies in the padded steps
    (states, actions, advantages) leaves the adaptation loss unchanged."""
    policy, phi = linear_policy()
    generator = torch.Generator().manual_seed(8)
    tasks = [synthetic_batch(policy, phi, generator) for _ in range(2)]
    valid = torch.stack([batch.weights for batch in tasks]) > 0
    assert valid.any() and not valid.all()
    fields = ("obs", "actions", "advantages")
    data = TaskData(*(torch.stack([getattr(batch, name) for batch in tasks]) for name in fields), valid)
    pad = ~valid

    def garbage(field: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        noise = 5 + 3 * torch.randn(field.shape, generator=generator, dtype=field.dtype)
        return torch.where(mask.reshape(mask.shape + (1,) * (field.dim() - mask.dim())), noise, field)

    corrupted = TaskData(garbage(data.obs, pad), garbage(data.actions, pad), garbage(data.advantages, pad), valid)
    batches = adaptation_batches(policy, phi, data)
    torch.testing.assert_close(batches.weights, valid.to(DTYPE), rtol=0, atol=0)
    corrupted_batches = adaptation_batches(policy, phi, corrupted)
    theta = moved(phi, generator)
    for kind in ("D1", "D2"):
        adaptation = Adaptation(policy, kind, 0.5, 1e-3, 1, clip=0.2)
        for task in range(2):
            clean = AdaptationBatch(*(field[task] for field in batches))
            dirty = AdaptationBatch(*(field[task] for field in corrupted_batches))
            torch.testing.assert_close(
                adaptation_loss(theta, phi, dirty, adaptation),
                adaptation_loss(theta, phi, clean, adaptation),
                rtol=1e-12,
                atol=1e-14,
            )


STEP_CONFIG = {
    **TINY_NAVIGATION,
    "hidden": (3,),
    "distance": "D3",
    "lam": 2.0,
    "adapt_solver": "newton",
    "adapt_steps": 20,
    "adapt_cg_iters": 30,
    "implicit_cg_iters": 60,
    "implicit_damping": 0.0,
    "implicit_tol": 1e-12,
}


@pytest.fixture
def recorded_step(monkeypatch):
    """One real `BOMRLNeural.step` in float64 (the environment too) on tiny 2-D navigation: Newton
    adaptation on the strongly convex D3-regularised objective, an exact undamped hypergradient solve.
    Records the episodes it sampled (train: ``per_task=False``; fresh: ``per_task=True``), the batch
    `policy_gradient` and `meta_kl` received, and the gradient ``h`` of the linear loss handed to `trpo_step`."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    try:
        torch.manual_seed(0)
        learner = BOMRLNeural(make_config("bomrl-neural", STEP_CONFIG), torch.device("cpu"))
        record: dict = {"phi": tree.detach(learner.meta_params)}
        sample = learner.sample

        def recording_sample(tasks, params, generator, *, per_task, env_seed, episodes=None):
            result = sample(tasks, params, generator, per_task=per_task, env_seed=env_seed, episodes=episodes)
            record["fresh_episodes" if per_task else "train_episodes"] = result
            return result

        def spy(name, key):
            original = getattr(bomrl_neural, name)

            def wrapper(policy, params, data):
                record[key] = data
                return original(policy, params, data)

            monkeypatch.setattr(bomrl_neural, name, wrapper)

        def recording_trpo_step(loss_fn, kl_fn, params, **options):
            record["h"] = torch.func.grad(loss_fn)(tree.detach(params))
            return trpo_step(loss_fn, kl_fn, params, **options)

        trpo_step = bomrl_neural.trpo_step
        learner.sample = recording_sample
        spy("policy_gradient", "policy_gradient_data")
        spy("meta_kl", "meta_kl_data")
        monkeypatch.setattr(bomrl_neural, "trpo_step", recording_trpo_step)
        record["metrics"] = learner.step()
        record["learner"] = learner
        yield record
    finally:
        torch.set_default_dtype(previous)


def test_step_cotangent_is_the_policy_gradient_on_the_fresh_batch(recorded_step):
    """The hypergradient's right-hand side ``-grad J_i(theta*_i)`` is REINFORCE on D'_i, the episodes of
    the adapted policies, not on the collection D_i the adaptation used."""
    config = recorded_step["learner"].config
    fresh = task_data(recorded_step["fresh_episodes"], config.gamma, config.gae_lambda)
    train = recorded_step["train_episodes"]
    received = recorded_step["policy_gradient_data"]
    assert not torch.equal(fresh.obs, train.obs)
    for name in TaskData._fields:
        assert torch.equal(getattr(received, name), getattr(fresh, name)), name


def test_step_trust_region_kl_is_on_the_collection_states(recorded_step):
    """TRPO's mean KL(pi_phi_old || pi_phi) is measured on the states of D_i (the meta-policy's own
    collection), not on the fresh batch's."""
    config = recorded_step["learner"].config
    train = task_data(recorded_step["train_episodes"], config.gamma, config.gae_lambda)
    received = recorded_step["meta_kl_data"]
    assert not torch.equal(train.obs, recorded_step["fresh_episodes"].obs)
    assert torch.equal(received.obs, train.obs) and torch.equal(received.valid, train.valid)


def test_step_hypergradient_is_the_gradient_of_the_meta_loss(recorded_step):
    """The ``h`` the step hands to TRPO is the gradient of the meta-loss ``M(phi) = mean_i
    -J^REINFORCE_i(theta*_i(phi))`` on the frozen fresh batches, ``theta*_i`` the converged adaptation on
    the frozen collections: its directional derivatives (along ``h`` and two random directions) match
    central differences of ``M`` to 1e-3 ||h|| (measured: ~2e-5, the adaptation's Newton tolerance). A
    flipped sign makes the derivative along ``h`` -||h|| instead of +||h||."""
    learner, phi = recorded_step["learner"], recorded_step["phi"]
    config, policy = learner.config, learner.policy
    train = task_data(recorded_step["train_episodes"], config.gamma, config.gae_lambda)
    fresh = task_data(recorded_step["fresh_episodes"], config.gamma, config.gae_lambda)
    batches = adaptation_batches(policy, phi, train)
    adaptation = learner.adaptation()
    tasks = len(train.obs)
    flat, unravel = tree.ravel(phi)

    def converged(meta: dict, batch: AdaptationBatch) -> dict:
        theta, unravel_theta = tree.ravel(meta)

        def objective(x: torch.Tensor) -> torch.Tensor:
            return adaptation_loss(unravel_theta(x), meta, batch, adaptation)

        for _ in range(6):
            theta = theta - torch.linalg.solve(torch.func.hessian(objective)(theta), torch.func.grad(objective)(theta))
        assert float(torch.func.grad(objective)(theta).norm()) < 1e-10
        return unravel_theta(theta)

    def meta_loss(x: torch.Tensor) -> torch.Tensor:
        meta, losses = unravel(x), []
        for task in range(tasks):
            theta = converged(meta, AdaptationBatch(*(field[task] for field in batches)))
            log_probs = action_distribution(policy, theta, fresh.obs[task]).log_prob(fresh.actions[task])
            losses.append(reinforce_loss(log_probs, fresh.advantages[task], fresh.valid[task]))
        return torch.stack(losses).mean()

    h, _ = tree.ravel(recorded_step["h"])
    generator = torch.Generator().manual_seed(9)
    directions = torch.cat([(h / h.norm())[None], torch.randn(2, len(flat), generator=generator, dtype=DTYPE)])
    eps = 1e-5
    with torch.no_grad():
        finite_differences = torch.stack([
            (meta_loss(flat + eps * direction) - meta_loss(flat - eps * direction)) / (2 * eps)
            for direction in directions
        ])
    assert float(h.norm()) > 1e-2
    torch.testing.assert_close(directions @ h, finite_differences, rtol=0, atol=1e-3 * float(h.norm()))
