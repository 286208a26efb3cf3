"""Per-task episode batches for on-policy meta-RL on a task family.

What MAML-TRPO and BO-MRL share: episodes of a Gaussian policy on ``N`` tasks of a family
(2-D navigation stepped as one torch batch; the families with ``make_batched_env``, the
HalfCheetah ones, as one `BatchedHalfCheetah` over all tasks' episodes; the other MuJoCo
families through Gymnasium vector envs, one per task), per-task advantages, the
before/after-adaptation evaluation on held-out tasks, and the learner that holds the policy,
its seeds and its state (`PolicyGradientLearner`).

Shape convention: ``N`` tasks, ``T`` steps (the horizon), ``B`` episodes per task, ``D`` and
``A`` the observation and action sizes; per-task tensors are time-major ``[T, B, ...]`` and
stacked over tasks ``[N, T, B, ...]``. The horizon is part of the task (finite-horizon
returns, as in pytorch-maml-rl): an episode cut at the horizon is not bootstrapped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from bilevel import tree
from bilevel.envs import BatchedNavigation2D, goals_tensor, make_family
from bilevel.nets import GaussianMLPPolicy
from bilevel.rl.baseline import fit_linear_baseline, linear_baseline_values
from bilevel.rl.collect import collect_episodes, make_vector_env
from bilevel.rl.returns import discounted_returns, gae
from bilevel.rl.surrogates import standardize
from bilevel.rl.trajectories import Trajectories
from bilevel.runs.learner import Learner, derive_seed
from bilevel.tree import Tree

__all__ = [
    "DEFAULT_HORIZONS",
    "HELD_OUT_TASKS_KEY",
    "NAVIGATION",
    "SEED_PURPOSES",
    "Behaviour",
    "PolicyGradientLearner",
    "PolicyGradientSettings",
    "TaskData",
    "TaskEpisodes",
    "TaskSampler",
    "action_distribution",
    "adaptation_returns",
    "behaviour_of",
    "episode_ends",
    "held_out_tasks",
    "policy_actions",
    "sample_batched_tasks",
    "sample_gym_tasks",
    "sample_navigation",
    "space_sizes",
    "standardized_advantages",
    "task_data",
]

NAVIGATION = "navigation-2d"
DEFAULT_HORIZONS = {NAVIGATION: 100, "halfcheetah-vel": 200, "halfcheetah-dir": 200, "ant-dir": 200}
"""pytorch-maml-rl's horizons: 100 steps for 2-D navigation, 200 for the MuJoCo tasks."""
HELD_OUT_TASKS_KEY = 7_919
"""Seeds the held-out tasks of the evaluations (the same for every training seed)."""
SEED_PURPOSES = {"tasks": 0, "actions": 1, "train_envs": 2, "valid_envs": 3}
"""An iteration's seeds: ``derive_seed(seed, iteration, SEED_PURPOSES[purpose])`` for its tasks, its
actions and the environments of its two collections (`PolicyGradientLearner`)."""


