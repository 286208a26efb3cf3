"""The shared off-policy loop and DDPG, TD3, SAC: replay across autoresets, critic targets, resume,
the CLI, TD3 learning Pendulum, and TD3's and SAC's update equations (target smoothing, policy delay,
clipped double Q, the entropy term and the temperature step) in float64."""

import json
import math
import time

import gymnasium as gym
import numpy as np
import pytest
import torch
from torch.func import functional_call

from bilevel import cli, tree
from bilevel.algorithms.off_policy import SEED_PURPOSES, adam, parameters, polyak
from bilevel.nets import rescale_action
from bilevel.rl import Transitions
from bilevel.runs import RunFolder, derive_seed
from bilevel.runs.loop import _build, evaluate_run, load_learner, make_config

TINY = {"hidden": (16, 16), "batch_size": 16, "buffer_size": 2000, "steps_per_iteration": 100,
        "learning_starts": 50, "eval_episodes": 1, "device": "cpu"}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices on a shared 2-core machine: intra-op threads only add contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(algorithm, **overrides):
    return _build(algorithm, make_config(algorithm, {"env": "Pendulum-v1", **TINY, **overrides}))


def test_replay_across_autoresets_stores_exactly_the_env_transitions():
    learner = build("td3", steps_per_iteration=450, learning_starts=10_000, eval_episodes=0)
    learner.step()
    state = learner.buffer.state_dict()
    assert state["size"] == learner.env_steps == 450

    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=derive_seed(0, 0, SEED_PURPOSES["train_envs"]))
    low, high = torch.as_tensor(env.action_space.low), torch.as_tensor(env.action_space.high)
    for i in range(450):
        assert np.allclose(state["obs"][i].numpy(), obs, atol=1e-6), i
        env_action = rescale_action(state["actions"][i], low, high).numpy()
        obs, reward, terminated, truncated, _ = env.step(env_action)
        assert np.isclose(state["rewards"][i].item(), reward, atol=1e-5), i
        assert np.allclose(state["next_obs"][i].numpy(), obs, atol=1e-6), i
        assert bool(state["terminated"][i]) == terminated, i
        assert bool(state["truncated"][i]) == (truncated or i == 449), i
        if truncated:
            obs, _ = env.reset()
    assert state["truncated"].nonzero().flatten().tolist() == [199, 399, 449]


def test_vector_envs_drop_autoreset_steps():
    learner = build("ddpg", num_envs=3, steps_per_iteration=630, learning_starts=10_000, eval_episodes=0)
    learner.step()
    state = learner.buffer.state_dict()
    assert state["size"] == learner.env_steps == 630
    assert int(state["truncated"].sum()) == 3 + 3  # each env: its time limit at 200, the iteration cut at 210
    assert np.allclose(state["obs"][3:6].numpy(), state["next_obs"][0:3].numpy())


def test_ddpg_critic_target_bootstraps_on_truncation_not_termination():
    learner = build("ddpg")
    generator = torch.Generator().manual_seed(0)
    n = 6
    batch = Transitions(
        obs=torch.randn(n, 3, generator=generator), actions=torch.rand(n, 1, generator=generator) * 2 - 1,
        rewards=torch.randn(n, generator=generator), next_obs=torch.randn(n, 3, generator=generator),
        terminated=torch.tensor([True, False, False, True, False, False]),
        truncated=torch.tensor([False, True, False, False, True, False]))
    next_q = functional_call(learner.critic, learner.critic_target,
                             (batch.next_obs, functional_call(learner.actor, learner.actor_target, (batch.next_obs,))))
    target = batch.rewards + 0.99 * (~batch.terminated) * next_q
    expected = ((learner.critic(batch.obs, batch.actions) - target) ** 2).mean()
    params = dict(learner.critic.named_parameters())
    assert torch.allclose(learner.critic_loss(params, batch), expected)


def test_polyak_moves_the_target_by_tau():
    target = {"w": torch.zeros(3), "b": torch.ones(2)}
    online = {"w": torch.full((3,), 2.0, requires_grad=True), "b": torch.zeros(2)}
    averaged = polyak(target, online, 0.25)
    assert torch.allclose(averaged["w"], torch.full((3,), 0.5))
    assert torch.allclose(averaged["b"], torch.full((2,), 0.75))
    assert not averaged["w"].requires_grad


