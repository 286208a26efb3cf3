"""`trpo_step` on small random Gaussian policies, with and without an inner adaptation."""

import hypothesis.strategies as st
import pytest
import torch
import torchopt
from hypothesis import given, settings
from torch.distributions import Normal, kl_divergence

from bilevel import tree, trpo_step, unroll

DTYPE = torch.float64
OBS, ACT, N = 3, 2, 64


def gaussian_policy_problem(seed: int, inner_steps: int = 0, *, outputs: bool = False):
    """A linear-Gaussian policy a ~ N(W s + c, exp(log_std)); the loss is the
    importance-weighted surrogate, optionally after `inner_steps` policy-gradient
    steps on a second batch (MAML-TRPO). With ``outputs`` also the Gauss-Newton pair:
    ``outputs_fn(p) = (mean [N, ACT], std [ACT])`` and the KL as a function of them."""
    g = torch.Generator().manual_seed(seed)
    params = {"W": 0.3 * torch.randn(ACT, OBS, generator=g, dtype=DTYPE),
              "c": torch.zeros(ACT, dtype=DTYPE),
              "log_std": -0.5 * torch.ones(ACT, dtype=DTYPE)}
    obs, inner_obs = (torch.randn(N, OBS, generator=g, dtype=DTYPE) for _ in range(2))
    actions, inner_actions = (torch.randn(N, ACT, generator=g, dtype=DTYPE) for _ in range(2))
    advantages, inner_advantages = (torch.randn(N, generator=g, dtype=DTYPE) for _ in range(2))

    def dist(p, states):
        return Normal(states @ p["W"].T + p["c"], p["log_std"].exp())

    def adapt(p):
        def pg_loss(q):
            return -(dist(q, inner_obs).log_prob(inner_actions).sum(-1) * inner_advantages).mean()
        return unroll(pg_loss, p, torchopt.sgd(0.1), inner_steps)

    old = dist(adapt(params), obs)
    old_log_prob = old.log_prob(actions).sum(-1).detach()
    old_detached = Normal(old.loc.detach(), old.scale.detach())

    def loss_fn(p):
        ratio = torch.exp(dist(adapt(p), obs).log_prob(actions).sum(-1) - old_log_prob)
        return -(ratio * advantages).mean()

    def kl_fn(p):
        return kl_divergence(old_detached, dist(adapt(p), obs)).sum(-1).mean()

    if not outputs:
        return params, loss_fn, kl_fn

    def outputs_fn(p):
        new = dist(adapt(p), obs)
        return new.loc, new.scale

    def output_kl_fn(y):
        return kl_divergence(old_detached, Normal(*y)).sum(-1).mean()

    return params, loss_fn, kl_fn, outputs_fn, output_kl_fn


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), max_kl=st.sampled_from([1e-3, 1e-2, 5e-2]))
def test_accepted_step_respects_the_trust_region(seed, max_kl):
    params, loss_fn, kl_fn = gaussian_policy_problem(seed)
    new_params, info = trpo_step(loss_fn, kl_fn, params, max_kl=max_kl)
    assert info.accepted
    assert float(kl_fn(new_params)) <= max_kl
    assert float(loss_fn(new_params)) < float(loss_fn(params))
    assert info.loss_after == pytest.approx(float(loss_fn(new_params)))


@pytest.mark.parametrize("hvp_mode", ["reverse-over-reverse", "forward-over-reverse", "gauss-newton"])
@pytest.mark.parametrize("inner_steps", [0, 1], ids=["trpo", "maml-trpo"])
def test_direction_is_the_natural_gradient(inner_steps, hvp_mode):
    params, loss_fn, kl_fn, outputs_fn, output_kl_fn = gaussian_policy_problem(11, inner_steps, outputs=True)
    fisher_options = {"outputs_fn": outputs_fn, "output_kl_fn": output_kl_fn} if hvp_mode == "gauss-newton" else {}
    flat, unravel = tree.ravel(params)
    fisher = torch.func.hessian(lambda x: kl_fn(unravel(x)))(flat)
    gradient = torch.func.grad(lambda x: loss_fn(unravel(x)))(flat)
    natural = torch.linalg.solve(fisher, gradient)
    max_kl = 1e-3
    new_params, info = trpo_step(loss_fn, kl_fn, params, max_kl=max_kl, cg_iters=40, damping=0.0, hvp_mode=hvp_mode,
                                 **fisher_options)
    assert info.accepted
    step = flat - tree.ravel(new_params)[0]
    expected = info.step_fraction * torch.sqrt(2 * max_kl / (gradient @ natural)) * natural
    torch.testing.assert_close(step, expected, rtol=1e-7, atol=1e-12)
    full_step_decrease = float(torch.sqrt(2 * max_kl / (gradient @ natural)) * (gradient @ natural))
    assert info.expected_improvement == pytest.approx(full_step_decrease, rel=1e-7)
    assert info.expected_improvement == pytest.approx(float(gradient @ step) / info.step_fraction, rel=1e-7)