@dataclasses.dataclass
class PolicyGradientSettings:
    """The on-policy meta-learners' shared config fields: episodes, advantages, the Gaussian MLP policy
    and the collection. A config lists it before ``TRPOSettings`` and ``RunConfig`` among its bases, so
    that its `validate` runs and then passes on."""

    horizon: int = 0
    """Steps per episode; 0 takes the family's (100 for navigation-2d, 200 for the MuJoCo tasks)."""
    gamma: float = 0.99
    """Discount factor of the advantages."""
    gae_lambda: float = 1.0
    """GAE lambda (1: discounted returns minus the baseline)."""
    hidden: tuple[int, ...] = (64, 64)
    """Hidden sizes of the tanh MLP that gives the Gaussian policy's mean."""
    init_log_std: float = 0.0
    """Initial log standard deviation of the policy (state-independent)."""
    num_envs: int = 0
    """MuJoCo families: sub-environments per task; 0 means episodes_per_task."""
    asynchronous: bool = False
    """MuJoCo families: step the sub-environments of Gymnasium vector envs in worker processes."""
    batched_envs: bool = True
    """HalfCheetah families: step all tasks' episodes as one `BatchedHalfCheetah` (false: Gymnasium vector
    envs, one per task; ``asynchronous`` also selects those)."""

    def validate(self) -> None:
        for name in ("horizon", "num_envs"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)}")
        for name in ("gamma", "gae_lambda"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"`{name}` must lie in [0, 1]; got {getattr(self, name)}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"`hidden` must be one or more sizes >= 1; got {self.hidden}")
        parent = super()
        if hasattr(parent, "validate"):
            parent.validate()

    @property
    def episode_horizon(self) -> int:
        """``horizon``, or the family's default when it is 0."""
        return self.horizon or DEFAULT_HORIZONS[self.env]  # type: ignore[attr-defined]


class TaskEpisodes(NamedTuple):
    """Whole episodes of ``N`` tasks, one per column: ``obs``/``next_obs`` ``[N, T, B, D]``,
    ``actions`` ``[N, T, B, A]``, ``rewards`` ``[N, T, B]``, ``valid`` ``[N, T, B]`` bool (False
    after an episode's end), ``time`` ``[N, T, B]`` int64 (``t`` on valid steps)."""

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    valid: Tensor
    time: Tensor

    def episode_returns(self) -> Tensor:
        """Undiscounted return of every episode, ``[N, B]``."""
        return (self.rewards * self.valid).sum(dim=1)


class TaskData(NamedTuple):
    """What a policy-gradient loss reads: ``obs`` ``[.., T, B, D]``, ``actions`` ``[.., T, B, A]``,
    standardised ``advantages`` and ``valid`` ``[.., T, B]``; a leading ``[N]`` when stacked."""

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    valid: Tensor


class Behaviour(NamedTuple):
    """The policy that collected a batch, at that batch's states: ``log_probs`` ``[.., T, B]`` of the
    actions taken, ``mean`` and ``log_std`` ``[.., T, B, A]``."""

    log_probs: Tensor
    mean: Tensor
    log_std: Tensor


def episode_ends(valid: Tensor) -> Tensor:
    """``[T, ...]`` bool, True at the last valid step of each column: ``valid_t and not valid_{t+1}``."""
    next_valid = torch.cat([valid[1:], torch.zeros_like(valid[:1])])
    return valid & ~next_valid


def standardized_advantages(episodes: TaskEpisodes, gamma: float, gae_lambda: float) -> Tensor:
    """One task's advantages ``[T, B]``: GAE (Schulman et al. 2016, eq. 16) over the linear feature
    baseline ``V(s, t)`` fitted to this batch's discounted returns, standardised over valid steps.

    Every episode end is terminal (finite horizon): ``G_t = sum_{l < T - t} gamma^l r_{t+l}``."""
    ends = episode_ends(episodes.valid)
    not_cut = torch.zeros_like(ends)
    returns = discounted_returns(
        episodes.rewards, ends, not_cut, torch.zeros_like(episodes.rewards), gamma, episodes.valid
    )
    weights = fit_linear_baseline(episodes.obs, returns, episodes.time, episodes.valid)
    values = linear_baseline_values(weights, episodes.obs, episodes.time)
    next_values = linear_baseline_values(weights, episodes.next_obs, episodes.time + 1)
    advantages = gae(episodes.rewards, values, next_values, ends, not_cut, gamma, gae_lambda, episodes.valid)
    return standardize(advantages, episodes.valid)


def task_data(episodes: TaskEpisodes, gamma: float, gae_lambda: float) -> TaskData:
    """`TaskData` of every task of ``episodes`` (``[N, ...]``), advantages computed per task in one vmap."""
    advantages = vmap(standardized_advantages, in_dims=(0, None, None))(episodes, gamma, gae_lambda)
    return TaskData(episodes.obs, episodes.actions, advantages, episodes.valid)


def action_distribution(policy: nn.Module, params: Tree, obs: Tensor) -> Any:
    """``pi_params(. | obs)``, a ``DiagGaussian`` with batch shape ``obs.shape[:-1]``."""
    return functional_call(policy, params, (obs,))


def behaviour_of(policy: nn.Module, params: Tree, batch: TaskData) -> Behaviour:
    """The per-task policies (tree with a leading ``[N]``) at their batch's states, detached."""

    def one_task(task_params: Tree, obs: Tensor, actions: Tensor) -> Behaviour:
        distribution = action_distribution(policy, task_params, obs)
        return Behaviour(distribution.log_prob(actions), distribution.mean, distribution.log_std)

    with torch.no_grad():
        return vmap(one_task)(tree.detach(params), batch.obs, batch.actions)


def policy_actions(
    policy: nn.Module, params: Tree, obs: Tensor, generator: torch.Generator | None, per_task: bool
) -> Tensor:
    """Actions at ``obs`` ``[N, ..., D]``: ``mean + std * eps`` (the mean when ``generator`` is None);
    ``params`` has a leading ``[N]`` when ``per_task``."""

    def mean_and_std(task_params: Tree, task_obs: Tensor) -> tuple[Tensor, Tensor]:
        distribution = action_distribution(policy, task_params, task_obs)
        return distribution.mean, distribution.stddev

    with torch.no_grad():
        mean, std = vmap(mean_and_std)(params, obs) if per_task else mean_and_std(params, obs)
        if generator is None:
            return mean
        return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)


