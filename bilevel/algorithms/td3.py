"""TD3 (Fujimoto et al. 2018, Alg. 1): DDPG with twin critics, target policy smoothing and delayed
actor updates.

    a~' = clip(mu'(s') + clip(N(0, sigma~^2), -c, c), -1, 1)      target policy smoothing (eq. 14)
    y   = r + gamma (1 - terminated) min_i Q'_i(s', a~')           clipped double Q (eq. 10)
    L_critic = sum_i mean (Q_i(s, a) - y)^2
    every d critic updates: L_actor(phi) = -mean Q_1(s, mu_phi(s)), then Polyak targets
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from bilevel.algorithms.ddpg import DDPG, DDPGConfig
from bilevel.algorithms.off_policy import apply
from bilevel.nets import TwinQCritic
from bilevel.runs import register

__all__ = ["TD3", "TD3Config"]


@dataclasses.dataclass
class TD3Config(DDPGConfig):
    """TD3: DDPG's loop with twin critics, target smoothing and a delayed actor (CleanRL's defaults)."""

    policy_frequency: int = 2
    """Critic updates per actor (and target) update, ``d``."""
    policy_noise: float = 0.2
    """Std of the target policy smoothing noise, ``sigma~``."""
    noise_clip: float = 0.5
    """Clip of the target smoothing noise, ``c``."""

    def validate(self) -> None:
        super().validate()
        if not (0 <= self.policy_noise < math.inf and 0 <= self.noise_clip < math.inf):
            raise ValueError(f"`policy_noise` and `noise_clip` must be finite and >= 0; got {self.policy_noise} "
                             f"and {self.noise_clip}")


@register("td3")
class TD3(DDPG):
    """TD3 (Fujimoto et al. 2018) on any Gymnasium Box env."""

    Config = TD3Config
    config: TD3Config

    def make_critic(self) -> torch.nn.Module:
        return TwinQCritic(self.obs_dim, self.act_dim, self.config.hidden)

    def target_actions(self, next_obs: Tensor) -> Tensor:
        actions = apply(self.actor, self.actor_target, next_obs)
        noise = torch.randn(actions.shape, generator=self.generator, device=actions.device, dtype=actions.dtype)
        smoothing = (self.config.policy_noise * noise).clamp(-self.config.noise_clip, self.config.noise_clip)
        return (actions + smoothing).clamp(-1.0, 1.0)

    def target_q(self, next_obs: Tensor) -> Tensor:
        q1, q2 = apply(self.critic, self.critic_target, next_obs, self.target_actions(next_obs))
        return torch.minimum(q1, q2)