@pytest.mark.parametrize("algorithm", ["ddpg", "td3", "sac"])
def test_parameter_trees_from_cached_slots_are_the_module_parameters(algorithm):
    learner = build(algorithm)
    for module in (learner.actor, learner.critic):
        expected = tree.params_of(module)
        assert list(parameters(module)) == list(expected)
        assert all(parameters(module)[name] is value for name, value in expected.items())
        detached = parameters(module, detach=True)
        assert all(not v.requires_grad and v.data_ptr() == expected[k].data_ptr() for k, v in detached.items())
    learner.critic.to(torch.float64)
    assert all(v.dtype == torch.float64 for v in parameters(learner.critic).values())


def test_adam_helper_steps_like_foreach_adam():
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=generator), torch.randn(3, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(20)]
    params = {kind: [p.clone().requires_grad_() for p in start] for kind in ("helper", "foreach")}
    optimizers = {"helper": adam(params["helper"], 0.01, weight_decay=0.1),
                  "foreach": torch.optim.Adam(params["foreach"], lr=0.01, weight_decay=0.1, foreach=True)}
    for step_grads in grads:
        for kind, optimizer in optimizers.items():
            for param, grad in zip(params[kind], step_grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
    for a, b in zip(params["helper"], params["foreach"], strict=True):
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)


def test_actions_are_rescaled_to_the_env_bounds():
    learner = build("td3", learning_starts=0, eval_episodes=0)
    assert torch.equal(learner.action_low, torch.tensor([-2.0]))
    assert torch.equal(learner.action_high, torch.tensor([2.0]))
    learner.step()
    stored = learner.buffer.state_dict()["actions"]
    assert stored.abs().max() <= 1.0 and stored.abs().max() > 0.5


def state_tensors(learner):
    state = learner.learner_state()
    flat = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            flat[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)

    walk("", state)
    return flat


@pytest.mark.parametrize(("algorithm", "env", "steps"),
                         [("sac", "Pendulum-v1", 60), ("td3-matt-dt", "Pendulum-v1", 60),
                          # BipedalWalker keeps its Box2D world across seeded resets (the train envs are made anew)
                          ("td3", "BipedalWalker-v3", 150)])
def test_resumed_run_equals_straight_run(tmp_path, algorithm, env, steps):
    options = ["--env", env, "--device", "cpu", "--hidden", "16", "16", "--batch-size", "16",
               "--steps-per-iteration", str(steps), "--learning-starts", "30", "--eval-episodes", "1", "--no-progress"]
    assert cli.main(["train", algorithm, "--iterations", "3", "--run-dir", str(tmp_path / "straight"), *options]) == 0
    assert cli.main(["train", algorithm, "--iterations", "2", "--run-dir", str(tmp_path / "resumed"), *options]) == 0
    assert cli.main(["train", algorithm, "--resume", str(tmp_path / "resumed"), "--iterations", "3",
                     "--no-progress"]) == 0
    straight, resumed = (state_tensors(load_learner(tmp_path / run)[1]) for run in ("straight", "resumed"))
    assert straight.keys() == resumed.keys() and len(straight) > 20
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key
    rows = [RunFolder(tmp_path / run).read_metrics() for run in ("straight", "resumed")]
    assert [r["return"] for r in rows[0]] == [r["return"] for r in rows[1]]


