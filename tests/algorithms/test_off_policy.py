"""The shared off-policy loop and DDPG, TD3, SAC: replay across autoresets, critic targets, resume,
the CLI, and TD3 learning Pendulum."""

import json
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
