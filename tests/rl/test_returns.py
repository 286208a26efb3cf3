"""Discounted returns and GAE against plain-loop references, with episode ends at random places."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from bilevel.rl import discounted_returns, gae


def segment_end(t: int, b: int, terminated, truncated, valid) -> int:
    """The last stored step of the episode segment that contains step ``t`` of column ``b``."""
    num_steps = len(valid)
    k = t
    while not (terminated[k][b] or truncated[k][b] or k == num_steps - 1 or not valid[k + 1][b]):
        k += 1
    return k


def reference_returns(rewards, terminated, truncated, bootstrap, valid, gamma):
    """``G_t = sum_l gamma^l r_{t+l} + gamma^(L+1) b_end`` over the segment; no ``b_end`` if terminated."""
    num_steps, batch = len(rewards), len(rewards[0])
    returns = [[0.0] * batch for _ in range(num_steps)]
    for b in range(batch):
        for t in range(num_steps):
            if not valid[t][b]:
                continue
            end = segment_end(t, b, terminated, truncated, valid)
            total = sum(gamma ** (k - t) * rewards[k][b] for k in range(t, end + 1))
            if not terminated[end][b]:
                total += gamma ** (end - t + 1) * bootstrap[end][b]
            returns[t][b] = total
    return returns


def reference_gae(rewards, values, next_values, terminated, truncated, valid, gamma, lam):
    """``A_t = sum_l (gamma lam)^l delta_{t+l}`` over the segment (Schulman et al. 2016, eq. 16)."""
    num_steps, batch = len(rewards), len(rewards[0])
    advantages = [[0.0] * batch for _ in range(num_steps)]
    for b in range(batch):
        for t in range(num_steps):
            if not valid[t][b]:
                continue
            end = segment_end(t, b, terminated, truncated, valid)
            total = 0.0
            for k in range(t, end + 1):
                future = 0.0 if terminated[k][b] else gamma * next_values[k][b]
                total += (gamma * lam) ** (k - t) * (rewards[k][b] + future - values[k][b])
            advantages[t][b] = total
    return advantages


@st.composite
def rollouts(draw):
    shape = (draw(st.integers(1, 10)), draw(st.integers(1, 4)))
    floats = hnp.arrays(np.float64, shape, elements=st.floats(-5, 5))
    flags = hnp.arrays(np.bool_, shape, elements=st.booleans())
    rare_flags = hnp.arrays(np.bool_, shape, elements=st.sampled_from([False, False, False, True]))
    return {
        "rewards": draw(floats),
        "values": draw(floats),
        "next_values": draw(floats),
        "terminated": draw(rare_flags),
        "truncated": draw(rare_flags),
        "valid": draw(flags) | draw(flags),
        "gamma": draw(st.floats(0.0, 1.0)),
        "lam": draw(st.floats(0.0, 1.0)),
    }


def as_tensors(rollout):
    return {name: torch.as_tensor(value) for name, value in rollout.items() if isinstance(value, np.ndarray)}


@settings(max_examples=80, deadline=None)
@given(rollouts())
def test_discounted_returns_match_reference(rollout):
    data = as_tensors(rollout)
    returns = discounted_returns(
        data["rewards"],
        data["terminated"],
        data["truncated"],
        data["next_values"],
        rollout["gamma"],
        data["valid"],
    )
    expected = reference_returns(
        rollout["rewards"].tolist(),
        rollout["terminated"].tolist(),
        rollout["truncated"].tolist(),
        rollout["next_values"].tolist(),
        rollout["valid"].tolist(),
        rollout["gamma"],
    )
    assert returns.dtype == torch.float64
    torch.testing.assert_close(returns, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10)


@settings(max_examples=80, deadline=None)
@given(rollouts())
def test_gae_matches_reference(rollout):
    data = as_tensors(rollout)
    advantages = gae(
        data["rewards"],
        data["values"],
        data["next_values"],
        data["terminated"],
        data["truncated"],
        rollout["gamma"],
        rollout["lam"],
        data["valid"],
    )
    expected = reference_gae(
        *(rollout[name].tolist() for name in ("rewards", "values", "next_values", "terminated", "truncated")),
        rollout["valid"].tolist(),
        rollout["gamma"],
        rollout["lam"],
    )
    torch.testing.assert_close(
        advantages, torch.tensor(expected, dtype=torch.float64), rtol=1e-10, atol=1e-10
    )


@settings(max_examples=50, deadline=None)
@given(rollouts())
def test_gae_with_lambda_one_is_return_minus_value(rollout):
    """With consistent values (``V(s'_t) = V(s_{t+1})`` inside an episode) the TD errors telescope."""
    data = as_tensors(rollout)
    gamma = rollout["gamma"]
    next_valid = torch.cat([data["valid"][1:], torch.zeros_like(data["valid"][:1])])
    continues = ~(data["terminated"] | data["truncated"]) & next_valid
    next_step_values = torch.cat([data["values"][1:], data["values"][:1]])
    data["next_values"] = torch.where(continues, next_step_values, data["next_values"])
    advantages = gae(
        data["rewards"],
        data["values"],
        data["next_values"],
        data["terminated"],
        data["truncated"],
        gamma,
        1.0,
        data["valid"],
    )
    returns = discounted_returns(
        data["rewards"], data["terminated"], data["truncated"], data["next_values"], gamma, data["valid"]
    )
    torch.testing.assert_close(advantages, (returns - data["values"]) * data["valid"], rtol=1e-9, atol=1e-9)


def test_truncation_bootstraps_and_termination_does_not():
    rewards = torch.ones(3, 2, dtype=torch.float64)
    terminated = torch.tensor([[False, False], [True, False], [False, False]])
    truncated = torch.tensor([[False, False], [False, True], [False, False]])
    bootstrap = torch.full((3, 2), 10.0, dtype=torch.float64)
    returns = discounted_returns(rewards, terminated, truncated, bootstrap, 0.5)
    expected = torch.tensor([[1.5, 1.5 + 0.25 * 10], [1.0, 1.0 + 0.5 * 10], [6.0, 6.0]], dtype=torch.float64)
    torch.testing.assert_close(returns, expected)


def test_vmap_over_tasks_equals_loop():
    generator = torch.Generator().manual_seed(0)
    shape = (3, 6, 4)
    rewards, values, next_values = (torch.randn(shape, generator=generator) for _ in range(3))
    terminated = torch.rand(shape, generator=generator) < 0.2
    truncated = torch.rand(shape, generator=generator) < 0.2
    valid = torch.rand(shape, generator=generator) < 0.8

    def advantages(*args):
        return gae(*args[:3], args[3], args[4], 0.9, 0.8, args[5])

    batched = torch.func.vmap(advantages)(rewards, values, next_values, terminated, truncated, valid)
    looped = torch.stack(
        [
            advantages(*(x[i] for x in (rewards, values, next_values, terminated, truncated, valid)))
            for i in range(3)
        ]
    )
    torch.testing.assert_close(batched, looped)


def test_gradient_flows_to_values():
    rewards = torch.ones(4, 1)
    values = torch.zeros(4, 1, requires_grad=True)
    flags = torch.zeros(4, 1, dtype=torch.bool)
    advantages = gae(rewards, values, torch.zeros(4, 1), flags, flags, 1.0, 1.0)
    (grad,) = torch.autograd.grad(advantages.sum(), values)
    steps_summing_each_value = torch.arange(1.0, 5.0).unsqueeze(1)
    torch.testing.assert_close(grad, -steps_summing_each_value)


@pytest.mark.parametrize("gamma", [-0.1, 1.5])
def test_gamma_outside_unit_interval_is_rejected(gamma):
    rewards = torch.zeros(3, 2)
    flags = torch.zeros(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="gamma"):
        discounted_returns(rewards, flags, flags, rewards, gamma)
    with pytest.raises(ValueError, match="gamma"):
        gae(rewards, rewards, rewards, flags, flags, gamma, 0.9)


def test_lambda_outside_unit_interval_is_rejected():
    rewards = torch.zeros(3, 2)
    flags = torch.zeros(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="lam"):
        gae(rewards, rewards, rewards, flags, flags, 0.9, 2.0)


def test_mismatched_shapes_are_rejected():
    rewards = torch.zeros(3, 2)
    flags = torch.zeros(3, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="bootstrap_values"):
        discounted_returns(rewards, flags, flags, torch.zeros(3), 0.9)
    with pytest.raises(ValueError, match="next_values"):
        gae(rewards, rewards, torch.zeros(2, 3), flags, flags, 0.9, 0.9)
    with pytest.raises(ValueError, match="truncated"):
        gae(rewards, rewards, rewards, flags, flags[:2], 0.9, 0.9)
    with pytest.raises(ValueError, match="terminated"):
        discounted_returns(rewards, flags.float(), flags, rewards, 0.9)
