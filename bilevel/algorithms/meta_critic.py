"""Online Meta-Critic (Zhou et al. 2020), the baseline MATT was compared with, over DDPG, TD3 and SAC.

A learned auxiliary loss ``h_omega`` on the actor features is added to the actor's loss, and
``omega`` is meta-learned by the same one-step look-ahead as MATT (`LookAheadMetaLearner`)::

    L_aux(phi, omega) = mean softplus(h_omega(pi_bar(s)))                          (Zhou et al. 2020, eq. 5)
    phi_old = phi - eta grad L_actor(phi; d_trn)
    phi_new = phi_old - eta grad L_aux(phi_old, omega; d_trn)
    L_meta(omega) = tanh(L_actor(phi_new; d_val) - L_actor(phi_old; d_val))         (eq. 4, the utility negated)
    actor step on grad (L_actor + L_aux)(phi)

The authors' code takes eq. 9's auxiliary gradient at ``phi`` (the learned loss is evaluated before the
first look-ahead step) rather than at ``phi_old``, a first-order difference in ``eta``.

``h_omega`` is the authors' 128 -> 256 -> 128 -> 1 MLP (the MATT authors' ``Meta_Critic``). Watch
``meta_loss``, ``meta_grad_norm`` and ``meta_net_norm``: with the authors' Adam (1e-4, weight decay 1e-4 added
to the gradient) a meta-gradient far below ``1e-4 * omega`` lets the decay drive ``omega`` to zero, after which
``meta_loss`` is exactly 0 and the learned loss no longer reaches the actor.
"""

from __future__ import annotations

import dataclasses

import torch.nn.functional as F
from torch import Tensor, nn

from bilevel.algorithms.ddpg import DDPG
from bilevel.algorithms.meta_attention import LookAheadConfig, LookAheadMetaLearner, make_variant
from bilevel.algorithms.off_policy import apply
from bilevel.algorithms.sac import SAC
from bilevel.algorithms.td3 import TD3
from bilevel.nets import mlp
from bilevel.tree import Tree

__all__ = ["MetaCritic", "MetaCriticConfig"]


@dataclasses.dataclass
class MetaCriticConfig(LookAheadConfig):
    """Meta-Critic's fields, on top of its base algorithm's."""

    meta_hidden: tuple[int, ...] = (256, 128)
    """Hidden sizes of the learned loss h_omega (authors: actor features -> 256 -> 128 -> 1)."""

    def validate(self) -> None:
        super().validate()
        if not self.meta_hidden or min(self.meta_hidden) < 1:
            raise ValueError(f"`meta_hidden` must be positive sizes; got {self.meta_hidden}")


class MetaCritic(LookAheadMetaLearner):
    """Online Meta-Critic (Zhou et al. 2020) over its base algorithm."""

    def make_meta_net(self) -> nn.Module:
        return mlp((self.config.hidden[-1], *self.config.meta_hidden, 1), nn.ReLU)

    def auxiliary_loss(self, actor_params: Tree, meta_params: Tree, obs: Tensor, noise: Tensor | None) -> Tensor:
        return self.learned_loss(meta_params, self.actor_features(actor_params, obs))

    def learned_loss(self, meta_params: Tree, features: Tensor) -> Tensor:
        """``mean softplus(h_omega(pi_bar(s)))`` of the actor features ``[B, F]``."""
        return F.softplus(apply(self.meta_net, meta_params, features)).mean()

    def actor_and_auxiliary_losses(self, actor_params: Tree, meta_params: Tree, obs: Tensor,
                                   noise: Tensor | None) -> tuple[Tensor, Tensor]:
        features = self.actor_features(actor_params, obs)
        vanilla = self.loss_of_output(self.actor_output(actor_params, obs, None, features), obs, noise)
        return vanilla, self.learned_loss(meta_params, features)


for _name, _base in (("ddpg", DDPG), ("td3", TD3), ("sac", SAC)):
    make_variant(f"{_name}-mc", MetaCritic, MetaCriticConfig, _base)
