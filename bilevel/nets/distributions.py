"""Action distributions that sample from an explicit ``torch.Generator``.

Both classes are ``torch.distributions`` subclasses, so ``log_prob``, ``entropy`` and
``torch.distributions.kl_divergence`` behave as usual; they add a ``generator`` argument to
``sample``/``rsample`` for reproducible rollouts, and ``mode``, the deterministic action.
Argument validation is off: it is data-dependent control flow, which ``torch.func``
transforms reject.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Independent, Normal, TanhTransform, TransformedDistribution, register_kl

__all__ = ["DiagGaussian", "TanhGaussian", "gaussian_kl", "tanh_log_abs_det_jacobian"]

_SizeLike = torch.Size | tuple[int, ...]


def gaussian_kl(mean0: Tensor, log_std0: Tensor, mean1: Tensor, log_std1: Tensor) -> Tensor:
    """KL(N0 || N1) between diagonal Gaussians, summed over the last (action) axis.

    ``KL = sum_i [log s1_i - log s0_i + (s0_i^2 + (m0_i - m1_i)^2) / (2 s1_i^2) - 1/2]``.
    Inputs broadcast against each other with shape ``[..., A]``; the result is ``[...]``.
    Written in log-std so that its Hessian (the Fisher matrix at N0 = N1) is exact.
    """
    var_ratio = torch.exp(2.0 * (log_std0 - log_std1))
    scaled_gap = (mean0 - mean1) * torch.exp(-log_std1)
    return torch.sum(log_std1 - log_std0 + 0.5 * (var_ratio + scaled_gap**2 - 1.0), dim=-1)


def tanh_log_abs_det_jacobian(pre_tanh: Tensor) -> Tensor:
    """``log |d tanh(u) / du| = log(1 - tanh(u)^2) = 2 (log 2 - u - softplus(-2u))``, elementwise,
    in the form that stays finite for large ``|u|``."""
    return 2.0 * (math.log(2.0) - pre_tanh - F.softplus(-2.0 * pre_tanh))


class DiagGaussian(Independent):
    """``N(mean, diag(exp(log_std)^2))`` over the last axis: batch shape ``mean.shape[:-1]``
    (broadcast with ``log_std``), event shape ``[A]``."""

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        mean, log_std = torch.broadcast_tensors(mean, log_std)
        self.log_std = log_std
        super().__init__(Normal(mean, torch.exp(log_std), validate_args=False), 1, validate_args=False)

    def rsample(self, sample_shape: _SizeLike = (), generator: torch.Generator | None = None) -> Tensor:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``generator``; shape
        ``sample_shape + batch_shape + [A]``, differentiable in mean and std."""
        shape = torch.Size(sample_shape) + self.mean.shape
        noise = torch.randn(shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.stddev * noise

    def sample(self, sample_shape: _SizeLike = (), generator: torch.Generator | None = None) -> Tensor:
        """A sample as in ``rsample``, outside the autograd graph."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)

    def expand(self, batch_shape: _SizeLike, _instance: DiagGaussian | None = None) -> DiagGaussian:
        """The same law over ``batch_shape`` (mean and log-std broadcast to it)."""
        shape = torch.Size(batch_shape) + self.event_shape
        return DiagGaussian(self.mean.expand(shape), self.log_std.expand(shape))

    def entropy(self) -> Tensor:
        """``sum_i (log s_i + (1 + log 2 pi) / 2)``, shape ``batch_shape``."""
        return torch.sum(self.log_std + 0.5 * (1.0 + math.log(2.0 * math.pi)), dim=-1)


@register_kl(DiagGaussian, DiagGaussian)
def _kl_diag_gaussian(p: DiagGaussian, q: DiagGaussian) -> Tensor:
    return gaussian_kl(p.mean, p.log_std, q.mean, q.log_std)


class TanhGaussian(TransformedDistribution):
    """The law of ``a = tanh(u)``, ``u ~ DiagGaussian(mean, log_std)``: SAC's squashed Gaussian.

    ``log pi(a) = log N(u; mean, std) - sum_i log(1 - tanh(u_i)^2)``. ``rsample_with_log_prob``
    computes it from the pre-squash sample ``u``, which stays accurate where ``|a| -> 1``;
    ``log_prob(a)`` also works for any ``a`` in (-1, 1) through ``atanh``. No closed-form
    entropy or mean exists; ``mode`` is the deterministic action ``tanh(mean)``.
    """

    def __init__(self, mean: Tensor, log_std: Tensor) -> None:
        super().__init__(DiagGaussian(mean, log_std), [TanhTransform(cache_size=1)], validate_args=False)

    def expand(self, batch_shape: _SizeLike, _instance: TanhGaussian | None = None) -> TanhGaussian:
        """The same law over ``batch_shape``."""
        base = self.base_dist.expand(batch_shape)
        return TanhGaussian(base.mean, base.log_std)

    @property
    def mode(self) -> Tensor:
        return torch.tanh(self.base_dist.mean)

    def rsample_with_log_prob(
        self, sample_shape: _SizeLike = (), generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """A reparameterised action ``tanh(mean + std * eps)`` (shape ``sample_shape + batch + [A]``)
        and its log-density (shape ``sample_shape + batch``)."""
        pre_tanh = self.base_dist.rsample(sample_shape, generator)
        log_prob = self.base_dist.log_prob(pre_tanh) - tanh_log_abs_det_jacobian(pre_tanh).sum(-1)
        return torch.tanh(pre_tanh), log_prob

    def rsample(self, sample_shape: _SizeLike = (), generator: torch.Generator | None = None) -> Tensor:
        """A reparameterised action; ``log_prob`` of the returned tensor reuses its pre-squash value."""
        return self.transforms[0](self.base_dist.rsample(sample_shape, generator))

    def sample(self, sample_shape: _SizeLike = (), generator: torch.Generator | None = None) -> Tensor:
        """An action as in ``rsample``, outside the autograd graph."""
        with torch.no_grad():
            return self.rsample(sample_shape, generator)
