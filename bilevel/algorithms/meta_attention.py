"""Meta attention (MATT) for off-policy actor-critic, over DDPG, TD3 and SAC.

The attention net ``f_psi`` reads the actor features ``pi_bar(s)`` (Query) and the critic features
``Q_bar(s, pi(s))`` (Key) and rescales the actor features (Value), which go through the same head::

    scale_psi(s)  = 2 sigmoid(f_psi(concat(pi_bar(s), Q_bar(s, pi_phi(s)))))      in (0, 2)^F
    pi'_psi(s)    = head(pi_bar(s) * scale_psi(s))                                  the attention action (eq. 5)

Per actor update, with a train batch ``d_trn`` and an independent validation batch ``d_val``::

    phi_old = phi - eta grad L_actor(phi; d_trn)                                    (eq. 8)
    phi_new = phi_old - eta grad L_actor(phi_old; d_trn | a = pi'_psi(s))           (eq. 9)
    L_att(psi) = tanh(L_actor(phi_new; d_val) - L_actor(phi_old; d_val))           (eq. 10)
    psi <- Adam(psi, grad_psi L_att)

The two look-ahead steps are `bilevel.inner.unroll` calls (plain SGD at the actor's learning rate),
and ``grad_psi L_att`` differentiates through the second one. The paper leaves open, and the authors'
code decides (Gideon-K-Marx/Meta-Attention-For-Off-Policy-Actor-Critic, ``Code/TD3.py``):

- which actor layers the look-ahead moves: the authors move only the first layer of the feature
  net (``lookahead_layers="first"``); ``"features"`` and ``"all"`` are the alternatives;
- how the actor itself is trained: the authors' actor step takes the vanilla gradient plus the
  gradient of the attention-action loss of eq. 9 (``auxiliary_trains_actor``), not
  ``phi <- phi_new`` as Algorithm 1 writes, and the gradient of ``L_att`` reaches only ``psi``
  (``meta_loss_trains_actor=False``). We take the attention-action gradient at ``phi`` rather than
  at the authors' ``phi_old``, a first-order difference in ``eta``.

Dance twice (section 3.3): at decision time the actor executes whichever of ``pi_phi(s)`` and
``pi'_psi(s)`` has the higher ``Q1`` (SAC: the higher ``Q1`` of the two means, then a sample from the
winner's distribution), then adds its exploration noise. Evaluation reports the mean
``Q1(s, pi'_psi(s)) - Q1(s, pi_phi(s))`` over the states visited (section 4.3).

The same look-ahead trains Meta-Critic's learned loss (`bilevel.algorithms.meta_critic`), so the
loop lives here in `LookAheadMetaLearner`, parameterised by the auxiliary actor loss.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
from typing import Any

import torch
import torchopt
from torch import Tensor, nn

from bilevel import tree
from bilevel.algorithms.ddpg import DDPG
from bilevel.algorithms.off_policy import OffPolicyLearner, apply
from bilevel.algorithms.sac import SAC
from bilevel.algorithms.td3 import TD3
from bilevel.inner import unroll
from bilevel.nets import mlp
from bilevel.runs import Learner, register
from bilevel.tree import Tree

__all__ = [
    "LOOKAHEAD_LAYERS",
    "VARIANTS",
    "LookAheadConfig",
    "LookAheadMetaLearner",
    "MetaAttention",
    "MetaAttentionConfig",
    "choose_by_q",
    "lookahead_split",
    "make_variant",
]

LOOKAHEAD_LAYERS = {"first": ("features.0.",), "features": ("features.",), "all": ("",)}
"""Name prefixes of the actor parameters each ``lookahead_layers`` choice moves."""


def lookahead_split(actor_params: dict[str, Tensor], layers: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split the actor tree into the entries the look-ahead moves and those it holds fixed."""
    prefixes = LOOKAHEAD_LAYERS[layers]
    moved = {name: value for name, value in actor_params.items() if name.startswith(prefixes)}
    return moved, {name: value for name, value in actor_params.items() if name not in moved}


def choose_by_q(q_vanilla: Tensor, q_attention: Tensor) -> Tensor:
    """Dance twice's choice ``[B]`` bool: True where the attention action has the strictly higher Q."""
    return q_attention > q_vanilla


@dataclasses.dataclass
class LookAheadConfig:
    """Fields of a meta-learner trained through a one-step actor look-ahead (MATT, Meta-Critic)."""

    meta_lr: float = 1e-4
    """Adam learning rate of the meta-learner (authors: 1e-4)."""
    meta_weight_decay: float = 1e-4
    """Adam weight decay of the meta-learner (authors: 1e-4)."""
    lookahead_layers: str = "first"
    """Actor layers the look-ahead steps move: first (authors: the feature net's first layer), features or all."""
    auxiliary_trains_actor: bool = True
    """The actor's step adds the gradient of the auxiliary loss (attention-action or learned loss) to the
    vanilla gradient (authors)."""
    meta_loss_trains_actor: bool = False
    """Also add the meta loss's gradient through both look-ahead steps to the moved layers' gradient."""

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        if self.meta_lr <= 0 or self.meta_weight_decay < 0:
            raise ValueError(f"`meta_lr` must be > 0 and `meta_weight_decay` >= 0; got {self.meta_lr} "
                             f"and {self.meta_weight_decay}")
        if self.lookahead_layers not in LOOKAHEAD_LAYERS:
            raise ValueError(f"`lookahead_layers` must be one of {sorted(LOOKAHEAD_LAYERS)}; "
                             f"got {self.lookahead_layers!r}")