def sample_navigation(
    policy: nn.Module,
    params: Tree,
    goals: Tensor,
    episodes: int,
    horizon: int,
    generator: torch.Generator | None,
    *,
    per_task: bool,
) -> TaskEpisodes:
    """``episodes`` episodes on each goal of ``goals`` ``[N, 2]``, all tasks stepped as one batch by
    `BatchedNavigation2D`; ``generator=None`` takes the mean action."""
    env = BatchedNavigation2D(num_envs_per_task=episodes, horizon=horizon)
    obs = env.reset(goals)
    steps: dict[str, list[Tensor]] = {"obs": [], "actions": [], "rewards": [], "next_obs": []}
    for _ in range(horizon):
        actions = policy_actions(policy, params, obs, generator, per_task)
        next_obs, rewards, _, _ = env.step(actions)
        for name, value in zip(steps, (obs, actions, rewards, next_obs), strict=True):
            steps[name].append(value)
        obs = next_obs
    stacked = {name: torch.stack(values, dim=1) for name, values in steps.items()}
    valid = torch.ones_like(stacked["rewards"], dtype=torch.bool)
    time = torch.arange(horizon, device=goals.device)[None, :, None].expand_as(valid)
    return TaskEpisodes(**stacked, valid=valid, time=time)


def _zero_padded(value: Tensor, horizon: int) -> Tensor:
    """``value`` ``[T, ...]`` followed by zeros to ``[horizon, ...]``."""
    return torch.cat([value, value.new_zeros((horizon - value.shape[0], *value.shape[1:]))])


def _pad_time(batch: Trajectories, horizon: int) -> TaskEpisodes:
    """One task's episodes with the time axis padded by invalid zero steps to ``horizon``."""
    return TaskEpisodes(*(_zero_padded(getattr(batch, name), horizon) for name in TaskEpisodes._fields))


def sample_gym_tasks(
    family: Any,
    tasks: list[Any],
    policy: nn.Module,
    params: Tree,
    episodes: int,
    horizon: int,
    generator: torch.Generator | None,
    *,
    per_task: bool,
    env_seed: int,
    num_envs: int,
    asynchronous: bool = False,
    device: torch.device | str = "cpu",
) -> TaskEpisodes:
    """``episodes`` episodes per task with `collect_episodes` on a vector env of ``num_envs`` copies of
    ``family.make_env(task)`` (a loop over tasks); task ``i`` resets with seeds from ``env_seed + i * 10^6``."""

    batches = []
    for task_index, task in enumerate(tasks):
        task_params = tree.map(lambda leaf, i=task_index: leaf[i], params) if per_task else params

        def policy_fn(obs: Tensor, task_params: Tree = task_params) -> tuple[Tensor, None]:
            return policy_actions(policy, task_params, obs, generator, per_task=False), None

        envs = make_vector_env(
            functools.partial(family.make_env, task, max_episode_steps=horizon), num_envs, asynchronous=asynchronous
        )
        try:
            batch = collect_episodes(
                envs, policy_fn, episodes, horizon=horizon, seed=env_seed + task_index * TASK_SEED_STRIDE, device=device
            )
        finally:
            envs.close()
        batches.append(_pad_time(batch, horizon))
    return TaskEpisodes(*(torch.stack(values) for values in zip(*batches, strict=True)))


