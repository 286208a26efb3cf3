import copy
import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call, jacrev

from bilevel.nets import ProbabilisticEnsemble, soft_clamp
from bilevel.tree import params_of

SETTINGS = settings(max_examples=25, deadline=None)


def noise_std(obs: torch.Tensor) -> torch.Tensor:
    """The true heteroscedastic noise of the test system: 0.05 at x = -3 rising to 0.35 at x = 3."""
    return 0.05 + 0.05 * (obs + 3.0)


def make_data(num_rows: int, seed: int) -> tuple[torch.Tensor, ...]:
    """``s' = s + sin(s) + noise_std(s) eps``, ``r = a / 2 + 0.1 eps'`` on ``s ~ U[-3, 3]``, ``a ~ U[-1, 1]``."""
    gen = torch.Generator().manual_seed(seed)
    obs = torch.rand(num_rows, 1, generator=gen) * 6 - 3
    act = torch.rand(num_rows, 1, generator=gen) * 2 - 1
    next_obs = obs + torch.sin(obs) + noise_std(obs) * torch.randn(num_rows, 1, generator=gen)
    reward = 0.5 * act[:, 0] + 0.1 * torch.randn(num_rows, generator=gen)
    return obs, act, next_obs, reward


@pytest.fixture(scope="module")
def fitted() -> tuple[ProbabilisticEnsemble, object]:
    torch.manual_seed(0)
    ensemble = ProbabilisticEnsemble(1, 1, ensemble_size=4, num_elites=3, hidden=(64, 64))
    result = ensemble.fit(
        *make_data(1500, seed=1),
        max_epochs=150,
        learning_rate=3e-3,
        patience=8,
        improvement_threshold=0.001,
        generator=torch.Generator().manual_seed(2),
    )
    return ensemble, result


def test_fit_learns_mean_and_heteroscedastic_noise(fitted):
    ensemble, result = fitted
    assert 1 <= result.epochs <= 150 and len(result.train_loss) == result.epochs
    assert result.train_loss[-1] < result.train_loss[0]
    obs = torch.linspace(-2.7, 2.7, 55).unsqueeze(-1)
    act = torch.zeros_like(obs)
    with torch.no_grad():
        mean, logvar = ensemble(obs, act, ensemble.elite_idx)
    predicted_std = torch.exp(0.5 * logvar[..., 0]).mean(0)
    true_std = noise_std(obs[:, 0])
    correlation = torch.corrcoef(torch.stack([predicted_std, true_std]))[0, 1]
    ratio = predicted_std / true_std
    assert correlation > 0.9, correlation
    assert 0.75 < ratio.median() < 1.33 and ratio.min() > 0.5 and ratio.max() < 2.0, ratio
    assert (mean[..., 0].mean(0) - torch.sin(obs[:, 0])).abs().max() < 0.15
    reward_std = torch.exp(0.5 * logvar[..., 1]).mean()
    assert 0.08 < reward_std < 0.125


def test_corrupted_member_is_not_reelected(fitted):
    ensemble = copy.deepcopy(fitted[0])
    corrupted = int(ensemble.elite_idx[0])
    with torch.no_grad():
        for layer in ensemble.layers:
            layer.weight[corrupted] = torch.randn_like(layer.weight[corrupted])
    validation = make_data(500, seed=3)
    scores = ensemble.holdout_score(*validation)
    assert int(scores.argmax()) == corrupted
    elite_idx = ensemble.select_elites(*validation)
    assert corrupted not in elite_idx.tolist() and len(set(elite_idx.tolist())) == 3
    torch.testing.assert_close(ensemble.elite_idx, elite_idx)