@pytest.mark.parametrize("algorithm", ["ddpg", "td3", "sac"])
def test_cli_train_and_eval(tmp_path, algorithm):
    run = tmp_path / "run"
    assert cli.main(["train", algorithm, "--env", "Pendulum-v1", "--iterations", "2", "--device", "cpu",
                     "--hidden", "16", "16", "--batch-size", "16", "--steps-per-iteration", "100",
                     "--learning-starts", "50", "--eval-episodes", "1", "--run-dir", str(run), "--no-progress"]) == 0
    rows = RunFolder(run).read_metrics()
    assert len(rows) == 2 and rows[-1]["env_steps"] == 200 and "critic_loss" in rows[-1]
    assert cli.main(["eval", str(run), "--episodes", "2", "--seed", "5"]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert -2000 < result["return"] <= 0 and result["iteration"] == 2
    assert cli.main(["archive", str(run), "--to", str(tmp_path / "records")]) == 0
    record = tmp_path / "records" / "run"
    assert not (record / "checkpoints").exists() and (record / "evaluation_state.pt").exists()
    options = {"episodes": 2, "seed": 5}
    assert evaluate_run(record, options) == evaluate_run(run, options)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "td3", "--env", "NoSuchEnv-v0"], "NoSuchEnv-v0"),
        (["train", "sac", "--env", "CartPole-v1"], "CartPole-v1"),
        (["train", "ddpg", "--env", "Pendulum-v1", "--tau", "0"], "tau"),
        (["train", "td3", "--env", "Pendulum-v1", "--batch-size", "0"], "batch_size"),
        (["train", "td3-matt", "--env", "Pendulum-v1", "--lookahead-layers", "head"], "lookahead_layers"),
        (["train", "td3", "--env", "Pendulum-v1", "--policy-noise", "nan"], "policy_noise"),
        (["train", "td3", "--env", "Pendulum-v1", "--noise-clip", "inf"], "noise_clip"),
        (["train", "sac", "--env", "Pendulum-v1", "--alpha", "nan"], "alpha"),
        (["train", "ddpg", "--env", "Pendulum-v1", "--actor-lr", "nan"], "actor_lr"),
        (["train", "td3-matt", "--env", "Pendulum-v1", "--meta-lr", "inf"], "meta_lr"),
    ],
)
def test_cli_bad_input_exits_2_naming_it(tmp_path, capsys, argv, message):
    run = tmp_path / "run"
    assert cli.main([*argv, "--device", "cpu", "--run-dir", str(run), "--no-progress"]) == 2
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_eval_rejects_bad_episodes_and_seeds(tmp_path):
    learner = build("ddpg")
    with pytest.raises(ValueError, match="episodes"):
        learner.evaluate(episodes=0)
    for seed in (-1, 1.5, True):
        with pytest.raises(ValueError, match=f"`seed`.*{seed!r}"):
            learner.evaluate(episodes=1, seed=seed)


class ImageObservations(gym.Env):
    observation_space = gym.spaces.Box(0, 255, (8, 8, 3), np.uint8)
    action_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)


def test_image_observations_are_refused_naming_the_env():
    gym.register("bilevel-test/ImageObservations-v0", entry_point=ImageObservations)
    try:
        with pytest.raises(ValueError, match=r"ImageObservations-v0.*1-D Box.*\(8, 8, 3\)"):
            build("td3", env="bilevel-test/ImageObservations-v0")
    finally:
        gym.registry.pop("bilevel-test/ImageObservations-v0")


def test_a_checkpoint_from_another_device_type_resumes_with_a_warning():
    """A CUDA generator's state (16 bytes) does not fit a CPU generator: loading one restarts the random
    stream from the run's seed and update count, with a warning, instead of failing."""
    trained = build("td3")
    trained.step()
    state = trained.learner_state()
    state["generator"] = torch.zeros(16, dtype=torch.uint8)
    fresh = build("td3")
    with pytest.warns(RuntimeWarning, match="another device type"):
        fresh.load_learner_state(state)
    expected = torch.Generator().manual_seed(derive_seed(0, trained.updates, SEED_PURPOSES["generator"]))
    assert torch.equal(torch.rand(4, generator=fresh.generator), torch.rand(4, generator=expected))
    fresh.load_learner_state(trained.learner_state())
    assert torch.equal(fresh.generator.get_state(), trained.generator.get_state())


def learn_pendulum(algorithm, seed=0, budget=20_000):
    """Train until the evaluation return reaches -250 or ``budget`` env steps; the best return and time."""
    config = make_config(algorithm, {"env": "Pendulum-v1", "seed": seed, "device": "cpu", "iterations": budget // 1000,
                                     "learning_starts": 1000, "batch_size": 128, "actor_lr": 1e-3, "critic_lr": 1e-3,
                                     "eval_episodes": 5})
    learner = _build(algorithm, config)
    start, best = time.perf_counter(), -np.inf
    while learner.env_steps < budget and best < -250:
        best = max(best, learner.step()["return"])
        learner.iteration += 1
    return best, learner.env_steps, time.perf_counter() - start


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["td3", "td3-matt-dt"])
def test_learns_pendulum_within_20k_steps(algorithm):
    best, steps, seconds = learn_pendulum(algorithm)
    print(f"{algorithm}: best evaluation return {best:.1f} after {steps} env steps in {seconds:.0f} s")
    assert best >= -250


# --- the update equations of TD3 and SAC, in float64 --------------------------------------------------------------


