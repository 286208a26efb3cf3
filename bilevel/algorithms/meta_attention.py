"""Meta attention (MATT) for off-policy actor-critic, over DDPG, TD3 and SAC.

The attention net ``f_psi`` reads the actor features ``pi_bar(s)`` (Query) and the critic features
``Q_bar(s, pi(s))`` (Key) and rescales the actor features (Value; the attention features of eq. 5), which go
through the same head::

    scale_psi(s)  = 2 sigmoid(f_psi(concat(pi_bar(s), Q_bar(s, pi_phi(s)))))      in (0, 2)^F
    pi'_psi(s)    = head(pi_bar(s) * scale_psi(s))                                  the attention action

Per actor update, with a train batch ``d_trn`` and an independent validation batch ``d_val``::

    phi_old = phi - eta grad L_actor(phi; d_trn)                                    (eq. 8)
    phi_new = phi_old - eta grad L_actor(phi_old; d_trn | a = pi'_psi(s))           (eq. 9)
    L_att(psi) = tanh(L_actor(phi_new; d_val) - L_actor(phi_old; d_val))           (eq. 10)
    psi <- Adam(psi, grad_psi L_att)

The look-ahead steps are plain SGD at the actor's learning rate; eq. 9 is a `bilevel.inner.unroll`
call and ``grad_psi L_att`` differentiates through it. The look-ahead runs outside any ``torch.func``
transform, so `unroll` takes its gradients with ``gradient="autograd"`` (``torch.autograd.grad`` with
``create_graph``: the same numbers as ``torch.func.grad``, with less dispatch per operation on these
small networks). Eq. 8's gradient is the vanilla gradient the
actor's own step takes at the same ``phi``, so it is computed once for both (with
``meta_loss_trains_actor`` both steps are unrolled, differentiable in ``phi``). One actor-feature pass
serves the vanilla and the attention action (`MetaAttention.attention_forward`), and over DDPG and TD3
one critic-feature pass ``Q_bar(s, pi_phi(s))`` serves the attention net's Key and the vanilla loss
``-mean head(Q_bar(s, pi_phi(s)))``. The paper leaves open, and the authors' code decides
(Gideon-K-Marx/Meta-Attention-For-Off-Policy-Actor-Critic, ``Code/TD3.py``):

- which actor layers the look-ahead moves: the authors move only the first layer of the feature
  net (``lookahead_layers="first"``); ``"features"`` and ``"all"`` are the alternatives;
- how the actor itself is trained: the authors' actor step takes the vanilla gradient plus the
  gradient of the attention-action loss of eq. 9 (``auxiliary_trains_actor``), not
  ``phi <- phi_new`` as Algorithm 1 writes, and the gradient of ``L_att`` reaches only ``psi``
  (``meta_loss_trains_actor=False``). We take the attention-action gradient at ``phi`` rather than
  at the authors' ``phi_old``, a first-order difference in ``eta``, and on ``d_trn`` as eq. 9 writes,
  where the authors' code evaluates the attention-action loss of eq. 9, and the actor losses at
  ``phi_old`` and ``phi_new``, all on the validation states (so there eq. 9's step and the actor's
  auxiliary gradient come from ``d_val``).

Batches: the loop's ``batch_size`` (default 256, as CleanRL's and Stable-Baselines3's TD3) sizes both
``d_trn`` and ``d_val``; the authors draw two independent batches of 128, as the reproductions do with
``--batch-size 128`` for every learner.

Dance twice (section 3.3): at decision time the actor executes whichever of ``pi_phi(s)`` and
``pi'_psi(s)`` has the higher ``Q1`` (SAC: the higher ``Q1`` of the two means, then a sample from the
winner's distribution), then adds its exploration noise. Evaluation reports the mean
``Q1(s, pi'_psi(s)) - Q1(s, pi_phi(s))`` over the states visited, and each checkpoint keeps the actor
and attention features of 250 consecutive evaluation states, which `MetaAttention.plot_runs` draws
as the Q-gap curve and a t-SNE embedding (section 4.3, Figure 6).

``meta_interval = k > 1`` (not the default, and not the paper's algorithm) runs the look-ahead and the
meta-net's step (eqs. 8-10) on every k-th actor update only; the other actor updates take the actor's
step alone, ``grad (L_actor + L_aux)(phi)`` in one backward pass, with the meta-net held fixed. It
trades meta-updates for time (docs/benchmarks.md, "Off-policy learners").

The same look-ahead trains Meta-Critic's learned loss (`bilevel.algorithms.meta_critic`), so the
loop lives here in `LookAheadMetaLearner`, parameterised by the auxiliary actor loss.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torchopt
from torch import Tensor, nn

from bilevel import tree
from bilevel.algorithms.ddpg import DDPG
from bilevel.algorithms.off_policy import OffPolicyLearner, adam, apply, parameters
from bilevel.algorithms.sac import SAC
from bilevel.algorithms.td3 import TD3
from bilevel.inner import unroll
from bilevel.nets import mlp
from bilevel.runs import Learner, register
from bilevel.tree import Tree

__all__ = [
    "LOOKAHEAD_LAYERS",
    "VARIANTS",
    "AttentionForward",
    "LookAheadConfig",
    "LookAheadMetaLearner",
    "MetaAttention",
    "MetaAttentionConfig",
    "choose_by_q",
    "embed_2d",
    "lookahead_split",
    "make_variant",
    "plot_feature_embeddings",
    "plot_q_gap",
]

LOOKAHEAD_LAYERS = {"first": ("features.0.",), "features": ("features.",), "all": ("",)}
"""Name prefixes of the actor parameters each ``lookahead_layers`` choice moves."""


def lookahead_split(actor_params: dict[str, Tensor], layers: str) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split the actor tree into the entries the look-ahead moves and those it holds fixed."""
    prefixes = LOOKAHEAD_LAYERS[layers]
    return tree.partition(actor_params, lambda name: name.startswith(prefixes))


