import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal, kl_divergence
from torch.func import functional_call, grad, jacrev, vmap

from bilevel.nets import DiagGaussian, GaussianMLPPolicy, TabularSoftmaxPolicy, gaussian_kl, mean_action_fn
from bilevel.tree import params_of

SETTINGS = settings(max_examples=25, deadline=None)


def _policy(obs_dim: int, act_dim: int, seed: int, init_log_std: float = 0.0) -> GaussianMLPPolicy:
    torch.manual_seed(seed)
    return GaussianMLPPolicy(obs_dim, act_dim, hidden=(16, 16), init_log_std=init_log_std).double()


@SETTINGS
@given(
    obs_dim=st.integers(1, 5),
    act_dim=st.integers(1, 4),
    batch=st.integers(1, 6),
    init_log_std=st.floats(-2.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_log_prob_and_entropy_match_torch_normal(obs_dim, act_dim, batch, init_log_std, seed):
    policy = _policy(obs_dim, act_dim, seed, init_log_std)
    obs = torch.randn(batch, obs_dim, dtype=torch.float64)
    actions = torch.randn(batch, act_dim, dtype=torch.float64)
    reference = Independent(Normal(policy.mean_net(obs), torch.exp(policy.log_std)), 1)
    dist = policy(obs)
    assert dist.batch_shape == (batch,) and dist.event_shape == (act_dim,)
    torch.testing.assert_close(dist.log_prob(actions), reference.log_prob(actions))
    torch.testing.assert_close(dist.entropy(), reference.entropy())


@SETTINGS
@given(shape=st.tuples(st.integers(1, 4), st.integers(1, 5)), seed=st.integers(0, 2**16))
def test_gaussian_kl_matches_torch(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    mean0, mean1, log_std0, log_std1 = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(4))
    reference = kl_divergence(Normal(mean0, log_std0.exp()), Normal(mean1, log_std1.exp())).sum(-1)
    torch.testing.assert_close(gaussian_kl(mean0, log_std0, mean1, log_std1), reference)
    kl_dispatched = kl_divergence(DiagGaussian(mean0, log_std0), DiagGaussian(mean1, log_std1))
    torch.testing.assert_close(kl_dispatched, reference)
    assert torch.all(reference >= -1e-12)


def test_kl_to_itself_is_zero_with_zero_gradient():
    policy = _policy(4, 3, seed=0, init_log_std=-0.5)
    obs = torch.randn(32, 4, dtype=torch.float64)
    old_params = params_of(policy, detach=True)
    old_dist = functional_call(policy, old_params, (obs,))

    def mean_kl(params):
        return kl_divergence(old_dist, functional_call(policy, params, (obs,))).mean()

    assert mean_kl(old_params).abs() < 1e-14
    gradient = grad(mean_kl)(old_params)
    for name, value in gradient.items():
        assert value.abs().max() < 1e-12, name
    moved = {k: v + 0.05 for k, v in old_params.items()}
    assert mean_kl(moved) > 1e-4


def test_mean_action_jacobian_under_vmap_matches_autograd():
    policy = _policy(3, 2, seed=1)
    params = params_of(policy, detach=True)
    obs = torch.randn(7, 3, dtype=torch.float64)
    mean_action = mean_action_fn(policy)
    jacobians = vmap(jacrev(mean_action, argnums=1), in_dims=(None, 0))(params, obs)
    assert jacobians.shape == (7, 2, 3)
    for i in range(7):
        expected = torch.autograd.functional.jacobian(policy.mean_net, obs[i])
        torch.testing.assert_close(jacobians[i], expected)


def test_vmap_over_parameter_batch_equals_loop():
    policy = _policy(3, 2, seed=2)
    params = params_of(policy, detach=True)
    tasks = {k: torch.stack([v + 0.1 * i for i in range(4)]) for k, v in params.items()}
    obs = torch.randn(5, 3, dtype=torch.float64)
    actions = torch.randn(5, 2, dtype=torch.float64)

    def log_prob(p):
        return functional_call(policy, p, (obs,)).log_prob(actions)

    batched = vmap(log_prob)(tasks)
    looped = torch.stack([log_prob({k: v[i] for k, v in tasks.items()}) for i in range(4)])
    torch.testing.assert_close(batched, looped)


def test_sampling_is_reproducible_and_has_the_right_moments():
    policy = _policy(2, 3, seed=3, init_log_std=math.log(0.5))
    dist = policy(torch.zeros(1, 2, dtype=torch.float64))
    first = dist.sample((20000,), generator=torch.Generator().manual_seed(7))
    second = dist.sample((20000,), generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    assert not first.requires_grad
    torch.testing.assert_close(first.mean(0), dist.mean, atol=0.02, rtol=0)
    torch.testing.assert_close(first.std(0), torch.full((1, 3), 0.5, dtype=torch.float64), atol=0.02, rtol=0)
    assert dist.rsample(generator=torch.Generator().manual_seed(0)).requires_grad


def test_tabular_policy_distribution_and_gradient():
    policy = TabularSoftmaxPolicy(5, 3)
    with torch.no_grad():
        policy.logits.copy_(torch.randn(5, 3))
    probs = policy.probs()
    torch.testing.assert_close(probs.sum(-1), torch.ones(5))
    torch.testing.assert_close(policy.log_probs(), probs.log())
    states = torch.tensor([4, 0, 4])
    torch.testing.assert_close(policy(states).probs, probs[states])
    torch.testing.assert_close(policy().logits, policy.log_probs())
    params = params_of(policy, detach=True)
    actions = torch.tensor([2, 1, 0])
    gradient = grad(lambda p: functional_call(policy, p, (states,)).log_prob(actions).sum())(params)["logits"]
    expected = torch.zeros(5, 3)
    for s, a in zip(states.tolist(), actions.tolist(), strict=True):
        expected[s] += torch.nn.functional.one_hot(torch.tensor(a), 3) - probs[s].detach()
    torch.testing.assert_close(gradient, expected)


def test_bad_arguments_raise_value_errors_naming_them():
    policy = GaussianMLPPolicy(3, 2)
    with pytest.raises(ValueError, match="`obs`"):
        policy(torch.zeros(4, 5))
    with pytest.raises(ValueError, match="`act_dim`"):
        GaussianMLPPolicy(3, 0)
    with pytest.raises(ValueError, match="`num_actions`"):
        TabularSoftmaxPolicy(4, 0)
    with pytest.raises(ValueError, match=r"`num_states`.*2.5"):
        TabularSoftmaxPolicy(2.5, 4)
    with pytest.raises(ValueError, match=r"layer size.*got 0"):
        GaussianMLPPolicy(3, 2, hidden=(0,))
    with pytest.raises(ValueError, match=r"`init_log_std`.*nan"):
        GaussianMLPPolicy(3, 2, init_log_std=float("nan"))


def test_diag_gaussian_expands_like_a_torch_distribution():
    mean, log_std = torch.randn(5, 3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expanded = DiagGaussian(mean, log_std).expand((2, 5))
    assert expanded.batch_shape == (2, 5) and expanded.event_shape == (3,)
    value = torch.randn(2, 5, 3, dtype=torch.float64)
    reference = Independent(Normal(mean.expand(2, 5, 3), log_std.exp().expand(2, 5, 3)), 1)
    torch.testing.assert_close(expanded.log_prob(value), reference.log_prob(value), rtol=1e-12, atol=0)
