"""The off-policy actor-critic loop that DDPG, TD3 and SAC (and their meta-learners) plug into.

One iteration (`OffPolicyLearner.step`) is::

    make fresh training envs and reset them with seeds derived from (seed, iteration)
    until steps_per_iteration transitions are stored:
        a ~ uniform[-1, 1]^A before learning_starts, else the algorithm's exploring action
        s', r, terminated, truncated = envs.step(rescale(a) to the env's Box bounds)
        store (s, a, r, s', terminated, truncated), dropping next-step autoreset steps
        one gradient update per stored transition once learning_starts transitions exist:
            critic update on a batch; every policy_frequency updates the actor update, on a batch
            of its own, and the Polyak targets
    evaluate the deterministic policy on separate envs

The actor's batch is a second draw from the replay, where Fujimoto et al.'s TD3 and CleanRL reuse the
critic's: the same distribution, with one more sample per actor update (MATT's validation batch is a third).

The critic target bootstraps on truncation and stops only on termination (Fujimoto et al. 2018,
eq. 10 with ``d = terminated``). The training envs are reset at every iteration boundary and the
last transition of each unfinished episode is stored as truncated, so an iteration is a pure
function of the learner state and the iteration's seed: a run resumed from a checkpoint equals
an uninterrupted one exactly on CPU, with no environment state to save (Gymnasium envs, Box2D
ones in particular, cannot be pickled). The envs are made anew each iteration because a seeded
reset does not clear all of an env's state: BipedalWalker keeps its ``Box2D.b2World`` across
resets, and its trajectories after ``reset(seed=s)`` depend on the episodes before. Choose
``steps_per_iteration`` as a multiple of the time limit (Pendulum 200, MuJoCo and LunarLander 1000,
BipedalWalker 1600): then an env whose episodes always run to the limit (Pendulum) is never cut. Where
episodes end early (a landing, a fall) the iteration's last episode usually is cut: it is stored as
truncated, so its critic targets bootstrap as at a time limit, but the replay holds fewer late-episode
states than a loop that carries its envs across iterations would, and ``train_return`` (finished
episodes only) leans towards short episodes.

Actions live in [-1, 1] inside the learner (actors end in tanh) and are rescaled to the env's
bounds only when sent to the env. All randomness (random steps, exploration noise, target
smoothing noise, replay sampling) comes from one ``torch.Generator`` that the checkpoint saves.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import Tensor, nn
from torch.func import functional_call

from bilevel import tree
from bilevel.nets import rescale_action
from bilevel.nets.common import subtree
from bilevel.rl import ReplayBuffer, Transitions, make_vector_env
from bilevel.runs import Learner, RunConfig, derive_seed
from bilevel.tree import Tree

__all__ = [
    "OffPolicyConfig",
    "OffPolicyLearner",
    "adam",
    "apply",
    "check_box_env_id",
    "clone_target",
    "evaluate_policy",
    "parameters",
    "polyak",
]

SEED_PURPOSES = {"train_envs": 0, "eval_envs": 1, "generator": 2}


def check_box_env_id(env_id: str) -> None:
    """Raise ``ValueError`` naming ``env_id`` unless Gymnasium knows it."""
    try:
        gym.spec(env_id)
    except gym.error.Error as error:
        raise ValueError(f"unknown Gymnasium env {env_id!r}: {error}") from None


def make_box_env(env_id: str) -> gym.Env:
    """``gym.make(env_id)``; a missing dependency, or a space other than a 1-D Box, is a ``ValueError``."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as error:
        raise ValueError(f"cannot make env {env_id!r}: {error}") from None
    spaces = (env.observation_space, env.action_space)
    if not all(isinstance(space, gym.spaces.Box) and len(space.shape) == 1 for space in spaces):
        env.close()
        raise ValueError(f"env {env_id!r} must have 1-D Box observation and action spaces (vectors, not images); "
                         f"got {spaces[0]} and {spaces[1]}")
    return env


_SLOTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[str, dict[str, Any], str], ...]] = weakref.WeakKeyDictionary()