class ThreeDimActions(gym.Env):
    """Never stepped: only its spaces are read, to build a learner with ``act_dim = 3``."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (4,), np.float64)
    action_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float64)


@pytest.fixture
def three_dim_actions():
    gym.register("bilevel-test/ThreeDimActions-v0", entry_point=ThreeDimActions)
    yield "bilevel-test/ThreeDimActions-v0"
    gym.registry.pop("bilevel-test/ThreeDimActions-v0")


def random_batch(learner, n=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return Transitions(
        obs=torch.randn(n, learner.obs_dim, generator=generator),
        actions=torch.rand(n, learner.act_dim, generator=generator) * 2 - 1,
        rewards=torch.randn(n, generator=generator), next_obs=torch.randn(n, learner.obs_dim, generator=generator),
        terminated=torch.rand(n, generator=generator) < 0.25, truncated=torch.rand(n, generator=generator) < 0.25)


def perturbed(params, seed, scale=0.1):
    """``params`` moved off the online networks, so that a target computed from the online ones shows."""
    generator = torch.Generator().manual_seed(seed)
    return {name: value + scale * torch.randn(value.shape, generator=generator) for name, value in params.items()}


def copy_of(generator):
    """A generator that continues from ``generator``'s current state: it replays the draws the learner makes next."""
    replay = torch.Generator()
    replay.set_state(generator.get_state())
    return replay


def critic_update_recording_targets(learner, batch, monkeypatch):
    """Run the learner's real critic update on ``batch``; the regression target ``y`` ``[B]`` it used (the ``target``
    of every ``mse_loss`` call, the same for both critics) and its loss."""
    targets = []
    mse_loss = torch.nn.functional.mse_loss

    def recording_mse_loss(prediction, target, *args, **kwargs):
        targets.append(target.detach().clone())
        return mse_loss(prediction, target, *args, **kwargs)

    critic_before = {name: value.detach().clone() for name, value in learner.critic.named_parameters()}
    monkeypatch.setattr(torch.nn.functional, "mse_loss", recording_mse_loss)
    loss = learner.critic_update(batch)["critic_loss"]
    monkeypatch.undo()
    assert len(targets) == 2 and torch.equal(targets[0], targets[1])  # twin critics regress on one target
    q1, q2 = functional_call(learner.critic, critic_before, (batch.obs, batch.actions))
    assert torch.allclose(loss, ((q1 - targets[0]) ** 2).mean() + ((q2 - targets[0]) ** 2).mean(), rtol=1e-12)
    return targets[0]


def td3_learner(**overrides):
    learner = build("td3", **overrides)
    learner.actor_target = perturbed(learner.actor_target, seed=1, scale=0.3)
    learner.critic_target = perturbed(learner.critic_target, seed=2, scale=0.3)
    return learner


@pytest.mark.parametrize(("policy_noise", "noise_clip"), [(0.2, 0.5), (10.0, 0.25)])
def test_td3_critic_target_smooths_the_target_action_with_clipped_noise(float64, monkeypatch, policy_noise,
                                                                       noise_clip):
    """Fujimoto et al. 2018, eq. 14-15: y = r + gamma (1 - d) min_i Q'_i(s', a~'), a~' = clip(mu'(s') + clip(sigma~ eps,
    -c, c), -1, 1), eps ~ N(0, 1) the draw from the learner's generator; with sigma~ >> c the noise sits at +-c."""
    learner = td3_learner(policy_noise=policy_noise, noise_clip=noise_clip)
    batch = random_batch(learner)
    seen_actions = []
    hook = learner.critic.register_forward_hook(lambda module, inputs, output: seen_actions.append(inputs[1].clone()))
    replay = copy_of(learner.generator)
    target = critic_update_recording_targets(learner, batch, monkeypatch)
    hook.remove()

    mean_next = functional_call(learner.actor, learner.actor_target, (batch.next_obs,))
    eps = torch.randn(mean_next.shape, generator=replay)
    smoothing = (policy_noise * eps).clamp(-noise_clip, noise_clip)
    next_actions = (mean_next + smoothing).clamp(-1.0, 1.0)
    assert torch.allclose(seen_actions[0], next_actions, rtol=0, atol=1e-12)  # the target critics' action
    q1_next, q2_next = functional_call(learner.critic, learner.critic_target, (batch.next_obs, next_actions))
    expected = batch.rewards + 0.99 * (~batch.terminated) * torch.minimum(q1_next, q2_next)
    assert torch.allclose(target, expected, rtol=1e-12, atol=1e-12)

    interior = (mean_next + smoothing).abs() < 1
    assert interior.sum() > 10 and (~interior).sum() > 0  # both the noise clip and the action clip are exercised
    if policy_noise > noise_clip * 4:
        clipped = (policy_noise * eps).abs() > noise_clip
        assert clipped.float().mean() > 0.9
        assert torch.allclose((next_actions - mean_next)[interior & clipped].abs(),
                              torch.tensor(noise_clip), rtol=0, atol=1e-12)
    else:
        assert (smoothing.abs() < noise_clip).float().mean() > 0.9
    assert ((next_actions - mean_next).abs() <= noise_clip + 1e-12).all()


