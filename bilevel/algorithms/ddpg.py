"""DDPG (Lillicrap et al. 2016, Alg. 1) on the shared off-policy loop.

    y = r + gamma (1 - terminated) Q'(s', mu'(s'))               critic target (Alg. 1)
    L_critic(theta) = mean (Q_theta(s, a) - y)^2
    L_actor(phi)    = -mean Q_theta(s, mu_phi(s))                  (MATT paper, eq. 4)
    a = clip(mu_phi(s) + N(0, sigma^2), -1, 1)                     exploration

with Gaussian exploration noise instead of Ornstein-Uhlenbeck, as in Fujimoto et al.'s DDPG and
CleanRL, and target networks moved by Polyak averaging after every actor step.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.algorithms.off_policy import OffPolicyConfig, OffPolicyLearner, adam, apply, clone_target
from bilevel.nets import DeterministicActor, QCritic
from bilevel.rl import Transitions
from bilevel.runs import register
from bilevel.tree import Tree

__all__ = ["DDPG", "DDPGConfig"]


@dataclasses.dataclass
class DDPGConfig(OffPolicyConfig):
    """DDPG: a deterministic actor and one critic."""

    exploration_noise: float = 0.1
    """Std of the Gaussian noise added to the actor's action in [-1, 1] units."""

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.exploration_noise < math.inf:
            raise ValueError(f"`exploration_noise` must be finite and >= 0; got {self.exploration_noise}")


@register("ddpg")
class DDPG(OffPolicyLearner):
    """DDPG (Lillicrap et al. 2016) with Gaussian exploration on any Gymnasium Box env."""

    Config = DDPGConfig
    config: DDPGConfig

    def make_critic(self) -> torch.nn.Module:
        return QCritic(self.obs_dim, self.act_dim, self.config.hidden)

    def build(self) -> None:
        self.actor = DeterministicActor(self.obs_dim, self.act_dim, self.config.hidden).to(self.device)
        self.critic = self.make_critic().to(self.device)
        self.actor_target = clone_target(self.actor)
        self.critic_target = clone_target(self.critic)
        self.actor_optimizer = adam(self.actor.parameters(), self.config.actor_lr)
        self.critic_optimizer = adam(self.critic.parameters(), self.config.critic_lr)

    def mean_action(self, output: Tensor) -> Tensor:
        return output

    def exploring_action(self, output: Tensor) -> Tensor:
        noise = torch.randn(output.shape, generator=self.generator, device=output.device, dtype=output.dtype)
        return (output + self.config.exploration_noise * noise).clamp(-1.0, 1.0)

    def target_actions(self, next_obs: Tensor) -> Tensor:
        """``mu'(s')``, ``[B, A]``."""
        return apply(self.actor, self.actor_target, next_obs)

    def target_q(self, next_obs: Tensor) -> Tensor:
        """``Q'(s', mu'(s'))``, ``[B]``."""
        return apply(self.critic, self.critic_target, next_obs, self.target_actions(next_obs))

    def critic_loss(self, critic_params: Tree, batch: Transitions) -> Tensor:
        with torch.no_grad():
            not_terminal = 1.0 - batch.terminated.to(batch.rewards.dtype)
            target = batch.rewards + self.config.gamma * not_terminal * self.target_q(batch.next_obs)
        q_values = apply(self.critic, critic_params, batch.obs, batch.actions)
        if isinstance(q_values, tuple):
            return sum(F.mse_loss(q, target) for q in q_values)
        return F.mse_loss(q_values, target)

    def loss_of_output(self, output: Tensor, obs: Tensor, noise: Tensor | None) -> Tensor:
        """``-mean Q1(s, a)`` for the actions ``output [B, A]``."""
        return -self.q1(self.critic_constants(), obs, output).mean()

    def loss_of_output_with_q1_features(self, output: Tensor, obs: Tensor, noise: Tensor | None,
                                        q1_features: Tensor) -> Tensor:
        """``-mean head(Q_bar(s, a))``: `loss_of_output` from the critic features of ``a = output``."""
        return -self.q1_of_features(self.critic_constants(), q1_features).mean()