def test_batched_members_equal_a_loop_over_separate_mlps(fitted):
    ensemble = fitted[0]
    obs, act, _, _ = make_data(40, seed=4)
    per_member_obs = obs.expand(4, 40, 1) + 0.1 * torch.arange(4.0).reshape(4, 1, 1)
    with torch.no_grad():
        mean, logvar = ensemble(per_member_obs, act.expand(4, 40, 1))
        for e in range(4):
            member = nn.Sequential(nn.Linear(2, 64), nn.SiLU(), nn.Linear(64, 64), nn.SiLU(), nn.Linear(64, 4))
            for linear, layer in zip(member[::2], ensemble.layers, strict=True):
                linear.weight.copy_(layer.weight[e].T)
                linear.bias.copy_(layer.bias[e, 0])
            x = (torch.cat([per_member_obs[e], act], -1) - ensemble.input_mean) / ensemble.input_std
            mean_n, raw_logvar = member(x).chunk(2, -1)
            expected_logvar = soft_clamp(raw_logvar, ensemble.min_logvar, ensemble.max_logvar)
            expected_mean = ensemble.target_mean + ensemble.target_std * mean_n
            torch.testing.assert_close(mean[e], expected_mean)
            torch.testing.assert_close(logvar[e], expected_logvar + 2 * ensemble.target_std.log())
            single = ensemble.predict_members(per_member_obs[e], act, member_idx=torch.tensor([e]), deterministic=True)
            torch.testing.assert_close(single.next_obs[0], per_member_obs[e] + expected_mean[:, :1])


def test_predict_uses_one_random_elite_per_row(fitted):
    ensemble = copy.deepcopy(fitted[0])
    obs, act, _, _ = make_data(300, seed=5)
    with torch.no_grad():
        ensemble.layers[-1].bias[:, 0, 0] = torch.arange(4.0) * 10
        mean, _ = ensemble(obs, act)
        prediction = ensemble.predict(obs, act, deterministic=True, generator=torch.Generator().manual_seed(0))
    delta = prediction.next_obs - obs
    matches = (delta.unsqueeze(0) - mean[..., :1]).abs().squeeze(-1) < 1e-5
    assert torch.all(matches.sum(0) == 1)
    chosen = matches.float().argmax(0)
    assert set(chosen.tolist()) == set(ensemble.elite_idx.tolist())
    assert prediction.reward.shape == (300,)
    sampled = [ensemble.predict(obs, act, generator=torch.Generator().manual_seed(9)) for _ in range(2)]
    torch.testing.assert_close(sampled[0].next_obs, sampled[1].next_obs, rtol=0, atol=0)
    members = ensemble.predict_members(obs, act, generator=torch.Generator().manual_seed(9))
    assert members.next_obs.shape == (3, 300, 1) and members.reward.shape == (3, 300)