def _floats(array: np.ndarray, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(array), device=device).to(torch.get_default_dtype())


TASK_SEED_STRIDE = 10**6
"""Task ``i``'s episode ``b`` resets with seed ``env_seed + i * TASK_SEED_STRIDE + b`` on both collection paths."""


def sample_batched_tasks(
    family: Any,
    tasks: list[Any],
    policy: nn.Module,
    params: Tree,
    episodes: int,
    horizon: int,
    generator: torch.Generator | None,
    *,
    per_task: bool,
    env_seed: int,
    num_envs: int,
    device: torch.device | str = "cpu",
) -> TaskEpisodes:
    """``episodes`` episodes per task on one ``family.make_batched_env`` of ``N * C`` envs (``C =
    min(num_envs, episodes)`` columns per task), all tasks stepped together; ``ceil(episodes / C)``
    rounds of ``horizon`` steps. Episode ``b`` of task ``i`` resets with seed ``env_seed + i * 10^6 + b``,
    as in `sample_gym_tasks`, so both paths start from the same states and give the same rewards for
    the same actions (mean actions: ``generator=None``); stochastic actions are drawn ``[N, C, A]``
    per step, in another order than `sample_gym_tasks`'s, so those batches agree in distribution only."""
    device = torch.device(device)
    count, columns = len(tasks), min(num_envs, episodes)
    envs = family.make_batched_env([task for task in tasks for _ in range(columns)], max_episode_steps=horizon)
    rounds = []
    try:
        for first in range(0, episodes, columns):
            seeds = [env_seed + i * TASK_SEED_STRIDE + first + j for i in range(count) for j in range(columns)]
            obs = _floats(envs.reset(seed=seeds)[0], device)
            running = torch.ones(count * columns, dtype=torch.bool, device=device)
            steps: dict[str, list[Tensor]] = {name: [] for name in ("obs", "actions", "rewards", "next_obs", "valid")}
            for _ in range(horizon):
                task_obs = obs.reshape(count, columns, -1)
                actions = policy_actions(policy, params, task_obs, generator, per_task).reshape(count * columns, -1)
                next_obs, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
                next_obs = _floats(next_obs, device)
                for name, value in (
                    ("obs", obs),
                    ("actions", actions),
                    ("next_obs", next_obs),
                    ("valid", running),
                    ("rewards", _floats(rewards, device) * running),
                ):
                    steps[name].append(value)
                running = running & ~torch.as_tensor(terminated | truncated, device=device)
                if not running.any():
                    break
                obs = next_obs
            rounds.append({name: torch.stack(values) for name, values in steps.items()})
    finally:
        envs.close()

    def per_task_columns(value: Tensor) -> Tensor:
        return _zero_padded(value, horizon).reshape(horizon, count, columns, *value.shape[2:]).movedim(1, 0)

    joined = {
        name: torch.cat([per_task_columns(round_[name]) for round_ in rounds], dim=2)[:, :, :episodes]
        for name in rounds[0]
    }
    time = torch.arange(horizon, device=device)[None, :, None].expand_as(joined["valid"])
    return TaskEpisodes(**joined, time=time * joined["valid"])


def space_sizes(env: str, family: Any) -> tuple[int, int]:
    """``(D, A)``, the flat observation and action sizes of ``env``'s tasks."""
    if env == NAVIGATION:
        return 2, 2
    instance = family.make_env(family.sample_tasks(1, np.random.default_rng(0))[0])
    sizes = math.prod(instance.observation_space.shape), math.prod(instance.action_space.shape)
    instance.close()
    return sizes


