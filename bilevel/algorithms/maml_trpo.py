"""MAML-TRPO: model-agnostic meta-learning with a policy-gradient inner step and a TRPO outer step.

Finn et al. 2017 ("Model-Agnostic Meta-Learning for Fast Adaptation of Deep Networks", Alg. 3),
with the outer step of Schulman et al. 2015 (TRPO), as in pytorch-maml-rl. Per meta-iteration,
for a batch of ``N`` tasks ``T_i``:

    D_i   = B episodes of pi_theta on T_i                                   (train batch)
    theta'_i(theta) = unroll(L_REINFORCE(.; D_i), theta, sgd(alpha), K)     (Finn et al. 2017, eq. 1)
    D'_i  = B episodes of pi_{theta'_i} on T_i                              (validation batch)
    L(theta)  = mean_i -mean_{D'_i}[ pi_{theta'_i(theta)}(a|s) / pi_old,i(a|s) * A_i ]
    KL(theta) = mean_i  mean_{D'_i}[ KL(pi_old,i(.|s) || pi_{theta'_i(theta)}(.|s)) ]
    theta <- trpo_step(L, KL, theta)                                        (Schulman et al. 2015, App. C)

where ``pi_old,i`` is the adapted policy that collected ``D'_i`` (a constant). ``L`` and ``KL``
recompute the adaptation, so the meta-gradient and the Fisher-vector products differentiate
through it (second order unless ``first_order``). The adaptation and both objectives are one
``torch.func.vmap`` over the task axis. Sampling, advantages and the evaluation protocol are
shared with BO-MRL in `bilevel.rl.meta_batches`. Advantages are GAE over a linear feature baseline fitted
per task and batch, standardised per task. The horizon is part of the task (finite-horizon
returns, as in pytorch-maml-rl): an episode cut at the horizon is not bootstrapped.

Shape convention: ``N`` tasks, ``T`` steps (the horizon), ``B`` episodes per task, ``D`` and
``A`` the observation and action sizes; per-task tensors are time-major ``[T, B, ...]`` and
stacked over tasks ``[N, T, B, ...]``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torchopt
from torch import Tensor, nn
from torch.func import vmap

from bilevel import tree
from bilevel.inner import unroll
from bilevel.nets import gaussian_kl
from bilevel.rl import importance_weighted_loss, masked_mean, reinforce_loss
from bilevel.rl.meta_batches import (
    NAVIGATION,
    Behaviour,
    PolicyGradientLearner,
    PolicyGradientSettings,
    TaskData,
    TaskEpisodes,
    action_distribution,
    behaviour_of,
    sample_gym_tasks,
    sample_navigation,
    standardized_advantages,
    task_data,
)
from bilevel.runs import RunConfig, register
from bilevel.tree import Tree
from bilevel.trpo import TRPOSettings, trpo_step

__all__ = [
    "MAMLTRPO",
    "Behaviour",
    "InnerLoop",
    "MAMLTRPOConfig",
    "TaskData",
    "TaskEpisodes",
    "adapt",
    "adapt_tasks",
    "behaviour_of",
    "meta_objectives",
    "sample_gym_tasks",
    "sample_navigation",
    "standardized_advantages",
    "task_data",
]


class InnerLoop(NamedTuple):
    """The adaptation ``theta' = unroll(L_REINFORCE, theta, sgd(lr), steps)`` of one task."""

    policy: nn.Module
    lr: float
    steps: int
    first_order: bool = False


def adapt(meta_params: Tree, train: TaskData, inner: InnerLoop) -> Tree:
    """``theta'`` after ``inner.steps`` SGD steps on one task's REINFORCE loss
    ``-mean_valid[log pi_theta(a|s) A]`` (Finn et al. 2017, eq. 1, repeated on the same batch)."""

    def inner_loss(params: Tree) -> Tensor:
        log_probs = action_distribution(inner.policy, params, train.obs).log_prob(train.actions)
        return reinforce_loss(log_probs, train.advantages, train.valid)

    return unroll(inner_loss, meta_params, torchopt.sgd(inner.lr), inner.steps, first_order=inner.first_order)


def adapt_tasks(meta_params: Tree, train: TaskData, inner: InnerLoop) -> Tree:
    """`adapt` for every task of ``train`` (``[N, ...]``) in one vmap: a tree with a leading ``[N]``."""
    return vmap(adapt, in_dims=(None, 0, None))(meta_params, train, inner)


def task_surrogate_loss(meta_params: Tree, train: TaskData, valid: TaskData, behaviour: Behaviour,
                        inner: InnerLoop) -> Tensor:
    """``-mean_valid[pi_{theta'}(a|s) / pi_old(a|s) * A]`` on one task's validation batch, ``theta'`` adapted
    from ``meta_params`` on its train batch."""
    adapted_params = adapt(meta_params, train, inner)
    log_probs = action_distribution(inner.policy, adapted_params, valid.obs).log_prob(valid.actions)
    return importance_weighted_loss(log_probs, behaviour.log_probs, valid.advantages, valid.valid)


def task_kl(meta_params: Tree, train: TaskData, valid: TaskData, behaviour: Behaviour, inner: InnerLoop) -> Tensor:
    """``mean_valid KL(pi_old(.|s) || pi_{theta'}(.|s))`` over one task's validation states."""
    adapted_params = adapt(meta_params, train, inner)
    distribution = action_distribution(inner.policy, adapted_params, valid.obs)
    kl = gaussian_kl(behaviour.mean, behaviour.log_std, distribution.mean, distribution.log_std)
    return masked_mean(kl, valid.valid)


