"""Policy-gradient surrogates: gradients, masking, standardisation and batching over tasks."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.rl import importance_weighted_loss, masked_mean, reinforce_loss, standardize


def softmax_policy_log_probs(params: dict[str, torch.Tensor], obs: torch.Tensor, actions: torch.Tensor):
    logits = obs @ params["weight"] + params["bias"]
    return torch.log_softmax(logits, dim=-1).gather(-1, actions.unsqueeze(-1)).squeeze(-1)


def policy_batch(seed: int, num_steps: int = 7, batch: int = 3):
    generator = torch.Generator().manual_seed(seed)
    params = {
        "weight": torch.randn(4, 3, generator=generator, dtype=torch.float64),
        "bias": torch.randn(3, generator=generator, dtype=torch.float64),
    }
    obs = torch.randn(num_steps, batch, 4, generator=generator, dtype=torch.float64)
    actions = torch.randint(3, (num_steps, batch), generator=generator)
    advantages = torch.randn(num_steps, batch, generator=generator, dtype=torch.float64)
    valid = torch.rand(num_steps, batch, generator=generator) < 0.7
    return params, obs, actions, advantages, valid


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_importance_weighted_gradient_equals_reinforce_at_old_policy(seed):
    params, obs, actions, advantages, valid = policy_batch(seed)
    old_log_probs = softmax_policy_log_probs(params, obs, actions).detach()

    def weighted(p):
        return importance_weighted_loss(
            softmax_policy_log_probs(p, obs, actions), old_log_probs, advantages, valid
        )

    def vanilla(p):
        return reinforce_loss(softmax_policy_log_probs(p, obs, actions), advantages, valid)

    weighted_grad, vanilla_grad = torch.func.grad(weighted)(params), torch.func.grad(vanilla)(params)
    for name in params:
        torch.testing.assert_close(weighted_grad[name], vanilla_grad[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weighted(params), -masked_mean(advantages, valid))


def test_reinforce_loss_is_the_valid_mean_of_minus_log_prob_times_advantage():
    log_probs = torch.tensor([[-1.0, -2.0], [-3.0, -4.0]])
    advantages = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    valid = torch.tensor([[True, False], [True, True]])
    expected = (1.0 + 9.0 + 16.0) / 3
    torch.testing.assert_close(reinforce_loss(log_probs, advantages, valid), torch.tensor(expected))
    torch.testing.assert_close(reinforce_loss(log_probs, advantages), torch.tensor(30.0 / 4))


def test_invalid_steps_do_not_affect_losses_or_gradients():
    params, obs, actions, advantages, valid = policy_batch(seed=3)
    garbage_advantages = torch.where(valid, advantages, 1e6)

    def loss(p, adv):
        log_probs = softmax_policy_log_probs(p, obs, actions)
        return reinforce_loss(log_probs, adv, valid) + importance_weighted_loss(
            log_probs, log_probs.detach() - 0.1, adv, valid
        )

    clean, garbage = (
        torch.func.grad(loss)(params, advantages),
        torch.func.grad(loss)(params, garbage_advantages),
    )
    for name in params:
        torch.testing.assert_close(clean[name], garbage[name])


def test_standardize_gives_zero_mean_unit_std_over_valid_steps():
    _, _, _, advantages, valid = policy_batch(seed=4)
    standardized = standardize(advantages * 5.0 + 2.0, valid)
    real = standardized[valid]
    torch.testing.assert_close(real.mean(), torch.tensor(0.0, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(
        real.std(unbiased=False), torch.tensor(1.0, dtype=torch.float64), atol=1e-6, rtol=0
    )
    assert not standardized[~valid].any()
    for eps in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=f"`eps`.*{eps}"):
            standardize(advantages, valid, eps=eps)


def test_vmap_over_tasks_equals_loop():
    tasks = [policy_batch(seed) for seed in range(4)]
    log_probs = torch.stack([softmax_policy_log_probs(p, o, a) for p, o, a, _, _ in tasks])
    advantages = torch.stack([task[3] for task in tasks])
    valid = torch.stack([task[4] for task in tasks])

    def task_loss(log_probs, advantages, valid):
        return reinforce_loss(log_probs, standardize(advantages, valid), valid)

    batched = torch.func.vmap(task_loss)(log_probs, advantages, valid)
    looped = torch.stack([task_loss(log_probs[i], advantages[i], valid[i]) for i in range(4)])
    torch.testing.assert_close(batched, looped)


def test_mismatched_shapes_are_rejected():
    values = torch.zeros(5, 2)
    with pytest.raises(ValueError, match="advantages"):
        reinforce_loss(values, torch.zeros(5))
    with pytest.raises(ValueError, match="old_log_probs"):
        importance_weighted_loss(values, torch.zeros(2, 5), values)
    with pytest.raises(ValueError, match="valid"):
        standardize(values, torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps"):
        standardize(values, eps=0.0)