def held_out_tasks(family: Any, count: int, key: int = HELD_OUT_TASKS_KEY) -> list[Any]:
    """``count`` tasks from a generator seeded by ``key``, which no training iteration uses; both
    directions for the direction families (two tasks, so train and test coincide)."""
    if hasattr(family, "test_tasks"):
        return family.test_tasks()
    return family.sample_tasks(count, np.random.default_rng(derive_seed(key)))


@dataclasses.dataclass(frozen=True)
class TaskSampler:
    """Episodes of ``policy`` on tasks of ``env``'s ``family``, ``horizon`` steps each: navigation as
    one torch batch on ``device``; families with ``make_batched_env`` as one batched env over all tasks
    (`sample_batched_tasks`) unless ``batched_envs`` is False or ``asynchronous``; the other MuJoCo
    families on Gymnasium vector envs (`sample_gym_tasks`). ``num_envs`` is the number of envs per
    task (0: one per episode)."""

    env: str
    family: Any
    policy: nn.Module
    horizon: int
    device: torch.device
    num_envs: int = 0
    asynchronous: bool = False
    batched_envs: bool = True

    @property
    def uses_batched_env(self) -> bool:
        """Whether MuJoCo episodes are collected by `sample_batched_tasks`."""
        return (
            self.env != NAVIGATION
            and self.batched_envs
            and not self.asynchronous
            and hasattr(self.family, "make_batched_env")
        )

    def __call__(
        self,
        tasks: list[Any],
        params: Tree,
        generator: torch.Generator | None,
        *,
        per_task: bool,
        env_seed: int,
        episodes: int,
    ) -> TaskEpisodes:
        """``episodes`` episodes per task of ``params`` (one tree, or one per task with a leading ``[N]``
        when ``per_task``); ``generator=None`` takes the mean action."""
        if self.env == NAVIGATION:
            goals = goals_tensor(tasks, device=self.device)
            return sample_navigation(self.policy, params, goals, episodes, self.horizon, generator, per_task=per_task)
        if self.uses_batched_env:
            sample_tasks = sample_batched_tasks
        else:
            sample_tasks = functools.partial(sample_gym_tasks, asynchronous=self.asynchronous)
        return sample_tasks(
            self.family,
            tasks,
            self.policy,
            params,
            episodes,
            self.horizon,
            generator,
            per_task=per_task,
            env_seed=env_seed,
            num_envs=self.num_envs or episodes,
            device=self.device,
        )


Adaptation = Callable[[Tree, TaskEpisodes], Tree]
"""``(meta_params, episodes of N tasks) -> adapted params with a leading [N]``."""


def adaptation_returns(
    sample: TaskSampler,
    tasks: list[Any],
    meta_params: Tree,
    adapt: Adaptation,
    *,
    episodes: int,
    generator: torch.Generator,
    env_seed: int,
) -> dict[str, float]:
    """Mean undiscounted return on ``tasks`` before and after one adaptation.

    Per task: ``episodes`` stochastic episodes of the meta-policy (the adaptation data), the
    adaptation on them, then stochastic and deterministic (mean-action) episodes of the
    meta-policy and of the adapted policy, reported separately: ``return_{before,after}_{stochastic,
    deterministic}`` over all tasks, and the same keys with ``_task{i}`` for task ``i`` alone (so
    that, on HalfCheetah-dir, the forward and the backward task can be told apart)."""
    before = sample(tasks, meta_params, generator, per_task=False, env_seed=env_seed, episodes=episodes)
    adapted = tree.detach(adapt(meta_params, before))
    after = sample(tasks, adapted, generator, per_task=True, env_seed=env_seed + 1, episodes=episodes)
    before_mean_action = sample(tasks, meta_params, None, per_task=False, env_seed=env_seed + 2, episodes=episodes)
    after_mean_action = sample(tasks, adapted, None, per_task=True, env_seed=env_seed + 3, episodes=episodes)
    result = {"tasks": float(len(tasks))}
    for name, batch in (("return_before_stochastic", before), ("return_after_stochastic", after),
                        ("return_before_deterministic", before_mean_action),
                        ("return_after_deterministic", after_mean_action)):
        per_task = batch.episode_returns().mean(dim=1)
        result[name] = float(per_task.mean())
        result.update({f"{name}_task{i}": float(value) for i, value in enumerate(per_task)})
    return result