class AttentionForward(NamedTuple):
    """`MetaAttention.attention_forward`: actor features ``[B, F]``, the vanilla actor output, the critic
    features ``Q_bar(s, pi_phi(s))`` ``[B, F]``, the feature scale ``[B, F]`` and the attention actor output."""

    features: Tensor
    vanilla: Any
    critic_features: Tensor
    scale: Tensor
    attention: Any


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
    meta_interval: int = 1
    """Run the look-ahead and the meta-net's step on every k-th actor update only (1: every one, as in
    the paper and the authors' code); the actor's own step, with the auxiliary gradient, runs on every
    actor update. A speed option that changes the algorithm: the meta-net gets 1/k of the updates."""

    def validate(self) -> None:
        super().validate()  # type: ignore[misc]
        if not (0 < self.meta_lr < math.inf and 0 <= self.meta_weight_decay < math.inf):
            raise ValueError(f"`meta_lr` must be finite and > 0 and `meta_weight_decay` finite and >= 0; got "
                             f"{self.meta_lr} and {self.meta_weight_decay}")
        if self.meta_interval < 1:
            raise ValueError(f"`meta_interval` must be >= 1; got {self.meta_interval}")
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
    analysis_states: int = 250
    """Consecutive states of the first evaluation episode whose actor and attention features every
    checkpoint saves for the t-SNE figure of `bilevel plot` (paper, section 4.3: 250)."""

    def validate(self) -> None:
        super().validate()
        if not self.attention_hidden or min(self.attention_hidden) < 1:
            raise ValueError(f"`attention_hidden` must be positive sizes; got {self.attention_hidden}")
        if self.analysis_states < 0:
            raise ValueError(f"`analysis_states` must be >= 0; got {self.analysis_states}")


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

    def actor_and_auxiliary_losses(self, actor_params: Tree, meta_params: Tree, obs: Tensor,
                                   noise: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(L_actor(phi), L_aux(phi, omega))`` on one batch ``obs [B, D]``, the two losses of the actor's
        own step; a subclass shares their common forward passes (the actor features)."""
        return self.actor_loss(actor_params, obs, noise), self.auxiliary_loss(actor_params, meta_params, obs, noise)

    def build(self) -> None:
        super().build()
        self.meta_net = self.make_meta_net().to(self.device)
        self.meta_optimizer = adam(self.meta_net.parameters(), self.config.meta_lr, self.config.meta_weight_decay)

    def meta_loss(
        self,
        meta_params: Tree,
        moved: dict[str, Tensor],
        fixed: dict[str, Tensor],
        train_obs: Tensor,
        val_obs: Tensor,
        train_noise: Tensor | None,
        val_noise: Tensor | None,
        old: dict[str, Tensor] | None = None,
    ) -> Tensor:
        """``tanh(L_actor(phi_new; d_val) - L_actor(phi_old; d_val))`` (eq. 10), a scalar differentiable in
        ``meta_params`` and ``moved`` through both SGD look-ahead steps (eqs. 8, 9); ``fixed`` holds the
        actor entries the look-ahead does not move (treated as constants). Batches are ``[B, D]``.

        ``old``: ``phi_old``'s moved entries when the caller already has them (eq. 8 with the vanilla
        gradient of the actor's own step); then only eq. 9 is unrolled and no gradient reaches ``moved``."""

        def actor(moved_params: Tree) -> Tree:
            return {**fixed, **moved_params}

        step = torchopt.sgd(self.config.actor_lr)
        if old is None:
            old = unroll(lambda p: self.actor_loss(actor(p), train_obs, train_noise), moved, step, 1,
                         gradient="autograd")
        new = unroll(lambda p: self.auxiliary_loss(actor(p), meta_params, train_obs, train_noise), old, step, 1,
                     gradient="autograd")
        improvement = self.actor_loss(actor(new), val_obs, val_noise) - self.actor_loss(actor(old), val_obs, val_noise)
        return torch.tanh(improvement)

    def actor_update(self, obs: Tensor) -> dict[str, Tensor]:
        """The actor's step on ``grad L_actor(phi) (+ grad L_aux(phi, omega))`` and the meta-net's step on
        ``grad_omega L_meta`` (eq. 10), both at the current ``phi``. Without ``meta_loss_trains_actor``,
        eq. 8's gradient is the vanilla gradient of the actor's step, computed once for both. With
        ``meta_interval = k``, actor updates ``1, k + 1, 2k + 1, ...`` do this and the others
        `actor_step_without_lookahead`."""
        config = self.config
        if (self.updates // config.policy_frequency - 1) % config.meta_interval:
            return self.actor_step_without_lookahead(obs)
        val_obs = self.buffer.sample(config.batch_size, self.generator).obs
        train_noise, val_noise = self.actor_noise(obs.shape[0]), self.actor_noise(obs.shape[0])
        actor_params = self.actor_params()
        meta_params = parameters(self.meta_net)
        actor_loss, auxiliary = self.actor_and_auxiliary_losses(actor_params, tree.detach(meta_params), obs,
                                                                train_noise)
        leaves = list(actor_params.values())
        grads = dict(zip(actor_params, torch.autograd.grad(actor_loss, leaves,
                                                           retain_graph=config.auxiliary_trains_actor), strict=True))
        moved, fixed = lookahead_split(actor_params, config.lookahead_layers)
        if config.meta_loss_trains_actor:
            meta_loss = self.meta_loss(meta_params, moved, tree.detach(fixed), obs, val_obs, train_noise, val_noise)
        else:
            with torch.no_grad():
                old = {name: value - config.actor_lr * grads[name] for name, value in moved.items()}
            meta_loss = self.meta_loss(meta_params, tree.detach(moved), tree.detach(fixed), obs, val_obs,
                                       train_noise, val_noise, old=old)
            moved = {}
        meta_grads = torch.autograd.grad(meta_loss, [*meta_params.values(), *moved.values()])

        if config.auxiliary_trains_actor:
            auxiliary_grads = torch.autograd.grad(auxiliary, leaves, allow_unused=True)
            grads = {name: g if a is None else g + a
                     for (name, g), a in zip(grads.items(), auxiliary_grads, strict=True)}
        for name, grad in zip(moved, meta_grads[len(meta_params):], strict=True):
            grads[name] = grads[name] + grad
        for name, param in actor_params.items():
            param.grad = grads[name]
        self.actor_optimizer.step()
        for param, grad in zip(meta_params.values(), meta_grads, strict=False):
            param.grad = grad
        self.meta_optimizer.step()
        with torch.no_grad():
            health = {"meta_grad_norm": tree.norm(dict(zip(meta_params, meta_grads, strict=False))),
                      "meta_net_norm": tree.norm(meta_params)}
        return {"actor_loss": actor_loss.detach(), "meta_loss": meta_loss.detach(), **health,
                **self.after_actor_step(obs)}

    def actor_step_without_lookahead(self, obs: Tensor) -> dict[str, Tensor]:
        """The actor's step alone, the meta-net held fixed: on ``grad (L_actor + L_aux)(phi)``, one backward
        pass (``grad L_actor(phi)`` without ``auxiliary_trains_actor``); ``obs [B, D]``."""
        if not self.config.auxiliary_trains_actor:
            return super().actor_update(obs)
        actor_params = self.actor_params()
        actor_loss, auxiliary = self.actor_and_auxiliary_losses(
            actor_params, parameters(self.meta_net, detach=True), obs, self.actor_noise(obs.shape[0]))
        grads = torch.autograd.grad(actor_loss + auxiliary, list(actor_params.values()), materialize_grads=True)
        for param, grad in zip(actor_params.values(), grads, strict=True):
            param.grad = grad
        self.actor_optimizer.step()
        return {"actor_loss": actor_loss.detach(), **self.after_actor_step(obs)}

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

    def extra_evaluation_state(self) -> dict[str, Any]:
        """The attention net, which dance twice and the Q gap read (Meta-Critic's learned loss is not read)."""
        return {"base": super().extra_evaluation_state(), "meta_net": self.meta_net.state_dict()}

    def load_extra_evaluation_state(self, state: dict[str, Any]) -> None:
        super().load_extra_evaluation_state(state["base"])
        self.meta_net.load_state_dict(state["meta_net"])

    def attention_forward(self, attention_params: Tree, actor_params: Tree, obs: Tensor) -> AttentionForward:
        """The vanilla and the attention actor on ``obs [B, D]`` from one pass of the actor features (eq. 5):
        ``features = pi_bar(s)`` ``[B, F]``, ``vanilla = head(features)``, ``scale = 2 sigmoid(f_psi(features,
        Q_bar(s, pi_phi(s))))`` ``[B, F]`` in (0, 2) and ``attention = head(features * scale)``; the critic is
        held constant and ``pi_phi(s)`` is the deterministic action (SAC: ``tanh(mean)``)."""
        features = self.actor_features(actor_params, obs)
        vanilla = self.actor_output(actor_params, obs, None, features)
        critic_features = self.q1_features(self.critic_constants(), obs, self.mean_action(vanilla))
        logits = apply(self.meta_net, attention_params, torch.cat([features, critic_features], dim=-1))
        scale = 2.0 * torch.sigmoid(logits)
        return AttentionForward(features, vanilla, critic_features, scale,
                                self.actor_output(actor_params, obs, scale, features))

    def attention_scale(self, attention_params: Tree, actor_params: Tree, obs: Tensor) -> Tensor:
        """``2 sigmoid(f_psi(pi_bar(s), Q_bar(s, pi_phi(s))))``, ``[B, F]`` in (0, 2) (eq. 5)."""
        return self.attention_forward(attention_params, actor_params, obs).scale

    def auxiliary_loss(self, actor_params: Tree, meta_params: Tree, obs: Tensor, noise: Tensor | None) -> Tensor:
        return self.loss_of_output(self.attention_forward(meta_params, actor_params, obs).attention, obs, noise)

    def actor_and_auxiliary_losses(self, actor_params: Tree, meta_params: Tree, obs: Tensor,
                                   noise: Tensor | None) -> tuple[Tensor, Tensor]:
        forward = self.attention_forward(meta_params, actor_params, obs)
        vanilla = self.loss_of_output_with_q1_features(forward.vanilla, obs, noise, forward.critic_features)
        return vanilla, self.loss_of_output(forward.attention, obs, noise)

    def vanilla_and_attention_actions(self, obs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The deterministic vanilla and attention actions ``[B, A]`` and the feature scale ``[B, F]``."""
        forward = self.attention_forward(parameters(self.meta_net), self.actor_params(), obs)
        return self.mean_action(forward.vanilla), self.mean_action(forward.attention), forward.scale

    def decide(self, obs: Tensor, explore: bool) -> Tensor:
        if not self.config.dance_twice:
            return super().decide(obs, explore)
        forward = self.attention_forward(parameters(self.meta_net), self.actor_params(), obs)
        critic = self.critic_constants()
        prefer_attention = choose_by_q(self.q1_of_features(critic, forward.critic_features),
                                       self.q1(critic, obs, self.mean_action(forward.attention)))
        chosen_scale = torch.where(prefer_attention[:, None], forward.scale, torch.ones_like(forward.scale))
        output = self.actor_output(self.actor_params(), obs, chosen_scale, forward.features)
        return self.exploring_action(output) if explore else self.mean_action(output)

    def analyse(self, visited_obs: Tensor, episode: Tensor) -> dict[str, float]:
        """Section 4.3 on the evaluation states ``[N, D]``: the mean ``Q1(s, pi'_psi(s)) - Q1(s, pi_phi(s))``,
        the fraction of states where the attention action wins, the mean scale; and, kept for
        `analysis_arrays`, the first ``analysis_states`` consecutive states of episode 0 with their
        actor features ``pi_bar(s)`` and attention features ``pi_bar(s) * scale_psi(s)``, both ``[n, F]``."""
        with torch.no_grad():
            vanilla, attended, scale = self.vanilla_and_attention_actions(visited_obs)
            critic = self.critic_constants()
            q_vanilla, q_attention = self.q1(critic, visited_obs, vanilla), self.q1(critic, visited_obs, attended)
            q_gap = q_attention - q_vanilla
            first = torch.nonzero(episode == 0).squeeze(-1)[: self.config.analysis_states]
            features = self.actor_features(self.actor_params(), visited_obs[first])
            self._analysis = {"obs": visited_obs[first].cpu(), "actor_features": features.cpu(),
                              "attention_features": (features * scale[first]).cpu(),
                              "q_vanilla": q_vanilla[first].cpu(), "q_attention": q_attention[first].cpu()}
        return {"q_attention_minus_vanilla": float(q_gap.mean()),
                "attention_preferred": float((q_gap > 0).float().mean()),
                "attention_scale_mean": float(scale.mean())}

    def analysis_arrays(self) -> dict[str, Tensor]:
        """The latest evaluation's arrays of `analyse` (none before the first evaluation or with
        ``analysis_states = 0``)."""
        analysis = getattr(self, "_analysis", {})
        return analysis if self.config.analysis_states and analysis else {}

    @staticmethod
    def plot_runs(run_dirs: list[Path], out_dir: Path, *, x_max: float | None = None) -> list[Path]:
        """Section 4.3's figures: ``ALGORITHM_q_gap.png``, the mean ``Q1(s, pi'_psi(s)) - Q1(s, pi_phi(s))``
        over evaluation states against env steps with a 95% band over the seeds of each config, and
        ``ALGORITHM_tsne.png`` (`plot_feature_embeddings`) for the first run that saved features."""
        return plot_q_gap(run_dirs, out_dir, x_max=x_max) + plot_feature_embeddings(run_dirs, out_dir)


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


def plot_q_gap(run_dirs: list[Path], out_dir: Path, *, x_max: float | None = None) -> list[Path]:
    """``ALGORITHM_q_gap.png``: the evaluation metric ``q_attention_minus_vanilla`` against ``env_steps``
    (up to ``x_max`` where given), mean and 95% band over the seeds of each config group of ``run_dirs``
    (all one algorithm)."""
    from bilevel.runs.folder import RunFolder, metric_series
    from bilevel.runs.plot import group_by_config, pyplot, save_figure, seed_band, seeds_label

    folders = [RunFolder(d) for d in run_dirs]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, group in group_by_config(folders).items():
        curves = [metric_series(f.read_metrics(), "env_steps", "q_attention_minus_vanilla", x_max) for f in group]
        if not any(x for x, _ in curves):
            continue
        grid, mean, low, high, _ = seed_band(curves)
        ends = [x[-1] for x, _ in curves if len(x)]
        ax.plot(grid, mean, label=seeds_label(label, len(ends), ends))
        ax.fill_between(grid, low, high, alpha=0.25)
    ax.axhline(0.0, color="black", lw=0.8)
    ax.set_xlabel("env_steps")
    ax.set_ylabel("mean Q1(s, attention action) - Q1(s, vanilla action)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    algorithm = folders[0].read_config()[0]
    return [save_figure(fig, Path(out_dir) / f"{algorithm}_q_gap.png")]


def embed_2d(points: Tensor, seed: int = 0) -> tuple[Tensor, str]:
    """A 2-D embedding ``[N, 2]`` of ``points [N, F]``: scikit-learn's t-SNE (perplexity
    ``min(30, (N - 1) / 3)``, PCA initialisation), or PCA where scikit-learn is not installed.
    Returns the embedding and the method's name."""
    points = points.double()
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        centred = points - points.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)
        return centred @ v[:2].T, "PCA (scikit-learn not installed)"
    from threadpoolctl import threadpool_limits

    perplexity = max(1.0, min(30.0, (points.shape[0] - 1) / 3))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed)
    with threadpool_limits(torch.get_num_threads()):
        return torch.as_tensor(tsne.fit_transform(points.numpy())), "t-SNE"