def test_state_dict_round_trip(fitted):
    ensemble = fitted[0]
    buffer = io.BytesIO()
    torch.save(ensemble.state_dict(), buffer)
    buffer.seek(0)
    restored = ProbabilisticEnsemble(1, 1, ensemble_size=4, num_elites=3, hidden=(64, 64))
    restored.load_state_dict(torch.load(buffer))
    obs, act, _, _ = make_data(20, seed=6)
    for a, b in zip(ensemble(obs, act), restored(obs, act), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for name in ("elite_idx", "input_mean", "input_std", "target_mean", "target_std"):
        torch.testing.assert_close(getattr(restored, name), getattr(ensemble, name), rtol=0, atol=0)
    torch.testing.assert_close(restored.bootstrap_idx, ensemble.bootstrap_idx, rtol=0, atol=0)
    torch.testing.assert_close(restored.is_holdout, ensemble.is_holdout, rtol=0, atol=0)


def fitted_on_first_rows(data, rows):
    """A small ensemble fitted for one epoch on ``data[:rows]``, its generator, and the split it drew."""
    ensemble = ProbabilisticEnsemble(1, 1, ensemble_size=3, num_elites=2, hidden=(8,))
    gen = torch.Generator().manual_seed(0)
    ensemble.fit(*(x[:rows] for x in data), max_epochs=1, generator=gen)
    return ensemble, gen, ensemble.is_holdout.clone(), ensemble.bootstrap_idx.clone()


def test_retraining_on_more_rows_keeps_split_and_bootstrap():
    data = make_data(1000, seed=7)
    ensemble, gen, is_holdout, bootstrap_idx = fitted_on_first_rows(data, 600)
    assert int(is_holdout.sum()) == 120 and bootstrap_idx.shape == (3, 480)
    assert not torch.any(is_holdout[bootstrap_idx])
    ensemble.fit(*data, max_epochs=1, generator=gen)
    torch.testing.assert_close(ensemble.is_holdout[:600], is_holdout, rtol=0, atol=0)
    torch.testing.assert_close(ensemble.bootstrap_idx[:, :480], bootstrap_idx, rtol=0, atol=0)
    assert int(ensemble.is_holdout.sum()) == 200 and ensemble.bootstrap_idx.shape == (3, 800)
    assert torch.all(ensemble.bootstrap_idx[:, 480:] >= 600)
    assert not torch.any(ensemble.is_holdout[ensemble.bootstrap_idx])
    assert not torch.equal(ensemble.bootstrap_idx[0], ensemble.bootstrap_idx[1])


def test_refitting_on_the_same_rows_or_on_new_holdout_rows_only_keeps_split_and_bootstrap():
    data = make_data(100, seed=7)
    ensemble, gen, is_holdout, bootstrap_idx = fitted_on_first_rows(data, 99)
    ensemble.fit(*(x[:99] for x in data), max_epochs=1, generator=gen)
    assert torch.equal(ensemble.is_holdout, is_holdout) and torch.equal(ensemble.bootstrap_idx, bootstrap_idx)
    ensemble.fit(*data, max_epochs=1, holdout_ratio=0.21, generator=gen)
    assert ensemble.is_holdout.tolist() == [*is_holdout.tolist(), True]
    assert torch.equal(ensemble.bootstrap_idx, bootstrap_idx)


def test_forward_is_differentiable_with_torch_func():
    ensemble = ProbabilisticEnsemble(3, 2, ensemble_size=2, num_elites=1, hidden=(8, 8))
    params = params_of(ensemble)
    obs, act = torch.randn(3), torch.randn(2)

    def member_mean(o):
        return functional_call(ensemble, params, (o.unsqueeze(0), act.unsqueeze(0)))[0][:, 0]

    jacobian = jacrev(member_mean)(obs)
    assert jacobian.shape == (2, 4, 3) and torch.all(torch.isfinite(jacobian))


@SETTINGS
@given(raw=st.floats(-100.0, 100.0), low=st.floats(-12.0, -1.0), width=st.floats(1.0, 12.0))
def test_soft_clamp_stays_inside_the_bounds(raw, low, width):
    low_t, high_t = torch.tensor(low, dtype=torch.float64), torch.tensor(low + width, dtype=torch.float64)
    value = soft_clamp(torch.tensor(raw, dtype=torch.float64), low_t, high_t)
    overshoot = torch.nn.functional.softplus(low_t - high_t).item()
    assert low <= value.item() <= low + width + overshoot + 1e-12
    slightly_more = soft_clamp(torch.tensor(raw + 0.1, dtype=torch.float64), low_t, high_t)
    assert slightly_more >= value


def test_bad_arguments_raise_value_errors_naming_them():
    with pytest.raises(ValueError, match="`num_elites`"):
        ProbabilisticEnsemble(3, 2, ensemble_size=3, num_elites=4)
    ensemble = ProbabilisticEnsemble(3, 2, ensemble_size=2, num_elites=1, hidden=(8,))
    with pytest.raises(ValueError, match="`obs`"):
        ensemble(torch.zeros(5, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="`obs`"):
        ensemble.predict_members(torch.zeros(3, 5, 3), torch.zeros(3, 5, 2))
    with pytest.raises(ValueError, match="`act`"):
        ensemble.fit(torch.zeros(10, 3), torch.zeros(10, 3), torch.zeros(10, 3), torch.zeros(10))
    with pytest.raises(ValueError, match="`reward`"):
        ensemble.fit(torch.zeros(10, 3), torch.zeros(10, 2), torch.zeros(10, 3), torch.zeros(9))
    with pytest.raises(ValueError, match="`holdout_ratio`"):
        ensemble.fit(torch.zeros(10, 3), torch.zeros(10, 2), torch.zeros(10, 3), torch.zeros(10), holdout_ratio=1.0)
    with pytest.raises(ValueError, match=r"`improvement_threshold`.*-0.1"):
        ensemble.fit(torch.zeros(10, 3), torch.zeros(10, 2), torch.zeros(10, 3), torch.zeros(10),
                     improvement_threshold=-0.1)


def test_member_predictor_is_predict_members_and_a_loop_over_members_in_float64(fitted):
    ensemble = copy.deepcopy(fitted[0]).double()
    obs, act, _, _ = make_data(30, seed=6)
    obs, act = obs.double().expand(3, 30, 1) + 0.1, act.double().expand(3, 30, 1)
    members = torch.tensor([2, 0, 3])
    with torch.no_grad():
        for deterministic in (True, False):
            fast = ensemble.member_predictor(members, deterministic=deterministic)(
                obs, act, generator=torch.Generator().manual_seed(1)
            )
            reference = ensemble.predict_members(
                obs, act, member_idx=members, deterministic=deterministic, generator=torch.Generator().manual_seed(1)
            )
            assert torch.equal(fast.next_obs, reference.next_obs) and torch.equal(fast.reward, reference.reward)
        mean, _ = ensemble(obs, act, members)
        loop = torch.stack([ensemble(obs[i], act[i], member.reshape(1))[0][0] for i, member in enumerate(members)])
        torch.testing.assert_close(mean, loop, rtol=1e-13, atol=1e-13)
        elites = ensemble.member_predictor(deterministic=True)(obs, act)
        torch.testing.assert_close(elites.next_obs, obs + ensemble(obs, act, ensemble.elite_idx)[0][..., :1])


def test_chunked_holdout_score_equals_one_pass_in_float64_and_float32(fitted):
    from bilevel.nets.ensemble import _SCORE_CHUNK

    for dtype in (torch.float64, torch.float32):
        ensemble = copy.deepcopy(fitted[0]).to(dtype)
        obs, act, next_obs, reward = (x.to(dtype) for x in make_data(2 * _SCORE_CHUNK + 77, seed=7))
        x = ensemble._normalised_inputs(obs, act)
        y = ensemble._normalised_targets(obs, next_obs, reward)
        with torch.no_grad():
            mean, _ = ensemble.normalised_forward(x.expand(4, *x.shape))
        one_pass = torch.mean((mean - y) ** 2, dim=(-2, -1))
        torch.testing.assert_close(
            ensemble.holdout_score(obs, act, next_obs, reward),
            one_pass,
            rtol=1e-12 if dtype == torch.float64 else 1e-6,
            atol=0,
        )


def test_fit_does_not_depend_on_adams_implementation(monkeypatch):
    def fit(**adam_options):
        torch.manual_seed(0)
        ensemble = ProbabilisticEnsemble(1, 1, ensemble_size=3, num_elites=2, hidden=(16, 16))
        adam = torch.optim.Adam
        monkeypatch.setattr(torch.optim, "Adam", lambda *a, **k: adam(*a, **{**k, **adam_options}))
        result = ensemble.fit(*make_data(300, seed=8), max_epochs=4, generator=torch.Generator().manual_seed(3))
        monkeypatch.setattr(torch.optim, "Adam", adam)
        return ensemble.state_dict(), result

    (used, used_result), (looped, looped_result) = fit(), fit(foreach=False)
    assert used_result.train_loss == looped_result.train_loss
    assert torch.equal(used_result.holdout_score, looped_result.holdout_score)
    for name, value in used.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, looped[name]), name


def test_elites_are_the_members_with_the_lowest_holdout_score_of_the_kept_weights(fitted):
    """``fit`` keeps each member's best weights and elects the ``num_elites`` lowest holdout scores: the scores it
    reports are those of the kept weights on the held-out rows, and the elites are their argsort."""
    ensemble, result = fitted
    obs, act, next_obs, reward = make_data(1500, seed=1)
    rows = ensemble.is_holdout
    torch.testing.assert_close(ensemble.holdout_score(obs[rows], act[rows], next_obs[rows], reward[rows]),
                               result.holdout_score)
    lowest = sorted(torch.argsort(result.holdout_score)[: ensemble.num_elites].tolist())
    assert result.elite_idx.tolist() == lowest == ensemble.elite_idx.tolist()
    assert len(set(result.holdout_score.tolist())) == ensemble.ensemble_size, "distinct scores make the order strict"
