"""The linear feature baseline: exact on linear targets, batched over tasks by vmap."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bilevel.rl import fit_linear_baseline, linear_baseline_features, linear_baseline_values


def episode_batch(num_steps: int, batch: int, obs_dim: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    obs = torch.randn(num_steps, batch, obs_dim, generator=generator, dtype=torch.float64)
    time = torch.arange(num_steps).unsqueeze(1).expand(num_steps, batch)
    valid = torch.rand(num_steps, batch, generator=generator) < 0.8
    weights = torch.randn(2 * obs_dim + 4, generator=generator, dtype=torch.float64)
    return obs, time, valid, weights


def test_features_are_obs_squares_and_scaled_time_powers():
    obs = torch.tensor([[2.0, -3.0]])
    features = linear_baseline_features(obs, torch.tensor([50]))
    torch.testing.assert_close(features, torch.tensor([[2.0, -3.0, 4.0, 9.0, 0.5, 0.25, 0.125, 1.0]]))


@settings(max_examples=25, deadline=None)
@given(obs_dim=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_recovers_an_exactly_linear_target(obs_dim, seed):
    obs, time, valid, true_weights = episode_batch(60, 5, obs_dim, seed)
    returns = linear_baseline_values(true_weights, obs, time)
    noise_on_invalid_steps = torch.where(valid, 0.0, 1e3)
    weights = fit_linear_baseline(obs, returns + noise_on_invalid_steps, time, valid, dampings=(1e-12,))
    torch.testing.assert_close(weights, true_weights, rtol=1e-6, atol=1e-6)
    fitted = linear_baseline_values(fit_linear_baseline(obs, returns, time, valid), obs, time)
    torch.testing.assert_close(fitted, returns, rtol=1e-3, atol=1e-3)


def test_vmap_over_tasks_equals_loop():
    tasks = [episode_batch(30, 4, 3, seed) for seed in range(5)]
    obs, time, valid, true_weights = (torch.stack(parts) for parts in zip(*tasks, strict=True))
    returns = (
        torch.func.vmap(linear_baseline_values)(true_weights, obs, time) + torch.randn(valid.shape).double()
    )
    batched = torch.func.vmap(fit_linear_baseline)(obs, returns, time, valid)
    looped = torch.stack([fit_linear_baseline(obs[i], returns[i], time[i], valid[i]) for i in range(5)])
    torch.testing.assert_close(batched, looped)
    values = torch.func.vmap(linear_baseline_values)(batched, obs, time)
    assert values.shape == returns.shape


def test_singular_system_falls_back_to_the_next_damping():
    obs, time, valid, _ = episode_batch(20, 3, 2, seed=0)
    obs = torch.zeros_like(obs)
    returns = torch.randn(valid.shape, dtype=torch.float64)
    unregularised_first = fit_linear_baseline(obs, returns, time, valid, dampings=(0.0, 1e-3))
    assert torch.isfinite(unregularised_first).all()
    torch.testing.assert_close(
        unregularised_first, fit_linear_baseline(obs, returns, time, valid, dampings=(1e-3,))
    )


def test_no_valid_step_gives_zero_weights():
    obs, time, valid, _ = episode_batch(10, 2, 3, seed=1)
    weights = fit_linear_baseline(obs, torch.randn(valid.shape).double(), time, torch.zeros_like(valid))
    assert torch.equal(weights, torch.zeros_like(weights))


def test_bad_shapes_are_rejected():
    obs, time, valid, weights = episode_batch(10, 2, 3, seed=2)
    with pytest.raises(ValueError, match="returns"):
        fit_linear_baseline(obs, torch.zeros(10, 3), time, valid)
    with pytest.raises(ValueError, match="time"):
        linear_baseline_features(obs, time[:5])
    with pytest.raises(ValueError, match="weights"):
        linear_baseline_values(weights[:-1], obs, time)
    with pytest.raises(ValueError, match="dampings"):
        fit_linear_baseline(obs, torch.zeros(10, 2), time, valid, dampings=(-1.0,))
