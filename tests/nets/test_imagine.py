from functools import partial

import pytest
import torch
from torch.func import functional_call, grad

from bilevel.nets import GaussianMLPPolicy, ProbabilisticEnsemble
from bilevel.rl.imagine import imagine
from bilevel.tree import params_of

OBS_DIM, ACT_DIM, HORIZON = 3, 2, 6


def reward_fn(obs, act, next_obs):
    return -(next_obs**2).sum(-1) - 0.1 * (act**2).sum(-1)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    ensemble = ProbabilisticEnsemble(OBS_DIM, ACT_DIM, ensemble_size=4, num_elites=3, hidden=(16, 16))
    with torch.no_grad():
        ensemble.elite_idx.copy_(torch.tensor([0, 2, 3]))
        ensemble.input_std.fill_(0.5)
        ensemble.target_std.fill_(0.3)
    policy = GaussianMLPPolicy(OBS_DIM, ACT_DIM, hidden=(8,), init_log_std=-1.0)
    start_states = torch.randn(3, 5, OBS_DIM)
    return ensemble, policy, start_states


def _termination_threshold(ensemble, policy, start_states):
    """A value halfway between two middle |s_0| reached at step 3 without termination: some rows
    terminate mid-rollout, and none lies within rounding error of the threshold."""
    dynamics = partial(ensemble.predict_members, deterministic=True)
    free = imagine(dynamics, policy, start_states, HORIZON, reward_fn, deterministic=True)
    ordered = free.obs[3, ..., 0].abs().flatten().sort().values
    middle = ordered.numel() // 2
    return 0.5 * (ordered[middle - 1] + ordered[middle]).item()


def test_batched_rollout_equals_loop_over_models_and_starts(setup):
    ensemble, policy, start_states = setup
    threshold = _termination_threshold(ensemble, policy, start_states)

    def termination_fn(obs, act, next_obs):
        return next_obs[..., 0].abs() > threshold

    batched = imagine(
        partial(ensemble.predict_members, deterministic=True),
        policy,
        start_states,
        HORIZON,
        reward_fn,
        termination_fn=termination_fn,
        deterministic=True,
    )
    assert batched.obs.shape == (HORIZON, 3, 5, OBS_DIM) and batched.actions.shape == (HORIZON, 3, 5, ACT_DIM)
    assert batched.rewards.shape == batched.log_probs.shape == batched.valid.shape == (HORIZON, 3, 5)
    assert batched.valid[-1].any() and not batched.valid[-1].all()
    for m, member in enumerate(ensemble.elite_idx.tolist()):
        for n in range(5):
            single = imagine(
                partial(ensemble.predict_members, member_idx=torch.tensor([member]), deterministic=True),
                policy,
                start_states[m : m + 1, n : n + 1],
                HORIZON,
                reward_fn,
                termination_fn=termination_fn,
                deterministic=True,
            )
            for field in batched._fields:
                got, expected = getattr(batched, field), getattr(single, field)
                got, expected = got[:, m, n], expected[:, 0, 0]
                torch.testing.assert_close(got, expected, msg=f"{field} differs at model {m}, start {n}")


def test_termination_masks_and_freezes(setup):
    ensemble, policy, start_states = setup
    threshold = _termination_threshold(ensemble, policy, start_states)
    out = imagine(
        partial(ensemble.predict_members, deterministic=True),
        policy,
        start_states,
        HORIZON,
        reward_fn,
        termination_fn=lambda obs, act, next_obs: next_obs[..., 0].abs() > threshold,
        deterministic=True,
    )
    assert torch.all(out.valid[0])
    assert torch.all(out.valid[1:] <= out.valid[:-1])
    torch.testing.assert_close(out.valid[1:], out.valid[:-1] & ~out.terminated[:-1])
    assert torch.all(out.rewards[~out.valid] == 0)
    assert out.terminated.sum(0).max() <= 1
    frozen = ~out.valid[1:]
    torch.testing.assert_close(out.obs[1:][frozen], out.obs[:-1][frozen])
    torch.testing.assert_close(out.next_obs[1:][frozen], out.obs[1:][frozen])
    torch.testing.assert_close(out.obs[1:][out.valid[1:]], out.next_obs[:-1][out.valid[1:]])
    torch.testing.assert_close(out.truncated[-1], out.valid[-1] & ~out.terminated[-1])
    assert not out.truncated[:-1].any()
    batch = out.to_trajectories()
    assert batch.rewards.shape == (HORIZON, 15) and batch.obs.shape == (HORIZON, 15, OBS_DIM)
    torch.testing.assert_close(batch.rewards[:, 5 * 2 + 3], out.rewards[:, 2, 3])
    torch.testing.assert_close(batch.episode_lengths, out.valid.sum(0).flatten())