class PolicyGradientLearner(Learner):
    """What the on-policy meta-learners (MAML-TRPO, neural BO-MRL) share. From a config with the
    `PolicyGradientSettings` and ``episodes_per_task``: the task ``family`` of ``config.env``, a
    `GaussianMLPPolicy` ``policy`` whose ``meta_params`` are the learner's state, and its `TaskSampler`
    ``sampler``. An iteration's tasks, actions and environments are seeded by `SEED_PURPOSES`, so two
    such learners see the same tasks at every iteration for the same seed; the evaluation is
    `adaptation_returns` on `held_out_tasks`."""

    def __init__(self, config: Any, device: torch.device) -> None:
        super().__init__(config, device)
        self.family = make_family(config.env)
        obs_dim, act_dim = space_sizes(config.env, self.family)
        self.policy = GaussianMLPPolicy(obs_dim, act_dim, hidden=tuple(config.hidden),
                                        init_log_std=config.init_log_std).to(device)
        self.meta_params = tree.detach(tree.params_of(self.policy))
        self.sampler = TaskSampler(config.env, self.family, self.policy, config.episode_horizon, device,
                                   config.num_envs, config.asynchronous, config.batched_envs)

    def sample(self, tasks: list[Any], params: Tree, generator: torch.Generator | None, *, per_task: bool,
               env_seed: int, episodes: int | None = None) -> TaskEpisodes:
        """Episodes of ``params`` (one tree, or one per task when ``per_task``) on ``tasks``,
        ``config.episodes_per_task`` of them unless ``episodes`` is given."""
        return self.sampler(tasks, params, generator, per_task=per_task, env_seed=env_seed,
                            episodes=episodes or self.config.episodes_per_task)

    def _seed(self, purpose: str) -> int:
        return derive_seed(self.config.seed, self.iteration, SEED_PURPOSES[purpose])

    def held_out_tasks(self, count: int) -> list[Any]:
        """``count`` tasks from a generator no training iteration uses; both directions for the
        direction families (two tasks, so train and test coincide)."""
        return held_out_tasks(self.family, count)

    def evaluate_adaptation(self, adapt: Adaptation, tasks: int, adaptation_steps: int, episodes: int | None,
                            seed: int) -> dict[str, float]:
        """`adaptation_returns` of ``adapt`` (``adaptation_steps`` steps, reported with the horizon) on
        ``tasks`` held-out tasks, ``episodes`` per task (default ``config.episodes_per_task``), drawn from
        ``seed`` and the config's seed, not from the iteration."""
        episodes = self.config.episodes_per_task if episodes is None else episodes
        for name, value, least in (("tasks", tasks, 1), ("adaptation_steps", adaptation_steps, 0),
                                   ("episodes", episodes, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < least:
                raise ValueError(f"`{name}` must be an int >= {least}; got {value!r}")
        generator = torch.Generator(self.device).manual_seed(derive_seed(self.config.seed, seed, HELD_OUT_TASKS_KEY))
        result = adaptation_returns(self.sampler, self.held_out_tasks(tasks), self.meta_params, adapt,
                                    episodes=episodes, generator=generator,
                                    env_seed=derive_seed(seed, HELD_OUT_TASKS_KEY))
        return {**result, "adaptation_steps": float(adaptation_steps), "horizon": float(self.config.episode_horizon)}

    def learner_state(self) -> dict[str, Any]:
        return {"meta_params": tree.map(torch.clone, self.meta_params)}

    def load_learner_state(self, state: dict[str, Any]) -> None:
        tree.check_same_structure(state["meta_params"], self.meta_params, ("saved meta_params", "meta_params"))
        self.meta_params = tree.map(lambda saved: saved.to(self.device), state["meta_params"])

    def evaluation_state(self) -> dict[str, Any]:
        """The meta-policy: the whole learner state, which is all that `evaluate` reads."""
        return self.learner_state()

    def load_evaluation_state(self, state: dict[str, Any]) -> None:
        self.load_learner_state(state)