@dataclasses.dataclass
class MetaAttentionConfig(LookAheadConfig):
    """MATT's fields (Algorithm 1), on top of its base algorithm's."""

    attention_hidden: tuple[int, ...] = (256, 128)
    """Hidden sizes of the attention net f_psi (authors: (actor + critic features) -> 256 -> 128 -> actor features)."""
    dance_twice: bool = False
    """Execute the attention action when the critic prefers it (the _DT variants, section 3.3)."""

    def validate(self) -> None:
        super().validate()
        if not self.attention_hidden or min(self.attention_hidden) < 1:
            raise ValueError(f"`attention_hidden` must be positive sizes; got {self.attention_hidden}")


class LookAheadMetaLearner(OffPolicyLearner):
    """An off-policy learner whose actor update also trains a meta-net ``omega`` through a one-step
    look-ahead on an auxiliary actor loss ``L_aux(phi, omega)`` (eqs. 8-10). Mixed in before DDPG,
    TD3 or SAC."""

    meta_net: nn.Module

    @abc.abstractmethod
    def make_meta_net(self) -> nn.Module:
        """The meta-learner's network."""

    @abc.abstractmethod
    def auxiliary_loss(self, actor_params: Tree, meta_params: Tree, obs: Tensor, noise: Tensor | None) -> Tensor:
        """The actor loss of the second look-ahead step, eq. 9 (MATT: the attention-action loss)."""

    def build(self) -> None:
        super().build()
        self.meta_net = self.make_meta_net().to(self.device)
        self.meta_optimizer = torch.optim.Adam(self.meta_net.parameters(), lr=self.config.meta_lr,
                                               weight_decay=self.config.meta_weight_decay, foreach=True)

    def meta_loss(
        self,
        meta_params: Tree,
        moved: dict[str, Tensor],
        fixed: dict[str, Tensor],
        train_obs: Tensor,
        val_obs: Tensor,
        train_noise: Tensor | None,
        val_noise: Tensor | None,
    ) -> Tensor:
        """``tanh(L_actor(phi_new; d_val) - L_actor(phi_old; d_val))`` (eq. 10), a scalar differentiable in
        ``meta_params`` and ``moved`` through both SGD look-ahead steps (eqs. 8, 9); ``fixed`` holds the
        actor entries the look-ahead does not move (treated as constants). Batches are ``[B, D]``."""

        def actor(moved_params: Tree) -> Tree:
            return {**fixed, **moved_params}

        step = torchopt.sgd(self.config.actor_lr)
        old = unroll(lambda p: self.actor_loss(actor(p), train_obs, train_noise), moved, step, 1)
        new = unroll(lambda p: self.auxiliary_loss(actor(p), meta_params, train_obs, train_noise), old, step, 1)
        improvement = self.actor_loss(actor(new), val_obs, val_noise) - self.actor_loss(actor(old), val_obs, val_noise)
        return torch.tanh(improvement)

    def actor_update(self, obs: Tensor) -> dict[str, Tensor]:
        config = self.config
        val_obs = self.buffer.sample(config.batch_size, self.generator).obs
        train_noise, val_noise = self.actor_noise(obs.shape[0]), self.actor_noise(obs.shape[0])
        actor_params = self.actor_params()
        meta_params = tree.params_of(self.meta_net)
        moved, fixed = lookahead_split(actor_params, config.lookahead_layers)
        if not config.meta_loss_trains_actor:
            moved = tree.detach(moved)
        meta_loss = self.meta_loss(meta_params, moved, tree.detach(fixed), obs, val_obs, train_noise, val_noise)
        wrt = list(meta_params.values()) + (list(moved.values()) if config.meta_loss_trains_actor else [])
        meta_grads = torch.autograd.grad(meta_loss, wrt)

        actor_loss = self.actor_loss(actor_params, obs, train_noise)
        total = actor_loss
        if config.auxiliary_trains_actor:
            total = total + self.auxiliary_loss(actor_params, tree.detach(meta_params), obs, train_noise)
        self.actor_optimizer.zero_grad()
        total.backward()
        for param, grad in zip(moved.values() if config.meta_loss_trains_actor else (),
                               meta_grads[len(meta_params):], strict=True):
            param.grad += grad
        self.actor_optimizer.step()

        for param, grad in zip(meta_params.values(), meta_grads[: len(meta_params)], strict=True):
            param.grad = grad
        self.meta_optimizer.step()
        return {"actor_loss": actor_loss.detach(), "meta_loss": meta_loss.detach(), **self.after_actor_step(obs)}

    def extra_state(self) -> dict[str, Any]:
        return {"base": super().extra_state(), "meta_net": self.meta_net.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        super().load_extra_state(state["base"])
        self.meta_net.load_state_dict(state["meta_net"])
        self.meta_optimizer.load_state_dict(state["meta_optimizer"])


class MetaAttention(LookAheadMetaLearner):
    """MATT over its base algorithm (the class after it in the MRO)."""

    def make_meta_net(self) -> nn.Module:
        actor_features, critic_features = self.config.hidden[-1], self.config.hidden[-1]
        return mlp((actor_features + critic_features, *self.config.attention_hidden, actor_features), nn.ReLU)

    def attention_scale(self, attention_params: Tree, actor_params: Tree, obs: Tensor) -> Tensor:
        """``2 sigmoid(f_psi(pi_bar(s), Q_bar(s, pi_phi(s))))``, ``[B, F]`` in (0, 2) (eq. 5); the critic is
        held constant, ``pi_phi(s)`` is the deterministic action (SAC: ``tanh(mean)``)."""
        features = self.actor_features(actor_params, obs)
        actions = self.mean_action(apply(self.actor, actor_params, obs))
        critic_features = self.q1_features(self.critic_constants(), obs, actions)
        logits = apply(self.meta_net, attention_params, torch.cat([features, critic_features], dim=-1))
        return 2.0 * torch.sigmoid(logits)

    def auxiliary_loss(self, actor_params: Tree, meta_params: Tree, obs: Tensor, noise: Tensor | None) -> Tensor:
        return self.actor_loss(actor_params, obs, noise, functools.partial(self.attention_scale, meta_params))

    def vanilla_and_attention_actions(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The deterministic vanilla and attention actions ``[B, A]`` and the feature scale ``[B, F]``."""
        actor_params = self.actor_params()
        scale = self.attention_scale(tree.params_of(self.meta_net), actor_params, obs)
        vanilla = self.mean_action(apply(self.actor, actor_params, obs))
        attended = self.mean_action(apply(self.actor, actor_params, obs, scale))
        return vanilla, attended, scale

    def decide(self, obs: Tensor, explore: bool) -> Tensor:
        if not self.config.dance_twice:
            return super().decide(obs, explore)
        vanilla, attended, scale = self.vanilla_and_attention_actions(obs)
        critic = self.critic_constants()
        prefer_attention = choose_by_q(self.q1(critic, obs, vanilla), self.q1(critic, obs, attended))
        chosen_scale = torch.where(prefer_attention[:, None], scale, torch.ones_like(scale))
        output = apply(self.actor, self.actor_params(), obs, chosen_scale)
        return self.exploring_action(output) if explore else self.mean_action(output)

    def analyse(self, visited_obs: Tensor) -> dict[str, float]:
        with torch.no_grad():
            vanilla, attended, scale = self.vanilla_and_attention_actions(visited_obs)
            critic = self.critic_constants()
            q_gap = self.q1(critic, visited_obs, attended) - self.q1(critic, visited_obs, vanilla)
        return {"q_attention_minus_vanilla": float(q_gap.mean()),
                "attention_preferred": float((q_gap > 0).float().mean()),
                "attention_scale_mean": float(scale.mean())}


VARIANTS: dict[str, type[Learner]] = {}
"""The learners registered by this module and `bilevel.algorithms.meta_critic`, by name."""


def make_variant(name: str, mixin: type, mixin_config: type, base: type[OffPolicyLearner],
                 **defaults: Any) -> type[Learner]:
    """Register ``mixin`` over ``base`` as ``name``, its config the mixin's fields over the base's
    (with ``defaults`` overriding field defaults)."""
    title = f"{base.__name__}{mixin.__name__}{''.join(f'_{k}' for k in defaults)}"
    config = dataclasses.make_dataclass(
        f"{title}Config", [(key, type(value), dataclasses.field(default=value)) for key, value in defaults.items()],
        bases=(mixin_config, base.Config))
    config.__doc__ = f"{name}: {mixin_config.__doc__} over {base.Config.__doc__}"
    doc = f"{name}: {mixin.__doc__.splitlines()[0].rstrip('.')} ({base.__name__})."
    learner = type(title, (mixin, base), {"Config": config, "__doc__": doc, "__module__": mixin.__module__})
    VARIANTS[name] = register(name)(learner)
    return learner


for _name, _base in (("ddpg", DDPG), ("td3", TD3), ("sac", SAC)):
    make_variant(f"{_name}-matt", MetaAttention, MetaAttentionConfig, _base)
    make_variant(f"{_name}-matt-dt", MetaAttention, MetaAttentionConfig, _base, dance_twice=True)
