"""`minimum_attention` against finite differences and its own estimators."""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from bilevel import minimum_attention, tree

DTYPE = torch.float64


@pytest.fixture
def policy():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 3)).to(DTYPE)
    params = tree.detach(tree.params_of(net))
    return (lambda p, s: functional_call(net, p, (s,))), params


def finite_difference_jacobian(fn, state, eps=1e-6):
    columns = [(fn(state + eps * e) - fn(state - eps * e)) / (2 * eps) for e in torch.eye(len(state), dtype=DTYPE)]
    return torch.stack(columns, dim=-1)


def test_spatial_term_matches_finite_difference_jacobian(policy):
    policy_fn, params = policy
    states = torch.randn(5, 2, 4, dtype=DTYPE)
    terms = minimum_attention(policy_fn, params, states, dt=0.05, reduce=False)
    for t in range(5):
        for b in range(2):
            jac = finite_difference_jacobian(lambda s: policy_fn(params, s), states[t, b])
            assert float(terms.spatial[t, b]) == pytest.approx(float(jac.pow(2).sum()), rel=1e-8)


def test_temporal_term_and_weights(policy):
    policy_fn, params = policy
    states = torch.randn(6, 3, 4, dtype=DTYPE)
    dt = 0.02
    terms = minimum_attention(policy_fn, params, states, dt=dt, spatial_weight=0.5, temporal_weight=2.0)
    actions = policy_fn(params, states)
    expected = (((actions[1:] - actions[:-1]) / dt) ** 2).sum(-1).mean()
    torch.testing.assert_close(terms.temporal, expected)
    torch.testing.assert_close(terms.total, 0.5 * terms.spatial + 2.0 * terms.temporal)


def test_invalid_steps_break_the_temporal_chain(policy):
    policy_fn, params = policy
    states = torch.randn(4, 1, 4, dtype=DTYPE)
    valid = torch.tensor([[True], [True], [False], [True]])
    terms = minimum_attention(policy_fn, params, states, dt=1.0, valid=valid)
    actions = policy_fn(params, states)
    only_pair = ((actions[1] - actions[0]) ** 2).sum()
    torch.testing.assert_close(terms.temporal, only_pair)
    per_step = minimum_attention(policy_fn, params, states, dt=1.0, valid=valid, reduce=False)
    assert per_step.temporal.shape == (4, 1) and float(per_step.temporal[3, 0]) == 0.0


def test_invalid_steps_drop_out_of_the_spatial_term(policy):
    """The spatial term averages ``||da/ds||_F^2`` over the valid steps only (and is 0 at invalid ones per step);
    the invalid states are moved far out so that counting them would change the mean."""
    policy_fn, params = policy
    states = torch.randn(4, 2, 4, dtype=DTYPE)
    valid = torch.tensor([[True, False], [True, True], [False, True], [True, False]])
    states[~valid] = 0.3 * states[~valid] + 3.0
    jacobian_norms = torch.stack([torch.stack([
        finite_difference_jacobian(lambda s: policy_fn(params, s), states[t, b]).pow(2).sum() for b in range(2)])
        for t in range(4)])
    terms = minimum_attention(policy_fn, params, states, dt=0.1, valid=valid)
    assert float(terms.spatial) == pytest.approx(float(jacobian_norms[valid].mean()), rel=1e-8)
    assert abs(float(jacobian_norms[valid].mean()) - float(jacobian_norms.mean())) > 1e-3
    per_step = minimum_attention(policy_fn, params, states, dt=0.1, valid=valid, reduce=False)
    torch.testing.assert_close(per_step.spatial, torch.where(valid, jacobian_norms, 0.0), rtol=1e-8, atol=1e-10)


def test_hutchinson_is_unbiased(policy):
    policy_fn, params = policy
    states = torch.randn(3, 4, 4, dtype=DTYPE)
    exact = minimum_attention(policy_fn, params, states, dt=0.05, reduce=False).spatial
    generator = torch.Generator().manual_seed(1)
    samples = torch.stack([
        minimum_attention(policy_fn, params, states, dt=0.05, estimator="hutchinson", generator=generator,
                          reduce=False).spatial
        for _ in range(400)
    ])
    mean, stderr = samples.mean(0), samples.std(0) / 400**0.5
    assert ((mean - exact).abs() <= 4 * stderr + 1e-12).all()


def test_gradient_in_params_matches_finite_differences(policy):
    policy_fn, params = policy
    states = torch.randn(4, 2, 4, dtype=DTYPE)

    def penalty(flat):
        return minimum_attention(policy_fn, unravel(flat), states, dt=0.1).total

    flat, unravel = tree.ravel(params)
    grad = torch.func.grad(penalty)(flat)
    direction = torch.randn_like(flat)
    eps = 1e-6
    fd = (penalty(flat + eps * direction) - penalty(flat - eps * direction)) / (2 * eps)
    assert float(grad @ direction) == pytest.approx(float(fd), rel=1e-6)


def test_bad_arguments_are_named(policy):
    policy_fn, params = policy
    states = torch.randn(3, 4, dtype=DTYPE)
    with pytest.raises(ValueError, match="dt"):
        minimum_attention(policy_fn, params, states, dt=0.0)
    with pytest.raises(ValueError, match="estimator"):
        minimum_attention(policy_fn, params, states, dt=0.1, estimator="sampled")
    with pytest.raises(ValueError, match="valid"):
        minimum_attention(policy_fn, params, states, dt=0.1, valid=torch.ones(2, dtype=torch.bool))
    with pytest.raises(ValueError, match="float64"):
        minimum_attention(policy_fn, params, states, dt=0.1, valid=torch.ones(3, dtype=DTYPE))


def test_a_single_step_has_no_temporal_term(policy):
    """With ``T = 1`` there is no pair to difference: the temporal term is 0 (not the NaN of an empty mean),
    with or without a mask, and the total is the spatial term."""
    policy_fn, params = policy
    states = torch.randn(1, 4, dtype=DTYPE)
    for valid in (None, torch.ones(1, dtype=torch.bool)):
        terms = minimum_attention(policy_fn, params, states, dt=0.1, valid=valid)
        assert float(terms.temporal) == 0.0
        assert float(terms.total) == float(terms.spatial) > 0