def test_step_that_cannot_improve_leaves_parameters_unchanged():
    params, _, kl_fn = gaussian_policy_problem(3)
    anchor = tree.detach(params)

    def loss_fn(p):
        displacement = tree.sub(p, anchor)
        return -1e-6 * tree.ravel(displacement)[0].sum() + 1e6 * tree.dot(displacement, displacement)

    new_params, info = trpo_step(loss_fn, kl_fn, params, max_kl=0.01)
    assert not info.accepted
    assert info.backtracks == 15
    for new, old in zip(tree.leaves(new_params), tree.leaves(params), strict=True):
        assert torch.equal(new, old)


def test_bad_arguments_are_named():
    params, loss_fn, kl_fn = gaussian_policy_problem(0)
    for name, value in [("max_kl", 0.0), ("cg_iters", 0), ("damping", -1.0), ("backtrack_ratio", 1.0),
                        ("max_backtracks", 0)]:
        with pytest.raises(ValueError, match=name):
            trpo_step(loss_fn, kl_fn, params, **{name: value})
    with pytest.raises(ValueError, match="loss_fn"):
        trpo_step(lambda p: p["c"] * 2, kl_fn, params)
    with pytest.raises(ValueError, match=r"hvp_mode.*'fast'"):
        trpo_step(loss_fn, kl_fn, params, hvp_mode="fast")
    with pytest.raises(ValueError, match="outputs_fn"):
        trpo_step(loss_fn, kl_fn, params, hvp_mode="gauss-newton", output_kl_fn=kl_fn)
    with pytest.raises(ValueError, match="output_kl_fn"):
        trpo_step(loss_fn, kl_fn, params, hvp_mode="gauss-newton", outputs_fn=lambda p: p)
    with pytest.raises(ValueError, match=r"outputs_fn.*reverse-over-reverse"):
        trpo_step(loss_fn, kl_fn, params, outputs_fn=lambda p: p)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), inner_steps=st.sampled_from([0, 1]))
def test_gauss_newton_step_equals_the_exact_step(seed, inner_steps):
    """The whole step (direction, scale, line search) with Gauss-Newton Fisher products equals the exact one in
    float64, with and without an inner adaptation."""
    params, loss_fn, kl_fn, outputs_fn, output_kl_fn = gaussian_policy_problem(seed, inner_steps, outputs=True)
    exact, exact_info = trpo_step(loss_fn, kl_fn, params, max_kl=0.01)
    gauss_newton, info = trpo_step(loss_fn, kl_fn, params, max_kl=0.01, hvp_mode="gauss-newton",
                                   outputs_fn=outputs_fn, output_kl_fn=output_kl_fn)
    assert info.accepted == exact_info.accepted and info.backtracks == exact_info.backtracks
    torch.testing.assert_close(tree.ravel(gauss_newton)[0], tree.ravel(exact)[0], rtol=1e-9, atol=1e-12)
    assert info.loss_after == pytest.approx(exact_info.loss_after, rel=1e-9, abs=1e-14)


def test_settings_give_trpo_step_keywords_and_name_a_bad_value():
    import inspect

    from bilevel.trpo import TRPOSettings

    options = TRPOSettings(max_kl=0.02, cg_iters=7, cg_damping=0.3, ls_backtracks=4, ls_ratio=0.5).trpo_options()
    assert set(options) <= set(inspect.signature(trpo_step).parameters)
    assert options == {"max_kl": 0.02, "cg_iters": 7, "damping": 0.3, "backtrack_ratio": 0.5, "max_backtracks": 4}
    for bad, name in [({"max_kl": 0.0}, "max_kl"), ({"ls_ratio": 1.0}, "ls_ratio"),
                      ({"cg_iters": 0}, "cg_iters"), ({"cg_damping": -1.0}, "cg_damping")]:
        with pytest.raises(ValueError, match=name):
            TRPOSettings(**bad).validate()


def test_a_joint_line_search_objective_gives_the_same_step_and_replaces_the_separate_calls():
    params, loss_fn, kl_fn = gaussian_policy_problem(3, inner_steps=1)
    calls = {"loss": 0, "kl": 0, "joint": 0}

    def counted(name, fn):
        def wrapped(p):
            calls[name] += 1
            return fn(p)
        return wrapped

    def joint(p):
        calls["joint"] += 1
        return loss_fn(p), kl_fn(p)

    separate, separate_info = trpo_step(loss_fn, kl_fn, params, max_kl=0.01, backtrack_ratio=0.5)
    shared, shared_info = trpo_step(counted("loss", loss_fn), counted("kl", kl_fn), params, max_kl=0.01,
                                    backtrack_ratio=0.5, loss_and_kl_fn=joint)
    for name in params:
        assert torch.equal(separate[name], shared[name])
    assert separate_info == shared_info
    assert calls["joint"] == shared_info.backtracks + 1 and calls["loss"] == 1 and calls["kl"] == 1