def test_td3_delays_the_actor_and_every_target_to_each_dth_update(float64):
    """Fujimoto et al. 2018, Alg. 1: the critics step on every update; the actor and the Polyak targets (actor's and
    critics') only on every d-th, and then each target moves to (1 - tau) target + tau online, online after its step."""
    learner = build("td3", policy_frequency=3, tau=0.25)
    batch = random_batch(learner, n=200)
    learner.buffer.add(batch.obs, batch.actions, batch.rewards, batch.next_obs, batch.terminated, batch.truncated)

    def snapshot():
        trees = {"actor": parameters(learner.actor), "critic": parameters(learner.critic),
                 "actor_target": learner.actor_target, "critic_target": learner.critic_target}
        return {part: {name: value.detach().clone() for name, value in params.items()}
                for part, params in trees.items()}

    def changed(before, after):
        return [not torch.equal(before[name], after[name]) for name in before]

    before = snapshot()
    for update in range(1, 8):
        learner.gradient_update()
        after = snapshot()
        assert learner.updates == update
        assert all(changed(before["critic"], after["critic"])), update
        delayed = update % 3 == 0
        for part in ("actor", "actor_target", "critic_target"):
            assert changed(before[part], after[part]) == [delayed] * len(before[part]), (update, part)
        if delayed:
            for online, target in (("actor", "actor_target"), ("critic", "critic_target")):
                for name, old in before[target].items():
                    assert torch.allclose(after[target][name], 0.75 * old + 0.25 * after[online][name],
                                          rtol=1e-12, atol=1e-14), (update, name)
        before = after


def target_critic_values(learner, batch, replay):
    """``(Q'_1(s', a'), Q'_2(s', a'), entropy bonus)`` ``[B]`` of the critic target, ``a'`` (and SAC's
    ``log pi(a'|s')``) drawn from ``replay``, a copy of the learner's generator taken before its critic update;
    the bonus ``-alpha log pi(a'|s')`` with the current ``alpha`` for SAC, zero for TD3."""
    with torch.no_grad():
        if hasattr(learner, "log_alpha"):
            policy = functional_call(learner.actor, dict(learner.actor.named_parameters()), (batch.next_obs,))
            next_actions, next_log_probs = policy.rsample_with_log_prob(generator=replay)
            bonus = -learner.log_alpha.exp() * next_log_probs
        else:
            mean_next = functional_call(learner.actor, learner.actor_target, (batch.next_obs,))
            smoothing = (learner.config.policy_noise * torch.randn(mean_next.shape, generator=replay)).clamp(
                -learner.config.noise_clip, learner.config.noise_clip)
            next_actions = (mean_next + smoothing).clamp(-1.0, 1.0)
            bonus = torch.zeros_like(batch.rewards)
        q1_next, q2_next = functional_call(learner.critic, learner.critic_target, (batch.next_obs, next_actions))
    return q1_next, q2_next, bonus


def sac_learner(**overrides):
    learner = build("sac", **overrides)
    learner.critic_target = perturbed(learner.critic_target, seed=2, scale=0.3)
    with torch.no_grad():
        learner.log_alpha.fill_(math.log(0.7))  # the temperature has moved off its initial `alpha` = 0.2
    return learner