def meta_objectives(train: TaskData, valid: TaskData, behaviour: Behaviour,
                    inner: InnerLoop) -> tuple[Callable[[Tree], Tensor], Callable[[Tree], Tensor]]:
    """``(L, KL)``, the outer loss and mean KL as functions of the meta-parameters, each the mean over
    tasks of one vmapped per-task computation; what `trpo_step` takes."""
    in_dims = (None, 0, 0, 0, None)

    def meta_loss(meta_params: Tree) -> Tensor:
        return vmap(task_surrogate_loss, in_dims=in_dims)(meta_params, train, valid, behaviour, inner).mean()

    def meta_kl(meta_params: Tree) -> Tensor:
        return vmap(task_kl, in_dims=in_dims)(meta_params, train, valid, behaviour, inner).mean()

    return meta_loss, meta_kl


@dataclasses.dataclass
class MAMLTRPOConfig(PolicyGradientSettings, TRPOSettings, RunConfig):
    """MAML-TRPO with pytorch-maml-rl's defaults (episodes, advantages, policy and collection:
    `PolicyGradientSettings`)."""

    env: str = NAVIGATION
    """The task family: navigation-2d, halfcheetah-vel, halfcheetah-dir or ant-dir."""
    iterations: int = 500
    """Meta-iterations (pytorch-maml-rl's num-batches)."""
    meta_batch_size: int = 40
    """Tasks sampled per meta-iteration."""
    episodes_per_task: int = 20
    """Episodes per task in the train batch and again in the validation batch."""
    inner_lr: float = 0.1
    """The inner SGD learning rate alpha."""
    inner_steps: int = 1
    """Inner SGD steps on the train batch."""
    first_order: bool = False
    """Treat the inner gradients as constants (first-order MAML)."""

    def validate(self) -> None:
        super().validate()
        positive = ("meta_batch_size", "episodes_per_task", "inner_steps")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        if not self.inner_lr > 0:
            raise ValueError(f"`inner_lr` must be > 0; got {self.inner_lr}")


@register("maml-trpo")
class MAMLTRPO(PolicyGradientLearner):
    """MAML-TRPO (Finn et al. 2017) on 2-D navigation, HalfCheetah velocity/direction and Ant direction
    (family, policy, sampling, seeds and state: `PolicyGradientLearner`)."""

    Config = MAMLTRPOConfig
    envs = (NAVIGATION, "halfcheetah-vel", "halfcheetah-dir", "ant-dir")
    config: MAMLTRPOConfig

    def inner_loop(self, steps: int | None = None, first_order: bool | None = None) -> InnerLoop:
        """The config's `InnerLoop`, with ``steps`` and ``first_order`` overridable."""
        return InnerLoop(self.policy, self.config.inner_lr, self.config.inner_steps if steps is None else steps,
                         self.config.first_order if first_order is None else first_order)

    def step(self) -> dict[str, float]:
        config = self.config
        tasks = self.family.sample_tasks(config.meta_batch_size, np.random.default_rng(self._seed("tasks")))
        generator = torch.Generator(self.device).manual_seed(self._seed("actions"))
        inner = self.inner_loop()

        train_episodes = self.sample(tasks, self.meta_params, generator, per_task=False,
                                     env_seed=self._seed("train_envs"))
        train = task_data(train_episodes, config.gamma, config.gae_lambda)
        adapted_params = tree.detach(adapt_tasks(self.meta_params, train, inner))
        valid_episodes = self.sample(tasks, adapted_params, generator, per_task=True,
                                     env_seed=self._seed("valid_envs"))
        valid = task_data(valid_episodes, config.gamma, config.gae_lambda)
        behaviour = behaviour_of(self.policy, adapted_params, valid)

        meta_loss, meta_kl = meta_objectives(train, valid, behaviour, inner)
        self.meta_params, info = trpo_step(meta_loss, meta_kl, self.meta_params, **config.trpo_options())
        self.env_steps += int(train_episodes.valid.sum()) + int(valid_episodes.valid.sum())
        return_before = float(train_episodes.episode_returns().mean())
        return_after = float(valid_episodes.episode_returns().mean())
        return {"return": return_after, "return_before": return_before, "return_after": return_after,
                **info.metrics()}

    def evaluate(self, tasks: int = 40, adaptation_steps: int | None = None, episodes: int | None = None,
                 seed: int = 0) -> dict[str, float]:
        """Mean undiscounted return on held-out tasks before and after adaptation.

        Per task: ``episodes`` stochastic episodes of the meta-policy (the adaptation data),
        ``adaptation_steps`` inner SGD steps on them (default: the config's ``inner_steps``), then
        stochastic and deterministic (mean-action) episodes of the meta-policy and the adapted
        policy, reported separately."""
        adaptation_steps = self.config.inner_steps if adaptation_steps is None else adaptation_steps
        inner = self.inner_loop(steps=adaptation_steps)

        def adapt_all(meta_params: Tree, episodes: TaskEpisodes) -> Tree:
            return adapt_tasks(meta_params, task_data(episodes, self.config.gamma, self.config.gae_lambda), inner)

        return self.evaluate_adaptation(adapt_all, tasks, adaptation_steps, episodes, seed)
