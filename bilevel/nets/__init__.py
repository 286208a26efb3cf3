"""Networks for meta-RL, written as ordinary modules and used functionally.

Every network is evaluated as ``torch.func.functional_call(module, params, args)`` with
``params = bilevel.tree.params_of(module)``, and composes with ``grad``, ``vmap``, ``jvp`` and
``jacrev``: no in-place updates of inputs, no data-dependent Python control flow.
"""

from bilevel.nets.actor_critic import (
    DeterministicActor,
    QCritic,
    QFeatures,
    TanhGaussianActor,
    TwinQCritic,
    rescale_action,
    unscale_action,
)
from bilevel.nets.common import mlp, subtree
from bilevel.nets.distributions import DiagGaussian, TanhGaussian, gaussian_kl, tanh_log_abs_det_jacobian
from bilevel.nets.ensemble import (
    EnsembleLinear,
    FitResult,
    Prediction,
    ProbabilisticEnsemble,
    gaussian_nll,
    soft_clamp,
)
from bilevel.nets.policies import GaussianMLPPolicy, TabularSoftmaxPolicy, mean_action_fn

__all__ = [
    "DeterministicActor",
    "DiagGaussian",
    "EnsembleLinear",
    "FitResult",
    "GaussianMLPPolicy",
    "Prediction",
    "ProbabilisticEnsemble",
    "QCritic",
    "QFeatures",
    "TabularSoftmaxPolicy",
    "TanhGaussian",
    "TanhGaussianActor",
    "TwinQCritic",
    "gaussian_kl",
    "gaussian_nll",
    "mean_action_fn",
    "mlp",
    "rescale_action",
    "soft_clamp",
    "subtree",
    "tanh_log_abs_det_jacobian",
    "unscale_action",
]