def test_stochastic_rollout_is_reproducible_and_log_probs_are_differentiable(setup):
    ensemble, policy, start_states = setup
    params = params_of(policy, detach=True)

    def rollout(p):
        return imagine(
            ensemble.predict_members,
            lambda obs: functional_call(policy, p, (obs,)),
            start_states,
            HORIZON,
            reward_fn,
            generator=torch.Generator().manual_seed(3),
        )

    first, second = rollout(params), rollout(params)
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not first.actions.requires_grad and not first.rewards.requires_grad
    recomputed = functional_call(policy, params, (first.obs,)).log_prob(first.actions)
    torch.testing.assert_close(first.log_probs, recomputed)

    def surrogate(p):
        out = rollout(p)
        return (out.log_probs * out.rewards.detach()).sum()

    gradient = grad(surrogate)(params)
    for name, value in gradient.items():
        assert torch.all(torch.isfinite(value)) and value.abs().sum() > 0, name
    other = rollout({k: v + 0.2 for k, v in params.items()})
    assert not torch.allclose(other.actions, first.actions)


def test_model_reward_is_used_without_reward_fn(setup):
    ensemble, policy, start_states = setup
    dynamics = partial(ensemble.predict_members, deterministic=True)
    out = imagine(dynamics, policy, start_states, 1, None, deterministic=True)
    expected = dynamics(start_states, policy(start_states).mode).reward
    torch.testing.assert_close(out.rewards[0], expected)


def test_bad_arguments_raise_value_errors_naming_them(setup):
    ensemble, policy, start_states = setup
    with pytest.raises(ValueError, match="`start_states`"):
        imagine(ensemble.predict_members, policy, start_states[0], HORIZON, reward_fn)
    with pytest.raises(ValueError, match="`horizon`"):
        imagine(ensemble.predict_members, policy, start_states, 0, reward_fn)
    with pytest.raises(ValueError, match="`obs`"):
        imagine(ensemble.predict_members, policy, start_states[..., :2], HORIZON, reward_fn)


def _counting_dynamics(obs, act, *, generator):
    """``obs = [t, stop, x]``: the clock ``t`` ticks, ``stop`` is kept, ``x`` moves with the action and the clock."""
    clock, stop, x = obs.unbind(-1)
    next_x = 0.8 * x + act[..., 0] - 0.3 * act[..., 1] + 0.1 * clock
    return torch.stack([clock + 1, stop, next_x], -1), None


def _asymmetric_reward(obs, act, next_obs):
    return obs[..., 2] + 2.0 * next_obs[..., 2] ** 2 + 0.5 * act[..., 0] - 0.1 * obs[..., 0]


def _stop_at_clock(obs, act, next_obs):
    """Terminates the step taken at clock ``stop`` (read after the step, from ``next_obs``)."""
    return next_obs[..., 0] == next_obs[..., 1] + 1


def test_rollout_with_terminations_after_the_first_step_matches_a_per_row_loop():
    """Rows stop at steps 0, 1, 2, 3 and the last step (4), and some never: ``valid`` is "no earlier step
    terminated", ``terminated`` only on the first terminating step, ``truncated`` only on the last step of a
    row still alive after it, rewards ``reward_fn(s_t, a_t, s_{t+1})`` zeroed after the end, all as a loop."""
    horizon = 5
    torch.manual_seed(1)
    policy = GaussianMLPPolicy(3, ACT_DIM, hidden=(8,), init_log_std=-1.0).double()
    stops = torch.tensor([[0.0, 2.0, 4.0, 99.0], [1.0, 3.0, 4.0, 99.0]])
    x0 = torch.randn(2, 4, dtype=torch.float64)
    start_states = torch.stack([torch.zeros_like(x0), stops.double(), x0], -1)
    out = imagine(_counting_dynamics, policy, start_states, horizon, _asymmetric_reward,
                  termination_fn=_stop_at_clock, deterministic=True)

    expected = {name: torch.zeros(horizon, 2, 4, dtype=torch.float64) for name in ("rewards", "log_probs")}
    expected.update({name: torch.zeros(horizon, 2, 4, dtype=torch.bool) for name in ("valid", "terminated",
                                                                                    "truncated")})
    expected.update({name: torch.zeros(horizon, 2, 4, 3, dtype=torch.float64) for name in ("obs", "next_obs")})
    for m in range(2):
        for n in range(4):
            state, alive = start_states[m, n], True
            for t in range(horizon):
                with torch.no_grad():
                    dist = policy(state)
                    action = dist.mode
                    next_state, _ = _counting_dynamics(state, action, generator=None)
                    reward = _asymmetric_reward(state, action, next_state)
                    ends = bool(_stop_at_clock(state, action, next_state))
                expected["obs"][t, m, n] = state
                expected["next_obs"][t, m, n] = next_state if alive else state
                expected["log_probs"][t, m, n] = dist.log_prob(action)
                expected["valid"][t, m, n] = alive
                expected["rewards"][t, m, n] = reward if alive else 0.0
                expected["terminated"][t, m, n] = alive and ends
                expected["truncated"][t, m, n] = alive and not ends and t == horizon - 1
                if alive and ends:
                    alive = False
                if alive:
                    state = next_state
    lengths = expected["valid"].sum(0)
    assert lengths.tolist() == [[1, 3, 5, 5], [2, 4, 5, 5]]
    assert expected["terminated"][-1].sum() == 2 and expected["truncated"][-1].sum() == 2
    for name in ("valid", "terminated", "truncated"):
        assert torch.equal(getattr(out, name), expected[name]), name
    for name in ("obs", "next_obs", "rewards", "log_probs"):
        torch.testing.assert_close(getattr(out, name).detach(), expected[name], rtol=1e-12, atol=1e-12, msg=name)