def test_sac_critic_target_subtracts_the_current_alpha_times_log_pi(float64, monkeypatch):
    """Haarnoja et al. 2018b, eq. 3 and 5: y = r + gamma (1 - d) (min_i Q'_i(s', a') - alpha log pi(a'|s')),
    a' ~ pi(.|s') drawn from the learner's generator, alpha the current temperature exp(log_alpha)."""
    learner = sac_learner()
    batch = random_batch(learner)
    replay = copy_of(learner.generator)
    target = critic_update_recording_targets(learner, batch, monkeypatch)
    q1_next, q2_next, bonus = target_critic_values(learner, batch, replay)
    not_terminal = (~batch.terminated).to(batch.rewards.dtype)
    expected = batch.rewards + 0.99 * not_terminal * (torch.minimum(q1_next, q2_next) + bonus)
    assert torch.allclose(target, expected, rtol=1e-12, atol=1e-12)
    without_bonus = batch.rewards + 0.99 * not_terminal * torch.minimum(q1_next, q2_next)
    initial_alpha = batch.rewards + 0.99 * not_terminal * (torch.minimum(q1_next, q2_next) + bonus * 0.2 / 0.7)
    assert (target - without_bonus).abs().max() > 1e-2 and (target - initial_alpha).abs().max() > 1e-2


@pytest.mark.parametrize("algorithm", ["td3", "sac"])
def test_twin_critic_target_takes_the_smaller_target_critic(float64, monkeypatch, algorithm):
    """Clipped double Q (Fujimoto et al. 2018, eq. 10): the target bootstraps on min(Q'_1, Q'_2) of the target critics,
    not their max nor Q'_1 alone (the batch has states where each differs)."""
    learner = td3_learner() if algorithm == "td3" else sac_learner()
    batch = random_batch(learner)
    replay = copy_of(learner.generator)
    target = critic_update_recording_targets(learner, batch, monkeypatch)
    q1_next, q2_next, bonus = target_critic_values(learner, batch, replay)
    assert 0.1 < (q1_next < q2_next).double().mean() < 0.9  # either target critic is the smaller on some states
    not_terminal = (~batch.terminated).to(batch.rewards.dtype)
    candidates = {name: batch.rewards + 0.99 * not_terminal * (q_next + bonus) for name, q_next in
                  {"min": torch.minimum(q1_next, q2_next), "max": torch.maximum(q1_next, q2_next),
                   "q1": q1_next, "q2": q2_next}.items()}
    assert torch.allclose(target, candidates["min"], rtol=1e-12, atol=1e-12)
    for name in ("max", "q1", "q2"):
        assert (target - candidates[name]).abs().max() > 1e-3, name


@pytest.mark.parametrize(("log_std", "entropy_above_target"), [(-4.0, False), (0.0, True)])
def test_sac_temperature_step_follows_eq_18(float64, three_dim_actions, log_std, entropy_above_target):
    """Haarnoja et al. 2018b, eq. 18: L(alpha) = -mean log_alpha (log pi(a|s) + H_target), H_target = -|A|, a ~ pi(.|s)
    drawn after the actor step. Its gradient -mean(log pi + H_target) = H - H_target (H = -mean log pi): one Adam step
    raises alpha when the policy's entropy is below the target and lowers it when above."""
    learner = build("sac", env=three_dim_actions, alpha=0.3, alpha_lr=0.01)
    assert learner.act_dim == 3 and learner.target_entropy == -3.0
    with torch.no_grad():  # mean from the network, log_std set: a narrow (H < -3) or a wide (H > -3) policy
        learner.actor.head.weight[3:] = 0.0
        learner.actor.head.bias[3:] = log_std
    obs = torch.randn(64, 4, generator=torch.Generator().manual_seed(3))
    replay = copy_of(learner.generator)
    log_alpha = learner.log_alpha.item()
    metrics = learner.actor_update(obs)

    torch.randn(64, 3, generator=replay)  # the actor step's reparameterisation noise
    with torch.no_grad():
        _, log_probs = learner.actor(obs).rsample_with_log_prob(generator=replay)
    entropy = -log_probs.mean()
    assert torch.allclose(metrics["entropy"], entropy, rtol=1e-12)
    gradient = -(log_probs - 3.0).mean()
    assert torch.allclose(learner.log_alpha.grad, gradient, rtol=1e-12)
    assert bool(entropy > -3.0) == entropy_above_target
    # Adam's first step is lr * g / (|g| + eps): the temperature moves by alpha_lr against the gradient's sign
    assert learner.log_alpha.item() == pytest.approx(log_alpha - 0.01 * math.copysign(1.0, gradient.item()), abs=1e-8)
    assert (learner.log_alpha.item() < log_alpha) == entropy_above_target
    assert torch.allclose(metrics["alpha"], learner.log_alpha.detach().exp())