def _parameter_slots(module: nn.Module) -> tuple[tuple[str, dict[str, Any], str], ...]:
    """``(name, owner._parameters, attribute)`` for every parameter of ``module``, cached per module."""
    slots = _SLOTS.get(module)
    if slots is None:
        slots = tuple((f"{prefix}.{attribute}" if prefix else attribute, owner._parameters, attribute)
                      for prefix, owner in module.named_modules() for attribute in owner._parameters)
        _SLOTS[module] = slots
    return slots


def parameters(module: nn.Module, *, detach: bool = False) -> dict[str, Tensor]:
    """``dict(module.named_parameters())`` (detached views with ``detach``) read from the cached parameter
    slots: the same tree as `bilevel.tree.params_of` without its walk over the module tree, which costs
    more than the detach of every leaf."""
    if detach:
        return {name: table[attribute].detach() for name, table, attribute in _parameter_slots(module)}
    return {name: table[attribute] for name, table, attribute in _parameter_slots(module)}


def apply(module: nn.Module, params: Tree, *inputs: Any) -> Any:
    """``module(*inputs)`` evaluated with the parameter tree ``params``: ``torch.func.functional_call``
    (without tied weights) when ``params`` names other entries than the module's parameters; otherwise
    the tensors are put into the modules' parameter slots for the call and restored after it, which
    costs a few microseconds instead of functional_call's module-tree walk, more than these small
    networks' forward pass."""
    slots = _parameter_slots(module)
    if len(slots) != len(params) or any(name not in params for name, _, _ in slots):
        return functional_call(module, params, inputs, tie_weights=False)
    saved = [table[attribute] for _, table, attribute in slots]
    try:
        for name, table, attribute in slots:
            table[attribute] = params[name]
        return module(*inputs)
    finally:
        for (_, table, attribute), value in zip(slots, saved, strict=True):
            table[attribute] = value


