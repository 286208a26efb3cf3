"""Stochastic policies for on-policy meta-RL: the Gaussian MLP policy and the tabular softmax policy."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.distributions import Categorical
from torch.func import functional_call

from bilevel.nets.common import ActivationFactory, ObsActionModule, check_last_dim, check_positive, mlp
from bilevel.nets.distributions import DiagGaussian

__all__ = ["GaussianMLPPolicy", "TabularSoftmaxPolicy", "mean_action_fn"]


class GaussianMLPPolicy(ObsActionModule):
    """``pi(a | s) = N(a; mu_theta(s), diag(exp(2 log_std)))``: an MLP mean and a state-independent
    log-std parameter (MAML-RL's policy).

    ``forward(obs [..., obs_dim]) -> DiagGaussian`` with batch shape ``[...]`` and event ``[act_dim]``.
    Parameters: ``mean_net.{2i}.weight`` and ``mean_net.{2i}.bias`` for the ``i``-th linear layer (the
    activations sit at the odd indices; with the default two hidden layers the output layer is
    ``mean_net.4.*``) and ``log_std`` ``[act_dim]``. `bilevel.tree.partition` splits them by name.
    """

    def __init__(
        self,
        obs_dim: int,
        act_dim: int,
        hidden: Sequence[int] = (64, 64),
        activation: ActivationFactory = nn.Tanh,
        init_log_std: float = 0.0,
    ) -> None:
        super().__init__(obs_dim, act_dim)
        self.mean_net = mlp((obs_dim, *hidden, act_dim), activation)
        if not math.isfinite(init_log_std):
            raise ValueError(f"`init_log_std` must be finite; got {init_log_std}")
        self.log_std = nn.Parameter(torch.full((act_dim,), float(init_log_std)))

    def forward(self, obs: Tensor) -> DiagGaussian:
        check_last_dim(obs, self.obs_dim, "obs")
        return DiagGaussian(self.mean_net(obs), self.log_std)


def mean_action_fn(policy: nn.Module) -> Callable[[dict[str, Tensor], Tensor], Tensor]:
    """The deterministic action as a pure function ``(params, obs [..., obs_dim]) -> [..., act_dim]``,
    for Jacobian regularisers (``vmap(jacrev(fn, argnums=1), in_dims=(None, 0))``).

    ``policy.forward`` may return a tensor (a deterministic actor) or a distribution, whose
    ``mode`` is taken: the mean for ``DiagGaussian``, ``tanh(mean)`` for ``TanhGaussian``.
    """

    def mean_action(params: dict[str, Tensor], obs: Tensor) -> Tensor:
        output = functional_call(policy, params, (obs,))
        return output if isinstance(output, Tensor) else output.mode

    return mean_action


class TabularSoftmaxPolicy(nn.Module):
    """``pi(a | s) = softmax(logits[s])_a`` with a free ``logits`` parameter ``[S, A]``, initially
    uniform. ``forward(states [...] long | None) -> Categorical`` over actions, batch shape ``[...]``
    (``[S]`` for all states when ``states`` is None)."""

    def __init__(self, num_states: int, num_actions: int) -> None:
        super().__init__()
        check_positive(num_states, "num_states")
        check_positive(num_actions, "num_actions")
        self.num_states = num_states
        self.num_actions = num_actions
        self.logits = nn.Parameter(torch.zeros(num_states, num_actions))

    def forward(self, states: Tensor | None = None) -> Categorical:
        logits = self.logits if states is None else self.logits[states]
        return Categorical(logits=logits, validate_args=False)

    def probs(self) -> Tensor:
        """``pi(a | s)`` for every state and action, ``[S, A]``."""
        return torch.softmax(self.logits, dim=-1)

    def log_probs(self) -> Tensor:
        """``log pi(a | s)``, ``[S, A]``."""
        return torch.log_softmax(self.logits, dim=-1)