def plot_feature_embeddings(run_dirs: list[Path], out_dir: Path, stages: int = 5) -> list[Path]:
    """``ALGORITHM_tsne.png`` after the paper's Figure 6 (b-e): for the first of ``run_dirs`` with saved
    features (``RUN/analysis``), at up to ``stages`` checkpoints spread over training, the per-state
    ``Q1(s, pi'_psi(s)) - Q1(s, pi_phi(s))`` along consecutive evaluation steps (left) and a 2-D
    embedding of the actor features (blue) and the attention features (red) of those states (right)."""
    from bilevel.runs.folder import RunFolder
    from bilevel.runs.loop import ANALYSIS_DIR
    from bilevel.runs.plot import pyplot, save_figure

    for run in run_dirs:
        files = sorted((Path(run) / ANALYSIS_DIR).glob("iteration-*.pt"))
        if files:
            break
    else:
        return []
    picks = sorted({round(i * (len(files) - 1) / max(1, stages - 1)) for i in range(min(stages, len(files)))})
    plt = pyplot()
    fig, axes = plt.subplots(len(picks), 2, figsize=(9, 2.8 * len(picks)), squeeze=False)
    for row, index in zip(axes, picks, strict=True):
        data = torch.load(files[index], map_location="cpu", weights_only=True)
        gap = (data["q_attention"] - data["q_vanilla"]).numpy()
        row[0].plot(gap, lw=0.8)
        row[0].axhline(0.0, color="black", lw=0.6)
        row[0].set_ylabel("Q(att) - Q(van)")
        row[0].set_title(f"{data['env_steps']} env steps: per-state Q gap", fontsize=8)
        count = data["actor_features"].shape[0]
        embedding, method = embed_2d(torch.cat([data["actor_features"], data["attention_features"]]))
        row[1].scatter(*embedding[:count].T.numpy(), s=4, c="tab:blue", label="actor features")
        row[1].scatter(*embedding[count:].T.numpy(), s=4, c="tab:red", label="attention features")
        row[1].set_title(f"{method} of {count} + {count} features", fontsize=8)
        row[1].legend(fontsize=6, markerscale=2)
    axes[-1][0].set_xlabel("evaluation step (episode 0)")
    algorithm = RunFolder(run).read_config()[0]
    fig.suptitle(f"{algorithm}: {Path(run).name}", fontsize=9)
    return [save_figure(fig, Path(out_dir) / f"{algorithm}_tsne.png", dpi=110)]
