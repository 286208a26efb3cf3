"""MATT and Meta-Critic: the meta-gradient through the look-ahead (against finite differences and a
reference through `bilevel.inner.unroll`), the learner's actor update against eqs. 8-10 on the batches it
drew (descending eq. 8, a fresh validation batch), the scale's range, dance twice, the meta interval, every
variant from the CLI, and TD3-MATT-DT learning Pendulum."""

import functools
import json
import math

import pytest
import torch
import torchopt
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bilevel import cli, tree
from bilevel.algorithms.meta_attention import VARIANTS, choose_by_q, lookahead_split
from bilevel.inner import unroll
from bilevel.runs import RunFolder
from bilevel.runs.loop import _build, evaluate_run, make_config

TINY = {"env": "Pendulum-v1", "hidden": (6, 4), "batch_size": 8, "buffer_size": 500,
        "steps_per_iteration": 100, "learning_starts": 50, "eval_episodes": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(algorithm, **overrides):
    sizes = {"attention_hidden": (5,)} if "matt" in algorithm else {"meta_hidden": (5,)}
    return _build(algorithm, make_config(algorithm, {**TINY, **sizes, **overrides}))


def sharpen_attention(learner, factor=20.0):
    """Make the untrained attention net's scale vary visibly across states."""
    with torch.no_grad():
        for param in learner.meta_net.parameters():
            param.mul_(factor)


@pytest.mark.parametrize("algorithm", ["td3-matt", "sac-matt", "td3-mc"])
@pytest.mark.parametrize("layers", ["first", "all"])
def test_meta_gradient_through_the_lookahead_matches_finite_differences(float64, algorithm, layers):
    learner = build(algorithm, actor_lr=0.3, lookahead_layers=layers)
    generator = torch.Generator().manual_seed(1)
    train_obs, val_obs = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    train_noise, val_noise = learner.actor_noise(8), learner.actor_noise(8)
    moved, fixed = lookahead_split(tree.detach(learner.actor_params()), layers)
    meta_params = {k: v.detach().clone().requires_grad_() for k, v in tree.params_of(learner.meta_net).items()}

    def meta_loss(params):
        return learner.meta_loss(params, moved, fixed, train_obs, val_obs, train_noise, val_noise)

    gradient = torch.autograd.grad(meta_loss(meta_params), list(meta_params.values()))
    assert sum(float(g.abs().sum()) for g in gradient) > 1e-6
    eps = 1e-6
    for _ in range(4):
        direction = {k: torch.randn(v.shape, generator=generator) for k, v in meta_params.items()}
        with torch.no_grad():
            plus = meta_loss(tree.axpy(eps, direction, meta_params))
            minus = meta_loss(tree.axpy(-eps, direction, meta_params))
        finite_difference = (plus - minus) / (2 * eps)
        analytic = sum((g * d).sum() for g, d in zip(gradient, direction.values(), strict=True))
        assert torch.allclose(analytic, finite_difference, rtol=1e-5, atol=1e-9)


def test_lookahead_split_moves_the_chosen_layers():
    params = build("td3-matt").actor_params()
    assert set(lookahead_split(params, "first")[0]) == {"features.0.weight", "features.0.bias"}
    assert set(lookahead_split(params, "features")[0]) == {"features.0.weight", "features.0.bias",
                                                          "features.2.weight", "features.2.bias"}
    moved, fixed = lookahead_split(params, "all")
    assert set(moved) == set(params) and not fixed


@settings(max_examples=25, deadline=None)
@given(arrays("float64", (16, 3), elements=st.floats(-8, 8)))
def test_attention_scale_is_in_open_interval_0_2(obs):
    learner = scale_learner()
    scale = learner.attention_scale(tree.params_of(learner.meta_net), learner.actor_params(),
                                    torch.as_tensor(obs, dtype=torch.float32))
    assert scale.shape == (16, 4)
    assert bool((scale > 0).all()) and bool((scale < 2).all())


@functools.cache
def scale_learner():
    learner = build("td3-matt")
    sharpen_attention(learner, 3.0)
    return learner


@pytest.mark.parametrize("algorithm", ["td3-matt-dt", "ddpg-matt-dt", "sac-matt-dt"])
def test_dance_twice_executes_the_action_with_the_higher_q1(algorithm):
    learner = build(algorithm, exploration_noise=0.0) if "sac" not in algorithm else build(algorithm)
    sharpen_attention(learner)
    obs = torch.randn(256, 3, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        decided = learner.decide(obs, explore=False)
        vanilla, attended, _ = learner.vanilla_and_attention_actions(obs)
        critic = learner.critic_constants()
        q_vanilla, q_attention = learner.q1(critic, obs, vanilla), learner.q1(critic, obs, attended)
    prefer = q_attention > q_vanilla
    assert 0 < int(prefer.sum()) < len(obs)
    assert torch.allclose(decided, torch.where(prefer[:, None], attended, vanilla))
    assert bool((learner.q1(critic, obs, decided) >= torch.minimum(q_vanilla, q_attention)).all())
    assert torch.equal(choose_by_q(torch.tensor([1.0, 2.0]), torch.tensor([1.5, 2.0])), torch.tensor([True, False]))
    if "sac" not in algorithm:
        with torch.no_grad():
            assert torch.allclose(learner.decide(obs, explore=True), decided)


def test_without_dance_twice_the_vanilla_action_is_executed():
    learner = build("td3-matt")
    sharpen_attention(learner)
    obs = torch.randn(32, 3)
    with torch.no_grad():
        vanilla, attended, _ = learner.vanilla_and_attention_actions(obs)
        assert torch.equal(learner.decide(obs, explore=False), vanilla)
        assert not torch.allclose(vanilla, attended)


@pytest.mark.parametrize("algorithm", sorted(VARIANTS))
def test_every_variant_trains_from_the_cli_logs_its_meta_loss_and_evaluates_from_its_record(tmp_path, algorithm):
    run = tmp_path / "run"
    argv = ["train", algorithm, "--env", "Pendulum-v1", "--iterations", "2", "--device", "cpu", "--hidden", "8", "8",
            "--batch-size", "8", "--steps-per-iteration", "60", "--learning-starts", "30", "--eval-episodes", "1",
            "--run-dir", str(run), "--no-progress"]
    if "matt" in algorithm:
        argv += ["--attention-hidden", "8"]
    assert cli.main(argv) == 0
    rows = RunFolder(run).read_metrics()
    assert len(rows) == 2 and rows[-1]["env_steps"] == 120
    last = rows[-1]
    assert isinstance(last["meta_loss"], float) and abs(last["meta_loss"]) <= 1
    assert math.isfinite(last["meta_grad_norm"]) and last["meta_grad_norm"] >= 0 and last["meta_net_norm"] > 0
    if "matt" in algorithm:
        assert math.isfinite(last["q_attention_minus_vanilla"])
    assert cli.main(["eval", str(run), "--episodes", "1"]) == 0
    assert "return" in json.loads((run / "eval.json").read_text())
    assert cli.main(["archive", str(run), "--to", str(tmp_path / "records")]) == 0
    record = tmp_path / "records" / "run"
    assert not (record / "checkpoints").exists()
    assert evaluate_run(record, {"episodes": 1}) == evaluate_run(run, {"episodes": 1})


def test_meta_loss_can_also_train_the_moved_actor_layers():
    learner = build("td3-matt", meta_loss_trains_actor=True, lookahead_layers="features", policy_frequency=1,
                    steps_per_iteration=60, learning_starts=30, eval_episodes=0)
    before = learner.actor.features[2].weight.detach().clone()
    learner.step()
    assert learner.updates == 31
    assert torch.isfinite(learner.actor.features[2].weight).all()
    assert not torch.equal(learner.actor.features[2].weight, before)


@pytest.mark.parametrize("algorithm", ["td3-matt", "sac-matt", "td3-mc"])
def test_actor_step_vanilla_gradient_gives_the_first_lookahead_step(float64, algorithm):
    """`actor_update` reuses the actor step's vanilla gradient for eq. 8: the same meta loss and gradient
    as unrolling both look-ahead steps."""
    learner = build(algorithm, actor_lr=0.3)
    generator = torch.Generator().manual_seed(2)
    train_obs, val_obs = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
    train_noise, val_noise = learner.actor_noise(8), learner.actor_noise(8)
    actor_params = learner.actor_params()
    meta_params = tree.params_of(learner.meta_net)
    vanilla, _ = learner.actor_and_auxiliary_losses(actor_params, tree.detach(meta_params), train_obs, train_noise)
    grads = dict(zip(actor_params, torch.autograd.grad(vanilla, list(actor_params.values())), strict=True))
    moved, fixed = lookahead_split(tree.detach(actor_params), "first")
    old = {name: value - 0.3 * grads[name] for name, value in moved.items()}
    args = (meta_params, moved, fixed, train_obs, val_obs, train_noise, val_noise)
    reused, unrolled = learner.meta_loss(*args, old=old), learner.meta_loss(*args)
    assert torch.allclose(reused, unrolled, rtol=1e-12, atol=1e-15)
    for a, b in zip(torch.autograd.grad(reused, list(meta_params.values())),
                    torch.autograd.grad(unrolled, list(meta_params.values())), strict=True):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("algorithm", ["sac-matt", "td3-matt", "ddpg-matt"])
def test_shared_forward_losses_equal_separate_ones(algorithm):
    """One actor-feature pass (and over DDPG and TD3 one critic-feature pass) gives the vanilla and the
    attention-action loss, bit for bit as evaluating each on its own."""
    learner = build(algorithm)
    sharpen_attention(learner)
    obs, noise = torch.randn(16, 3), learner.actor_noise(16)
    meta_params = tree.params_of(learner.meta_net)
    vanilla, auxiliary = learner.actor_and_auxiliary_losses(learner.actor_params(), meta_params, obs, noise)
    assert torch.equal(vanilla, learner.actor_loss(learner.actor_params(), obs, noise))
    assert torch.equal(auxiliary, learner.auxiliary_loss(learner.actor_params(), meta_params, obs, noise))


@functools.cache
def reference_learner(algorithm, layers):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return build(algorithm, actor_lr=0.3, lookahead_layers=layers)
    finally:
        torch.set_default_dtype(previous)


@settings(max_examples=12, deadline=None)
@given(algorithm=st.sampled_from(["td3-matt", "sac-matt", "ddpg-matt", "td3-mc"]),
       layers=st.sampled_from(["first", "features", "all"]), seed=st.integers(0, 2**16), lr=st.floats(1e-3, 1.0))
def test_meta_gradient_equals_a_reference_through_unroll(algorithm, layers, seed, lr):
    """The meta loss and its gradient in ``psi`` and in the moved layers (float64), against eqs. 8-10
    written out with `bilevel.inner.unroll`'s default ``torch.func.grad`` and ``torchopt.sgd``: equal to
    1e-12."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        learner = reference_learner(algorithm, layers)
        generator = torch.Generator().manual_seed(seed)
        train_obs, val_obs = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
        learner.generator.manual_seed(seed)
        train_noise, val_noise = learner.actor_noise(8), learner.actor_noise(8)
        moved, fixed = lookahead_split(tree.detach(learner.actor_params()), layers)
        moved = {k: (v + 0.1 * torch.randn(v.shape, generator=generator)).requires_grad_() for k, v in moved.items()}
        meta_params = {k: (v.detach() * (1 + torch.rand(v.shape, generator=generator))).requires_grad_()
                       for k, v in tree.params_of(learner.meta_net).items()}

        def reference():
            def actor(p):
                return {**fixed, **p}

            step = torchopt.sgd(lr)
            old = unroll(lambda p: learner.actor_loss(actor(p), train_obs, train_noise), moved, step, 1)
            new = unroll(lambda p: learner.auxiliary_loss(actor(p), meta_params, train_obs, train_noise), old, step, 1)
            return torch.tanh(learner.actor_loss(actor(new), val_obs, val_noise)
                              - learner.actor_loss(actor(old), val_obs, val_noise))

        learner.config.actor_lr = lr
        inputs = [*meta_params.values(), *moved.values()]
        expected = reference()
        optimised = learner.meta_loss(meta_params, moved, fixed, train_obs, val_obs, train_noise, val_noise)
        assert torch.allclose(optimised, expected, rtol=1e-12, atol=1e-15)
        for a, b in zip(torch.autograd.grad(optimised, inputs), torch.autograd.grad(expected, inputs), strict=True):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15)
    finally:
        learner.config.actor_lr = 0.3
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("algorithm", ["td3-matt", "sac-matt", "td3-mc"])
def test_meta_interval_steps_the_meta_net_on_every_kth_actor_update(algorithm):
    """With ``meta_interval = 3`` the meta-net moves on actor updates 1, 4, 7, ... only; the others are the
    actor's step on ``grad (L_actor + L_aux)``, and ``meta_interval = 1`` is the default."""
    assert build(algorithm).config.meta_interval == 1
    learner = build(algorithm, meta_interval=3, policy_frequency=1, steps_per_iteration=60, learning_starts=51)
    learner.step()
    assert learner.updates == 10
    update = learner.actor_update
    expected = []

    def spy(obs):
        expected.clear()
        if learner.updates % 3 != 1:
            state = learner.generator.get_state()
            live = learner.actor_params()
            vanilla, auxiliary = learner.actor_and_auxiliary_losses(live, tree.params_of(learner.meta_net), obs,
                                                                    learner.actor_noise(obs.shape[0]))
            expected.extend(torch.autograd.grad(vanilla + auxiliary, list(live.values()), materialize_grads=True))
            learner.generator.set_state(state)
        return update(obs)

    learner.actor_update = spy
    moves = []
    for _ in range(6):
        meta_before = [p.detach().clone() for p in learner.meta_net.parameters()]
        learner.gradient_update()
        moves.append(not all(torch.equal(a, b) for a, b in zip(meta_before, learner.meta_net.parameters(),
                                                              strict=True)))
        if expected:
            assert all(torch.equal(p.grad, g) for p, g in zip(learner.actor_params().values(), expected,
                                                             strict=True))
    assert moves == [False, False, True, False, False, True]


@pytest.mark.parametrize("algorithm", ["td3-matt", "td3-mc"])
def test_logged_meta_norms_are_the_applied_gradient_and_the_stepped_net(algorithm):
    """``meta_grad_norm`` is the norm of the gradient the meta optimiser applied, ``meta_net_norm`` the norm of
    the meta net after that step."""
    learner = build(algorithm, policy_frequency=1, steps_per_iteration=60, learning_starts=51)
    learner.step()
    metrics = learner.actor_update(learner.buffer.sample(8, learner.generator).obs)
    applied = {name: param.grad for name, param in learner.meta_net.named_parameters()}
    assert torch.allclose(metrics["meta_grad_norm"], tree.norm(applied))
    assert torch.allclose(metrics["meta_net_norm"], tree.norm(tree.params_of(learner.meta_net, detach=True)))
    assert metrics["meta_grad_norm"] > 0


def test_meta_interval_must_be_positive():
    with pytest.raises(ValueError, match="meta_interval"):
        build("td3-matt", meta_interval=0)


def test_bilevel_plot_draws_the_q_gap_curve_and_feature_embeddings(tmp_path, capsys):
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"s{seed}"
        argv = ["train", "td3-matt", "--env", "Pendulum-v1", "--iterations", "2", "--device", "cpu", "--hidden", "8",
                "8", "--attention-hidden", "8", "--batch-size", "8", "--steps-per-iteration", "60",
                "--learning-starts", "30", "--eval-episodes", "1", "--checkpoint-every", "1", "--analysis-states", "40",
                "--seed", str(seed), "--run-dir", str(run), "--no-progress"]
        assert cli.main(argv) == 0
        runs.append(str(run))
    saved = torch.load(tmp_path / "s0" / "analysis" / "iteration-000002.pt", weights_only=True)
    assert saved["env_steps"] == 120
    assert saved["actor_features"].shape == saved["attention_features"].shape == (40, 8)
    assert saved["q_vanilla"].shape == saved["q_attention"].shape == (40,)
    assert cli.main(["plot", *runs, "--out", str(tmp_path / "plots" / "return.png")]) == 0
    printed = capsys.readouterr().out
    for name in ("td3-matt_q_gap.png", "td3-matt_tsne.png"):
        assert (tmp_path / "plots" / name).stat().st_size > 1000
        assert name in printed


@pytest.mark.parametrize("base", ["td3", "ddpg"])
def test_a_dead_attention_net_makes_the_actor_step_its_base_learners(float64, base):
    """With the attention net's output layer at zero the scale is exactly 1, the attention action is the
    vanilla action, and MATT's actor gradient is exactly twice its base learner's (the attention-action
    loss is then the vanilla loss), which Adam's step normalises away up to its ``eps``: the reading of
    the LunarLander runs whose attention nets decayed under the authors' weight decay."""
    learner = build(f"{base}-matt", policy_frequency=1, steps_per_iteration=60, learning_starts=1000)
    learner.step()
    assert learner.updates == 0 and len(learner.buffer) == 60
    reference = _build(base, make_config(base, {**TINY, "policy_frequency": 1}))
    reference.actor.load_state_dict(learner.actor.state_dict())
    reference.critic.load_state_dict(learner.critic.state_dict())
    with torch.no_grad():
        output_layer = [m for m in learner.meta_net.modules() if isinstance(m, torch.nn.Linear)][-1]
        output_layer.weight.zero_()
        output_layer.bias.zero_()
    obs = learner.buffer.sample(32, learner.generator).obs
    vanilla, attention, scale = learner.vanilla_and_attention_actions(obs)
    assert torch.equal(scale, torch.ones_like(scale)) and torch.equal(vanilla, attention)

    before = [p.detach().clone() for p in learner.actor.parameters()]
    learner.actor_update(obs)
    reference.actor_update(obs)
    moved = zip(learner.actor.named_parameters(), reference.actor.parameters(), before, strict=True)
    for (name, param), expected, start in moved:
        assert torch.allclose(param.grad, 2 * expected.grad, rtol=1e-12, atol=1e-15), name
        assert torch.allclose(param, expected, rtol=0, atol=1e-3 * learner.config.actor_lr), name
        assert (param - start).abs().max() > 0.5 * learner.config.actor_lr, name


def lookahead_learner(algorithm, layers="first"):
    """A float64 learner (under the `float64` fixture) with 64 random transitions and sharpened attention,
    one critic update and then an actor update on every `gradient_update`."""
    learner = build(algorithm, actor_lr=0.3, policy_frequency=1, buffer_size=64, lookahead_layers=layers)
    generator = torch.Generator().manual_seed(5)
    learner.buffer.add(torch.randn(64, 3, generator=generator) * 2, torch.rand(64, 1, generator=generator) * 2 - 1,
                       torch.randn(64, generator=generator), torch.randn(64, 3, generator=generator) * 2,
                       torch.zeros(64, dtype=torch.bool), torch.zeros(64, dtype=torch.bool))
    sharpen_attention(learner, 3.0)
    return learner


def record_actor_update(learner):
    """Run one `gradient_update` and return what its `actor_update` saw: the actor and meta-net parameters at
    entry, d_trn (its ``obs``), the batches it drew from ``learner.buffer`` itself, the reparameterisation
    noises it drew, and its metrics. SAC's temperature is put back to its value at entry."""
    seen = {"samples": [], "noises": []}
    sample, noise, update = learner.buffer.sample, learner.actor_noise, learner.actor_update

    def recording_sample(*args, **kwargs):
        batch = sample(*args, **kwargs)
        if "obs" in seen:
            seen["samples"].append(batch)
        return batch

    def recording_noise(batch_size):
        seen["noises"].append(noise(batch_size))
        return seen["noises"][-1]

    def spy(obs):
        seen["obs"] = obs.clone()
        seen["actor"] = {k: v.detach().clone() for k, v in learner.actor_params().items()}
        seen["meta"] = {k: v.detach().clone() for k, v in tree.params_of(learner.meta_net).items()}
        seen["metrics"] = update(obs)
        return seen["metrics"]

    learner.buffer.sample, learner.actor_noise, learner.actor_update = recording_sample, recording_noise, spy
    temperature = learner.log_alpha.detach().clone() if hasattr(learner, "log_alpha") else None
    try:
        learner.gradient_update()
    finally:
        del learner.buffer.sample, learner.actor_noise, learner.actor_update
    if temperature is not None:  # SAC's actor loss reads the temperature its after_actor_step then tuned
        with torch.no_grad():
            learner.log_alpha.copy_(temperature)
    return seen


def reference_meta_loss(learner, actor, meta, train_obs, val_obs, train_noise, val_noise, sign=-1.0):
    """Eqs. 8-10 written out from a snapshot of the actor ``phi`` and the attention net ``psi``, with
    ``torch.autograd.grad`` and plain SGD at the actor's learning rate over the learner's look-ahead layers:
    ``phi_old = phi - eta grad L_actor(phi; d_trn)``, ``phi_new = phi_old - eta grad L_att-action(phi_old;
    d_trn)``, ``tanh(L_actor(phi_new; d_val) - L_actor(phi_old; d_val))``. ``sign = +1`` steps eq. 8 uphill
    instead. Returns the loss and its gradient in ``psi``."""
    eta = learner.config.actor_lr
    meta = {k: v.clone().requires_grad_() for k, v in meta.items()}
    phi = {k: v.clone().requires_grad_() for k, v in actor.items()}
    grads = dict(zip(phi, torch.autograd.grad(learner.actor_loss(phi, train_obs, train_noise), list(phi.values())),
                     strict=True))
    moved = list(lookahead_split(actor, learner.config.lookahead_layers)[0])
    old = {**actor, **{name: (actor[name] + sign * eta * grads[name]).requires_grad_() for name in moved}}
    aux = learner.auxiliary_loss(old, meta, train_obs, train_noise)
    aux_grads = torch.autograd.grad(aux, [old[name] for name in moved], create_graph=True)
    new = {**old, **{name: old[name] - eta * g for name, g in zip(moved, aux_grads, strict=True)}}
    loss = torch.tanh(learner.actor_loss(new, val_obs, val_noise) - learner.actor_loss(old, val_obs, val_noise))
    return loss.detach(), dict(zip(meta, torch.autograd.grad(loss, list(meta.values())), strict=True))


@pytest.mark.parametrize(("algorithm", "layers"),
                         [("td3-matt", "first"), ("td3-matt", "all"), ("sac-matt", "first"), ("ddpg-matt", "first")])
def test_actor_update_meta_gradient_equals_eqs_8_to_10_from_its_snapshot(float64, algorithm, layers):
    """One `gradient_update` of the learner: the meta loss it logs and the gradient its attention net's Adam
    step applies equal eqs. 8-10 computed here from the snapshot of ``phi`` and ``psi`` at the actor update's
    entry and the batches (and SAC's noises) it drew, to 1e-10; the first look-ahead step descends (the
    same reference with ``phi_old = phi + eta grad`` differs far beyond that tolerance), and the meta-net's
    parameters after the update are Adam's first step on that gradient."""
    learner = lookahead_learner(algorithm, layers)
    seen = record_actor_update(learner)
    assert learner.updates == 1 and len(seen["samples"]) == 1
    train_noise, val_noise = seen["noises"] if "sac" in algorithm else (None, None)
    batches = (seen["obs"], seen["samples"][0].obs, train_noise, val_noise)
    expected_loss, expected_grad = reference_meta_loss(learner, seen["actor"], seen["meta"], *batches)
    assert abs(float(expected_loss)) > 1e-6
    assert torch.allclose(seen["metrics"]["meta_loss"], expected_loss, rtol=1e-10, atol=1e-14)
    for name, param in learner.meta_net.named_parameters():
        assert torch.allclose(param.grad, expected_grad[name], rtol=1e-8, atol=1e-12), name
    uphill_loss, uphill_grad = reference_meta_loss(learner, seen["actor"], seen["meta"], *batches, sign=1.0)
    assert abs(float(uphill_loss - expected_loss)) > 1e-4 * abs(float(expected_loss))
    assert tree.norm(tree.sub(uphill_grad, expected_grad)) > 1e-4 * tree.norm(expected_grad)

    reference_net = {k: v.clone().requires_grad_() for k, v in seen["meta"].items()}
    optimizer = torch.optim.Adam(reference_net.values(), lr=learner.config.meta_lr,
                                 weight_decay=learner.config.meta_weight_decay)
    for name, value in reference_net.items():
        value.grad = expected_grad[name]
    optimizer.step()
    for name, param in learner.meta_net.named_parameters():
        assert torch.allclose(param, reference_net[name], rtol=1e-10, atol=1e-12), name


@pytest.mark.parametrize("algorithm", ["td3-matt", "sac-matt"])
def test_actor_update_evaluates_eq_10_on_a_fresh_validation_batch(float64, algorithm):
    """`actor_update` draws its validation batch d_val from the replay buffer, one more sample after d_trn
    (its ``obs``), and a different one: the logged meta loss and the applied meta gradient are eq. 10 on
    that recorded d_val, not the same loss with d_trn in d_val's place."""
    learner = lookahead_learner(algorithm)
    seen = record_actor_update(learner)
    assert len(seen["samples"]) == 1, "actor_update must draw exactly one validation batch from the buffer"
    train_obs, val_obs = seen["obs"], seen["samples"][0].obs
    assert val_obs.shape == train_obs.shape and not torch.equal(val_obs, train_obs)
    train_noise, val_noise = seen["noises"] if "sac" in algorithm else (None, None)
    on_val, val_grad = reference_meta_loss(learner, seen["actor"], seen["meta"], train_obs, val_obs,
                                           train_noise, val_noise)
    on_trn, _ = reference_meta_loss(learner, seen["actor"], seen["meta"], train_obs, train_obs,
                                    train_noise, val_noise)
    assert abs(float(on_val - on_trn)) > 1e-6
    assert torch.allclose(seen["metrics"]["meta_loss"], on_val, rtol=1e-10, atol=1e-14)
    assert not torch.allclose(seen["metrics"]["meta_loss"], on_trn, rtol=1e-6, atol=1e-9)
    for name, param in learner.meta_net.named_parameters():
        assert torch.allclose(param.grad, val_grad[name], rtol=1e-8, atol=1e-12), name