def adam(params: Iterable[Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """``torch.optim.Adam`` over ``params``, fused (one kernel for all tensors, without the foreach
    implementation's per-tensor ``.item()`` of the step count; 2-3x faster on these small networks, equal
    up to floating-point rounding) where this torch and the parameters' device support it, else foreach."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=True)


def polyak(target: Tree, online: Tree, tau: float) -> Tree:
    """The Polyak-averaged target ``(1 - tau) target + tau online``, leafwise, without gradients
    (Lillicrap et al. 2016, Alg. 1)."""
    with torch.no_grad():
        names = list(target)
        if not names:
            return {}
        averaged = torch._foreach_lerp([target[n] for n in names], [online[n].detach() for n in names], tau)
        return dict(zip(names, averaged, strict=True))


def clone_target(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of ``module``'s parameters: the initial target network."""
    return {name: value.detach().clone() for name, value in module.named_parameters()}


def evaluate_policy(
    env_id: str, act: Callable[[Tensor], Tensor], episodes: int, seed: int, device: torch.device
) -> tuple[np.ndarray, Tensor, Tensor]:
    """Run ``episodes`` episodes in parallel, one per sub-env (sub-env ``i`` reset with ``seed + i``),
    with ``act(obs [E, D]) -> actions [E, A]`` in [-1, 1].

    Returns the undiscounted episode returns ``[episodes]``, every observation the policy saw
    before its episode ended, ``[N, D]`` in time order (for analyses of the policy on its own
    states), and the episode of each, ``[N]`` (long)."""
    envs = make_vector_env(functools.partial(make_box_env, env_id), episodes)
    low, high = (torch.as_tensor(b, dtype=torch.get_default_dtype(), device=device)
                 for b in (envs.single_action_space.low, envs.single_action_space.high))
    try:
        obs_np, _ = envs.reset(seed=seed)
        returns = np.zeros(episodes)
        running = np.ones(episodes, dtype=bool)
        seen, seen_episode = [], []
        while running.any():
            obs = torch.as_tensor(obs_np, dtype=torch.get_default_dtype(), device=device)
            mask = torch.as_tensor(running, device=device)
            seen.append(obs[mask])
            seen_episode.append(torch.arange(episodes, device=device)[mask])
            with torch.no_grad():
                actions = rescale_action(act(obs), low, high)
            obs_np, rewards, terminated, truncated, _ = envs.step(actions.cpu().numpy())
            returns += rewards * running
            running &= ~(terminated | truncated)
    finally:
        envs.close()
    return returns, torch.cat(seen), torch.cat(seen_episode)


@dataclasses.dataclass
class OffPolicyConfig(RunConfig):
    """The shared off-policy loop; defaults follow CleanRL's TD3 with the MATT authors' networks."""

    env: str = "Pendulum-v1"
    """Any Gymnasium env id with Box observation and action spaces."""
    iterations: int = 100
    """The training budget in iterations of ``steps_per_iteration`` env steps."""
    steps_per_iteration: int = 1000
    """Stored transitions per iteration; the training envs reset at iteration boundaries, so make it a
    multiple of the env's time limit."""
    num_envs: int = 1
    """Training envs stepped together (`gymnasium.vector.SyncVectorEnv`)."""
    buffer_size: int = 1_000_000
    """Replay buffer capacity in transitions."""
    learning_starts: int = 10_000
    """Transitions collected with uniform random actions before the first update."""
    batch_size: int = 256
    """Transitions per gradient update."""
    gamma: float = 0.99
    """Discount factor."""
    tau: float = 0.005
    """Polyak averaging rate of the target networks."""
    actor_lr: float = 3e-4
    """Adam learning rate of the actor."""
    critic_lr: float = 3e-4
    """Adam learning rate of the critic(s)."""
    hidden: tuple[int, ...] = (256, 128)
    """Hidden sizes of actor and critic features (MATT authors: 256 -> 128)."""
    policy_frequency: int = 1
    """Critic updates per actor (and target) update."""
    eval_episodes: int = 10
    """Deterministic evaluation episodes at the end of every iteration (0: none)."""

    def validate(self) -> None:
        super().validate()
        check_box_env_id(self.env)
        for name in ("steps_per_iteration", "num_envs", "buffer_size", "batch_size", "policy_frequency"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        if self.learning_starts < 0 or self.eval_episodes < 0:
            raise ValueError(f"`learning_starts` and `eval_episodes` must be >= 0; got "
                             f"{self.learning_starts} and {self.eval_episodes}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"`gamma` must be in [0, 1]; got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"`tau` must be in (0, 1]; got {self.tau}")
        if not (0 < self.actor_lr < math.inf and 0 < self.critic_lr < math.inf):
            raise ValueError(f"`actor_lr` and `critic_lr` must be finite and > 0; got {self.actor_lr} and "
                             f"{self.critic_lr}")
        if not self.hidden or min(self.hidden) < 1:
            raise ValueError(f"`hidden` must be positive sizes; got {self.hidden}")


class OffPolicyLearner(Learner):
    """The loop of the module docstring. A subclass builds ``self.actor`` and ``self.critic`` (modules
    whose parameters are the live trees), their optimisers and targets in `build`, and defines the
    actor's output, its exploring action, the critic target and the actor loss.

    ``self.actor(obs, feature_scale)`` must have ``features`` and ``head`` (`bilevel.nets`), and
    ``self.critic`` be a `QCritic` or `TwinQCritic`; Q1 is the first (or only) critic."""

    Config: ClassVar[type[RunConfig]] = OffPolicyConfig
    envs: ClassVar[tuple[str, ...]] = ()
    config: OffPolicyConfig

    def __init__(self, config: OffPolicyConfig, device: torch.device) -> None:
        super().__init__(config, device)
        probe = make_box_env(config.env)
        self.obs_dim = int(np.prod(probe.observation_space.shape))
        self.act_dim = int(np.prod(probe.action_space.shape))
        space = probe.action_space
        probe.close()
        dtype = torch.get_default_dtype()
        self.action_low = torch.as_tensor(space.low, dtype=dtype, device=device)
        self.action_high = torch.as_tensor(space.high, dtype=dtype, device=device)
        self.buffer = ReplayBuffer(config.buffer_size, (self.obs_dim,), (self.act_dim,), device=device)
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(derive_seed(config.seed, SEED_PURPOSES["generator"]))
        self.updates = 0
        self.build()
        self.twin_critic = hasattr(self.critic, "q1")
        self.q1_module = self.critic.q1 if self.twin_critic else self.critic

    # --- what an algorithm defines -------------------------------------------------------------

    @abc.abstractmethod
    def build(self) -> None:
        """Create ``actor``, ``critic``, their targets and optimisers (and any other state)."""

    @abc.abstractmethod
    def mean_action(self, output: Any) -> Tensor:
        """The deterministic action ``[B, A]`` in [-1, 1] of an actor output."""

    @abc.abstractmethod
    def exploring_action(self, output: Any) -> Tensor:
        """The action ``[B, A]`` in [-1, 1] executed during training, randomness from ``self.generator``."""

    @abc.abstractmethod
    def critic_loss(self, critic_params: Tree, batch: Transitions) -> Tensor:
        """The critic's regression loss on ``batch`` (Fujimoto et al. 2018, eq. 3 of the MATT paper)."""

    @abc.abstractmethod
    def loss_of_output(self, output: Any, obs: Tensor, noise: Tensor | None) -> Tensor:
        """The actor loss (MATT paper, eq. 4) of an actor output on ``obs [B, D]`` (the vanilla output
        ``pi_phi(s)`` or the attention output ``pi'_psi(s)``, eq. 9), with the critic held constant.
        ``noise`` ``[B, A]`` fixes a stochastic actor's reparameterisation noise (None for deterministic
        actors)."""

    def actor_loss(self, actor_params: Tree, obs: Tensor, noise: Tensor | None) -> Tensor:
        """``L_actor(phi)`` on ``obs [B, D]``: `loss_of_output` of ``pi_phi(obs)``."""
        return self.loss_of_output(self.actor_output(actor_params, obs), obs, noise)

    def actor_noise(self, batch_size: int) -> Tensor | None:
        """The reparameterisation noise ``[batch_size, A]`` of one actor-loss evaluation (None: deterministic)."""
        return None

    def after_actor_step(self, obs: Tensor) -> dict[str, Tensor]:
        """Called after every actor step with its batch's observations (SAC tunes its temperature)."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """Algorithm state beyond actor, critic, their targets and optimisers."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore `extra_state`."""

    def extra_evaluation_state(self) -> dict[str, Any]:
        """What `decide` and `analyse` read beyond actor and critic (MATT: the attention net)."""
        return {}

    def load_extra_evaluation_state(self, state: dict[str, Any]) -> None:
        """Restore `extra_evaluation_state`."""

    # --- shared pieces -------------------------------------------------------------------------

    def actor_params(self) -> dict[str, Tensor]:
        """The live actor parameters (the optimiser's leaves) as a tree."""
        return parameters(self.actor)

    def critic_constants(self) -> dict[str, Tensor]:
        """The critic parameters detached: the actor losses treat the critic as fixed."""
        return parameters(self.critic, detach=True)

    def actor_output(self, actor_params: Tree, obs: Tensor, feature_scale: Tensor | None = None,
                     features: Tensor | None = None) -> Any:
        """``pi_phi(obs)`` for ``obs [B, D]``, or with ``feature_scale [B, F]`` the attention actor
        ``head(features(obs) * feature_scale)`` (eq. 5); ``features [B, F]``, when given, are
        `actor_features` of ``obs`` already computed."""
        return apply(self.actor, actor_params, obs, feature_scale, features)

    def actor_features(self, actor_params: Tree, obs: Tensor) -> Tensor:
        """The actor's last hidden features ``pi_bar(s)``, ``[B, F]``."""
        return apply(self.actor.features, subtree(actor_params, "features"), obs)

    def q1(self, critic_params: Tree, obs: Tensor, actions: Tensor) -> Tensor:
        """``Q1(s, a)``, ``[B]``."""
        q1_params = subtree(critic_params, "q1") if self.twin_critic else critic_params
        return apply(self.q1_module, q1_params, obs, actions)

    def q1_features(self, critic_params: Tree, obs: Tensor, actions: Tensor) -> Tensor:
        """The critic's last hidden features ``Q_bar(s, a)``, ``[B, F]``."""
        prefix = "q1.features" if self.twin_critic else "features"
        return apply(self.q1_module.features, subtree(critic_params, prefix), obs, actions)

    def q1_of_features(self, critic_params: Tree, features: Tensor) -> Tensor:
        """``Q1(s, a) = head(Q_bar(s, a))``, ``[B]``, from the features ``Q_bar(s, a)`` ``[B, F]``."""
        prefix = "q1.head" if self.twin_critic else "head"
        return apply(self.q1_module.head, subtree(critic_params, prefix), features).squeeze(-1)

    def loss_of_output_with_q1_features(self, output: Any, obs: Tensor, noise: Tensor | None,
                                        q1_features: Tensor) -> Tensor:
        """`loss_of_output` when ``q1_features = Q_bar(s, mean_action(output))`` ``[B, F]`` are already
        computed; a learner whose loss reads ``Q1`` at the mean action (DDPG, TD3) takes it from them."""
        return self.loss_of_output(output, obs, noise)

    def decide(self, obs: Tensor, explore: bool) -> Tensor:
        """The action ``[B, A]`` in [-1, 1] taken in ``obs [B, D]`` (MATT's dance twice overrides it)."""
        output = self.actor_output(self.actor_params(), obs)
        return self.exploring_action(output) if explore else self.mean_action(output)

    def critic_update(self, batch: Transitions) -> dict[str, Tensor]:
        loss = self.critic_loss(parameters(self.critic), batch)
        self.critic_optimizer.zero_grad()
        loss.backward()
        self.critic_optimizer.step()
        return {"critic_loss": loss.detach()}

    def actor_update(self, obs: Tensor) -> dict[str, Tensor]:
        loss = self.actor_loss(self.actor_params(), obs, self.actor_noise(obs.shape[0]))
        self.actor_optimizer.zero_grad()
        loss.backward()
        self.actor_optimizer.step()
        return {"actor_loss": loss.detach(), **self.after_actor_step(obs)}

    def update_targets(self) -> None:
        self.actor_target = polyak(self.actor_target, self.actor_params(), self.config.tau)
        self.critic_target = polyak(self.critic_target, parameters(self.critic), self.config.tau)

    def gradient_update(self) -> dict[str, Tensor]:
        """One critic update, and every ``policy_frequency`` updates an actor and target update."""
        metrics = self.critic_update(self.buffer.sample(self.config.batch_size, self.generator))
        self.updates += 1
        if self.updates % self.config.policy_frequency == 0:
            obs = self.buffer.sample(self.config.batch_size, self.generator).obs
            metrics |= self.actor_update(obs)
            self.update_targets()
        return metrics

    # --- the Learner interface -----------------------------------------------------------------

    def step(self) -> dict[str, float]:
        train_envs = make_vector_env(functools.partial(make_box_env, self.config.env), self.config.num_envs)
        try:
            row = self._collect_and_learn(train_envs)
        finally:
            train_envs.close()
        if self.config.eval_episodes:
            row |= self.evaluate(episodes=self.config.eval_episodes)
        return row

    def _collect_and_learn(self, train_envs: gym.vector.VectorEnv) -> dict[str, float]:
        """Store ``steps_per_iteration`` transitions from ``train_envs`` (fresh, reset with the iteration's
        seed) with one gradient update per transition after ``learning_starts``; the mean of each update
        metric and the mean return of the finished training episodes."""
        config = self.config
        obs_np, _ = train_envs.reset(seed=derive_seed(config.seed, self.iteration, SEED_PURPOSES["train_envs"]))
        is_reset_step = np.zeros(config.num_envs, dtype=bool)
        episode_return = np.zeros(config.num_envs)
        finished_returns: list[float] = []
        metric_sums: dict[str, Tensor] = {}
        metric_counts: dict[str, int] = {}
        stored = 0
        while stored < config.steps_per_iteration:
            obs = torch.as_tensor(obs_np, dtype=torch.get_default_dtype(), device=self.device)
            with torch.no_grad():
                if self.env_steps < config.learning_starts:
                    actions = torch.rand(obs.shape[0], self.act_dim, generator=self.generator, device=self.device,
                                         dtype=obs.dtype) * 2 - 1
                else:
                    actions = self.decide(obs, explore=True)
            env_actions = rescale_action(actions, self.action_low, self.action_high).cpu().numpy()
            next_obs_np, rewards, terminated, truncated, _ = train_envs.step(env_actions)
            real = ~is_reset_step
            new_transitions = int(real.sum())
            stored += new_transitions
            episode_return = np.where(is_reset_step, 0.0, episode_return + rewards)
            finished_returns += episode_return[(terminated | truncated) & real].tolist()
            if stored >= config.steps_per_iteration:
                truncated = truncated | real
            self.buffer.add_vector_step(obs_np, actions, rewards, next_obs_np, terminated, truncated, is_reset_step)
            is_reset_step = terminated | truncated
            obs_np = next_obs_np
            for _ in range(new_transitions):
                self.env_steps += 1
                if self.env_steps >= config.learning_starts and len(self.buffer) >= config.batch_size:
                    for name, value in self.gradient_update().items():
                        metric_sums[name] = metric_sums.get(name, 0.0) + value
                        metric_counts[name] = metric_counts.get(name, 0) + 1
        row = {name: float(total) / metric_counts[name] for name, total in metric_sums.items()}
        if finished_returns:
            row["train_return"] = float(np.mean(finished_returns))
        return row

    def evaluate(self, episodes: int = 10, seed: int | None = None) -> dict[str, float]:
        """Mean and std of the undiscounted return of ``episodes`` deterministic episodes (sub-env ``i``
        seeded ``seed + i``; by default a seed derived from the run's seed and iteration), plus
        `analyse` of the states visited."""
        if not isinstance(episodes, int) or episodes < 1:
            raise ValueError(f"`episodes` must be a positive integer; got {episodes!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"`seed` must be a non-negative integer; got {seed!r}")
        if seed is None:
            seed = derive_seed(self.config.seed, self.iteration, SEED_PURPOSES["eval_envs"]) % 2**31
        returns, visited, episode = evaluate_policy(self.config.env, functools.partial(self.decide, explore=False),
                                                    episodes, seed, self.device)
        return {"return": float(returns.mean()), "return_std": float(returns.std()),
                **self.analyse(visited, episode)}

    def analyse(self, visited_obs: Tensor, episode: Tensor) -> dict[str, float]:
        """Statistics of the policy on the states ``[N, D]`` visited during evaluation, ``episode [N]``
        the evaluation episode of each (MATT: the Q gap of section 4.3)."""
        return {}

    def learner_state(self) -> dict[str, Any]:
        return {
            "actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
            "actor_target": self.actor_target, "critic_target": self.critic_target,
            "actor_optimizer": self.actor_optimizer.state_dict(),
            "critic_optimizer": self.critic_optimizer.state_dict(),
            "buffer": self.buffer.state_dict(), "generator": self.generator.get_state(),
            "updates": self.updates, "extra": self.extra_state(),
        }

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.actor_target = tree.to(state["actor_target"], self.device)
        self.critic_target = tree.to(state["critic_target"], self.device)
        self.actor_optimizer.load_state_dict(state["actor_optimizer"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.buffer.load_state_dict(state["buffer"])
        self.updates = state["updates"]
        self._restore_generator(state["generator"].cpu())
        self.load_extra_state(state["extra"])

    def _restore_generator(self, saved: Tensor) -> None:
        """Continue the checkpoint's random stream; a CUDA generator's state does not fit a CPU one (nor the
        reverse), so a run moved to another device type restarts the stream from its seed and update count:
        it continues, not bit-identically."""
        if saved.numel() == self.generator.get_state().numel():
            self.generator.set_state(saved)
            return
        warnings.warn(f"the checkpoint's random stream was saved on another device type than {self.device}; "
                      "it restarts from the run's seed and update count, so the run continues but not "
                      "bit-identically", RuntimeWarning, stacklevel=3)
        self.generator.manual_seed(derive_seed(self.config.seed, self.updates, SEED_PURPOSES["generator"]))

    def evaluation_state(self) -> dict[str, Any]:
        """Actor and critic (dance twice and the Q gap read the critic), without targets, optimisers or buffer."""
        return {"actor": self.actor.state_dict(), "critic": self.critic.state_dict(),
                "extra": self.extra_evaluation_state()}

    def load_evaluation_state(self, state: dict[str, Any]) -> None:
        self.actor.load_state_dict(state["actor"])
        self.critic.load_state_dict(state["critic"])
        self.load_extra_evaluation_state(state["extra"])
