"""SAC with automatic entropy tuning (Haarnoja et al. 2018b, Alg. 1) on the shared off-policy loop.

    a', log pi(a'|s') ~ pi_phi(.|s')
    y = r + gamma (1 - terminated) (min_i Q'_i(s', a') - alpha log pi(a'|s'))          (eq. 3, 5)
    L_critic = sum_i mean (Q_i(s, a) - y)^2
    L_actor(phi) = mean (alpha log pi(a~|s) - min_i Q_i(s, a~)),  a~ = tanh(mu + sigma eps)    (eq. 7)
    L(alpha) = -mean log alpha (log pi(a|s) + H_target),  H_target = -|A|                 (eq. 18)

SAC keeps no target actor: only the critics have Polyak targets.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from bilevel.algorithms.off_policy import (
    OffPolicyConfig,
    OffPolicyLearner,
    adam,
    apply,
    clone_target,
    parameters,
    polyak,
)
from bilevel.nets import TanhGaussian, TanhGaussianActor, TwinQCritic, tanh_log_abs_det_jacobian
from bilevel.rl import Transitions
from bilevel.runs import register
from bilevel.tree import Tree

__all__ = ["SAC", "SACConfig", "squashed_action"]


def squashed_action(policy: TanhGaussian, noise: Tensor) -> tuple[Tensor, Tensor]:
    """The reparameterised action ``tanh(mu + sigma eps)`` ``[B, A]`` for given ``eps`` (``noise``) and
    its log-density ``[B]``, so that one actor loss can be evaluated repeatedly at the same sample."""
    pre_tanh = policy.base_dist.mean + policy.base_dist.stddev * noise
    log_prob = policy.base_dist.log_prob(pre_tanh) - tanh_log_abs_det_jacobian(pre_tanh).sum(-1)
    return torch.tanh(pre_tanh), log_prob


@dataclasses.dataclass
class SACConfig(OffPolicyConfig):
    """SAC with twin critics and automatic entropy tuning (CleanRL's defaults)."""

    critic_lr: float = 1e-3
    """Adam learning rate of the critics."""
    alpha: float = 0.2
    """The initial entropy temperature (the fixed one when ``autotune`` is off)."""
    autotune: bool = True
    """Tune alpha to keep the policy's entropy at ``-act_dim`` (Haarnoja et al. 2018b, eq. 18)."""
    alpha_lr: float = 1e-3
    """Adam learning rate of log alpha."""

    def validate(self) -> None:
        super().validate()
        if not (0 < self.alpha < math.inf and 0 < self.alpha_lr < math.inf):
            raise ValueError(f"`alpha` and `alpha_lr` must be finite and > 0; got {self.alpha} and {self.alpha_lr}")


@register("sac")
class SAC(OffPolicyLearner):
    """SAC (Haarnoja et al. 2018b) with automatic entropy tuning on any Gymnasium Box env."""

    Config = SACConfig
    config: SACConfig

    def build(self) -> None:
        config = self.config
        self.actor = TanhGaussianActor(self.obs_dim, self.act_dim, config.hidden).to(self.device)
        self.critic = TwinQCritic(self.obs_dim, self.act_dim, config.hidden).to(self.device)
        self.actor_target: dict[str, Tensor] = {}
        self.critic_target = clone_target(self.critic)
        self.actor_optimizer = adam(self.actor.parameters(), config.actor_lr)
        self.critic_optimizer = adam(self.critic.parameters(), config.critic_lr)
        self.log_alpha = torch.tensor(float(config.alpha), device=self.device).log().requires_grad_(config.autotune)
        self.alpha_optimizer = adam([self.log_alpha], config.alpha_lr)
        self.target_entropy = -float(self.act_dim)

    def mean_action(self, output: TanhGaussian) -> Tensor:
        return output.mode

    def exploring_action(self, output: TanhGaussian) -> Tensor:
        return output.sample(generator=self.generator)

    def actor_noise(self, batch_size: int) -> Tensor:
        return torch.randn(batch_size, self.act_dim, generator=self.generator, device=self.device)

    def critic_loss(self, critic_params: Tree, batch: Transitions) -> Tensor:
        with torch.no_grad():
            next_actions, next_log_probs = self.actor_output(self.actor_params(), batch.next_obs).rsample_with_log_prob(
                generator=self.generator)
            q1_next, q2_next = apply(self.critic, self.critic_target, batch.next_obs, next_actions)
            soft_value = torch.minimum(q1_next, q2_next) - self.log_alpha.exp() * next_log_probs
            not_terminal = 1.0 - batch.terminated.to(batch.rewards.dtype)
            target = batch.rewards + self.config.gamma * not_terminal * soft_value
        q1, q2 = apply(self.critic, critic_params, batch.obs, batch.actions)
        return F.mse_loss(q1, target) + F.mse_loss(q2, target)

    def loss_of_output(self, output: TanhGaussian, obs: Tensor, noise: Tensor) -> Tensor:
        """``mean (alpha log pi(a~|s) - min_i Q_i(s, a~))`` at the reparameterised ``a~`` of ``noise [B, A]``."""
        actions, log_probs = squashed_action(output, noise)
        q1, q2 = apply(self.critic, self.critic_constants(), obs, actions)
        return (self.log_alpha.detach().exp() * log_probs - torch.minimum(q1, q2)).mean()

    def after_actor_step(self, obs: Tensor) -> dict[str, Tensor]:
        if not self.config.autotune:
            return {}
        with torch.no_grad():
            _, log_probs = self.actor_output(self.actor_params(), obs).rsample_with_log_prob(generator=self.generator)
        alpha_loss = -(self.log_alpha * (log_probs + self.target_entropy)).mean()
        self.alpha_optimizer.zero_grad()
        alpha_loss.backward()
        self.alpha_optimizer.step()
        return {"alpha": self.log_alpha.detach().exp(), "entropy": -log_probs.mean()}

    def update_targets(self) -> None:
        self.critic_target = polyak(self.critic_target, parameters(self.critic), self.config.tau)

    def extra_state(self) -> dict[str, Any]:
        return {"log_alpha": self.log_alpha.detach().clone(), "alpha_optimizer": self.alpha_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
        self.alpha_optimizer.load_state_dict(state["alpha_optimizer"])
