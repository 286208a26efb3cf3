import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributions import Independent, Normal
from torch.func import functional_call, grad, jacrev, vmap

from bilevel.nets import (
    DeterministicActor,
    QCritic,
    TanhGaussian,
    TanhGaussianActor,
    TwinQCritic,
    mean_action_fn,
    rescale_action,
    subtree,
    unscale_action,
)
from bilevel.tree import params_of

SETTINGS = settings(max_examples=25, deadline=None)


@SETTINGS
@given(act_dim=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_tanh_log_prob_is_the_change_of_variables_density(act_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(6, act_dim, generator=gen, dtype=torch.float64)
    log_std = torch.randn(6, act_dim, generator=gen, dtype=torch.float64).clamp(-2.0, 1.0)
    dist = TanhGaussian(mean, log_std)
    action, log_prob = dist.rsample_with_log_prob(generator=gen)
    pre_tanh = torch.atanh(action)
    base_log_prob = Independent(Normal(mean, log_std.exp()), 1).log_prob(pre_tanh)
    log_det = torch.stack([torch.linalg.slogdet(jacrev(torch.tanh)(u)).logabsdet for u in pre_tanh])
    torch.testing.assert_close(log_prob, base_log_prob - log_det)
    torch.testing.assert_close(dist.log_prob(action.clone()), log_prob)


def test_tanh_density_integrates_to_one():
    dist = TanhGaussian(torch.tensor([[0.7]], dtype=torch.float64), torch.tensor([[-0.3]], dtype=torch.float64))
    grid = torch.linspace(-1 + 1e-9, 1 - 1e-9, 200001, dtype=torch.float64).reshape(-1, 1, 1)
    density = dist.log_prob(grid).exp().squeeze()
    assert abs(torch.trapezoid(density, grid.squeeze()).item() - 1.0) < 1e-4


def test_tanh_log_prob_stays_finite_at_saturation():
    dist = TanhGaussian(torch.full((4, 2), 30.0), torch.zeros(4, 2))
    action, log_prob = dist.rsample_with_log_prob(generator=torch.Generator().manual_seed(0))
    assert torch.all(action.abs() <= 1.0) and torch.all(torch.isfinite(log_prob))


@pytest.mark.parametrize("actor_cls", [DeterministicActor, TanhGaussianActor])
def test_feature_scale_of_ones_is_the_identity(actor_cls):
    torch.manual_seed(0)
    actor = actor_cls(5, 3)
    obs = torch.randn(8, 5)
    plain = mean_action_fn(actor)(params_of(actor), obs)
    scaled = actor(obs, feature_scale=torch.ones(8, actor.feature_dim))
    scaled = scaled if isinstance(scaled, torch.Tensor) else scaled.mode
    torch.testing.assert_close(scaled, plain, rtol=0, atol=0)
    assert torch.all(plain.abs() <= 1.0)
    zeroed = actor(obs, feature_scale=torch.zeros(actor.feature_dim))
    zeroed = zeroed if isinstance(zeroed, torch.Tensor) else zeroed.mode
    head_bias = actor.head[0].bias if isinstance(actor.head, torch.nn.Sequential) else actor.head.bias[:3]
    torch.testing.assert_close(zeroed, torch.tanh(head_bias).expand(8, 3))


def test_log_std_is_clamped():
    actor = TanhGaussianActor(3, 2, hidden=(8, 8))
    with torch.no_grad():
        actor.head.bias.copy_(torch.tensor([0.0, 0.0, 50.0, -50.0]))
        actor.head.weight.zero_()
    dist = actor(torch.randn(4, 3))
    torch.testing.assert_close(dist.base_dist.log_std, torch.tensor([2.0, -5.0]).expand(4, 2))


def test_feature_scale_gradient_per_sample_under_vmap():
    torch.manual_seed(1)
    actor = DeterministicActor(4, 2, hidden=(16, 8))
    critic = QCritic(4, 2, hidden=(16, 8))
    params = params_of(actor, detach=True)
    obs = torch.randn(6, 4)
    scales = torch.rand(6, 8) * 2

    def q_of_scaled_action(scale, o):
        action = functional_call(actor, params, (o, scale))
        return critic(o, action)

    per_sample = vmap(grad(q_of_scaled_action))(scales, obs)
    assert per_sample.shape == (6, 8)
    for i in range(6):
        expected = grad(q_of_scaled_action)(scales[i], obs[i])
        torch.testing.assert_close(per_sample[i], expected)


def test_critic_features_head_split_and_twin():
    torch.manual_seed(2)
    twin = TwinQCritic(4, 2, hidden=(16, 8))
    obs, act = torch.randn(5, 4), torch.rand(5, 2) * 2 - 1
    q1, q2 = twin(obs, act)
    assert q1.shape == q2.shape == (5,)
    assert not torch.allclose(q1, q2)
    params = params_of(twin)
    features = functional_call(twin.q1.features, subtree(params, "q1.features"), (obs, act))
    assert features.shape == (5, 8) and torch.all(features >= 0)
    q1_from_split = functional_call(twin.q1.head, subtree(params, "q1.head"), (features,)).squeeze(-1)
    torch.testing.assert_close(q1_from_split, q1)
    torch.testing.assert_close(functional_call(twin, params, (obs, act))[1], q2)


@SETTINGS
@given(
    low=st.floats(-5.0, 0.0),
    width=st.floats(0.1, 10.0),
    action=st.floats(-1.0, 1.0),
)
def test_rescale_action_maps_unit_box_onto_bounds(low, width, action):
    low_t, high_t = torch.tensor(low, dtype=torch.float64), torch.tensor(low + width, dtype=torch.float64)
    a = torch.tensor(action, dtype=torch.float64)
    env_action = rescale_action(a, low_t, high_t)
    assert low - 1e-9 <= env_action.item() <= low + width + 1e-9
    torch.testing.assert_close(unscale_action(env_action, low_t, high_t), a)
    torch.testing.assert_close(rescale_action(-torch.ones(()), low_t, high_t).double(), low_t)
    torch.testing.assert_close(rescale_action(torch.ones(()), low_t, high_t).double(), high_t)


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="`obs`"):
        DeterministicActor(3, 2)(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="`act`"):
        QCritic(3, 2)(torch.zeros(4, 3), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="`prefix`"):
        subtree(params_of(QCritic(3, 2)), "attention")
    assert math.isfinite(TanhGaussianActor(3, 2)(torch.zeros(1, 3)).mode.sum().item())


@pytest.mark.parametrize(("build", "message"), [(lambda: DeterministicActor(4, 2, hidden=()), "`hidden`"),
                                                (lambda: TanhGaussianActor(4, 2, hidden=()), "`hidden`"),
                                                (lambda: QCritic(4, 2, hidden=(0,)), "layer size.*got 0")])
def test_bad_sizes_are_named(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_tanh_gaussian_expands():
    law = TanhGaussian(torch.zeros(5, 3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)).expand((2, 5))
    assert law.batch_shape == (2, 5) and law.sample().shape == (2, 5, 3)
