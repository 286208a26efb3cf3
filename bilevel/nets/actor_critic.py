"""Off-policy actors and critics (DDPG, TD3, SAC), each split into ``features`` and ``head``.

The split is MATT's: an attention network rescales the actor's last hidden features,
``a = head(features(s) * feature_scale)``, so ``forward`` takes an optional ``feature_scale``
broadcastable to ``[..., hidden[-1]]``. To evaluate one part functionally, call it with
``subtree(params, "features")``. Actors output actions in [-1, 1]; ``rescale_action`` maps
them to an environment's Box bounds.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from bilevel.nets.common import ActivationFactory, ObsActionModule, check_last_dim, mlp
from bilevel.nets.distributions import TanhGaussian

__all__ = [
    "DeterministicActor",
    "QCritic",
    "QFeatures",
    "TanhGaussianActor",
    "TwinQCritic",
    "rescale_action",
    "unscale_action",
]

LOG_STD_MIN = -5.0
LOG_STD_MAX = 2.0


def rescale_action(action: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """Map ``action`` in [-1, 1] to ``[low, high]``: ``low + (action + 1) (high - low) / 2``."""
    return low + 0.5 * (action + 1.0) * (high - low)


def unscale_action(env_action: Tensor, low: Tensor, high: Tensor) -> Tensor:
    """The inverse of ``rescale_action``: ``2 (env_action - low) / (high - low) - 1``."""
    return 2.0 * (env_action - low) / (high - low) - 1.0


def _scaled(features: Tensor, feature_scale: Tensor | None) -> Tensor:
    return features if feature_scale is None else features * feature_scale


class _ActorCriticNetwork(ObsActionModule):
    """The constructor of the actors and critics: ``obs_dim`` and ``act_dim`` checked and kept
    (`ObsActionModule`), then the layers that ``_build`` makes for the ``hidden`` sizes and the
    ``activation`` (MATT's 256 -> 128 ReLU by default)."""

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (256, 128),
        activation: ActivationFactory = nn.ReLU,
    ) -> None:
        super().__init__(obs_dim, act_dim)
        if not hidden:
            raise ValueError(f"`hidden` must name at least one layer (its last is the feature size); got {hidden!r}")
        self._build(hidden, activation)

    def _build(self, hidden: Sequence[int], activation: ActivationFactory) -> None:
        """Make the submodules for the ``hidden`` sizes and the ``activation``."""
        raise NotImplementedError


class DeterministicActor(_ActorCriticNetwork):
    """``a = tanh(W h + b)``, ``h = features(s) * feature_scale`` (DDPG/TD3; MATT's 256 -> 128 ReLU).

    ``forward(obs [..., obs_dim], feature_scale [..., hidden[-1]] | None, features | None) -> [..., act_dim]``;
    ``features`` ``[..., hidden[-1]]``, when given, are ``features(obs)`` already computed and only the head runs.
    """

    def _build(self, hidden: Sequence[int], activation: ActivationFactory) -> None:
        self.feature_dim = hidden[-1]
        self.features = mlp((self.obs_dim, *hidden), activation, activate_last=True)
        self.head = nn.Sequential(nn.Linear(hidden[-1], self.act_dim), nn.Tanh())

    def forward(self, obs: Tensor, feature_scale: Tensor | None = None, features: Tensor | None = None) -> Tensor:
        check_last_dim(obs, self.obs_dim, "obs")
        return self.head(_scaled(self.features(obs) if features is None else features, feature_scale))


class TanhGaussianActor(_ActorCriticNetwork):
    """SAC's actor: ``(mean, log_std) = head(features(s) * feature_scale)``, ``log_std`` clamped to
    [-5, 2], ``a = tanh(mean + std * eps)``.

    ``forward(obs [..., obs_dim], feature_scale | None, features | None) -> TanhGaussian`` with batch shape
    ``[...]`` (``features``: ``features(obs)`` already computed, as in `DeterministicActor`);
    use ``rsample_with_log_prob(generator=...)`` for the action and its corrected log-density,
    ``mode`` for the deterministic action ``tanh(mean)``.
    """

    def _build(self, hidden: Sequence[int], activation: ActivationFactory) -> None:
        self.feature_dim = hidden[-1]
        self.features = mlp((self.obs_dim, *hidden), activation, activate_last=True)
        self.head = nn.Linear(hidden[-1], 2 * self.act_dim)

    def forward(self, obs: Tensor, feature_scale: Tensor | None = None,
                features: Tensor | None = None) -> TanhGaussian:
        check_last_dim(obs, self.obs_dim, "obs")
        features = self.features(obs) if features is None else features
        mean, raw_log_std = self.head(_scaled(features, feature_scale)).chunk(2, dim=-1)
        return TanhGaussian(mean, torch.clamp(raw_log_std, LOG_STD_MIN, LOG_STD_MAX))


class QFeatures(nn.Module):
    """``features(s, a)``: an MLP on ``concat(s, a)`` with activated outputs, ``[..., hidden[-1]]``."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int], activation: ActivationFactory) -> None:
        super().__init__()
        self.obs_dim = obs_dim
        self.act_dim = act_dim
        self.net = mlp((obs_dim + act_dim, *hidden), activation, activate_last=True)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        check_last_dim(obs, self.obs_dim, "obs")
        check_last_dim(act, self.act_dim, "act")
        return self.net(torch.cat([obs, act], dim=-1))


class QCritic(_ActorCriticNetwork):
    """``Q(s, a) = w^T features(s, a) + b`` (MATT's critic features 256 -> 128).

    ``forward(obs [..., obs_dim], act [..., act_dim]) -> [...]``.
    """

    def _build(self, hidden: Sequence[int], activation: ActivationFactory) -> None:
        self.feature_dim = hidden[-1]
        self.features = QFeatures(self.obs_dim, self.act_dim, hidden, activation)
        self.head = nn.Linear(hidden[-1], 1)

    def forward(self, obs: Tensor, act: Tensor) -> Tensor:
        return self.head(self.features(obs, act)).squeeze(-1)


class TwinQCritic(_ActorCriticNetwork):
    """Two independent critics ``q1``, ``q2`` (TD3, SAC) evaluated in one call:
    ``forward(obs, act) -> (q1 [...], q2 [...])``."""

    def _build(self, hidden: Sequence[int], activation: ActivationFactory) -> None:
        self.q1 = QCritic(self.obs_dim, self.act_dim, hidden, activation)
        self.q2 = QCritic(self.obs_dim, self.act_dim, hidden, activation)

    def forward(self, obs: Tensor, act: Tensor) -> tuple[Tensor, Tensor]:
        return self.q1(obs, act), self.q2(obs, act)
