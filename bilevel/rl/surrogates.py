"""Policy-gradient surrogate losses and advantage standardisation over masked batches.

Any shape works, ``[T, B]`` usually; ``valid`` masks steps by multiplication, never by
indexing, so every function composes with ``torch.func.vmap`` over tasks and with
higher-order differentiation. Gradients flow through every argument as given: detach
the advantages and the behaviour log-probabilities where they are to be constants.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["importance_weighted_loss", "masked_mean", "reinforce_loss", "standardize"]


def masked_mean(values: Tensor, valid: Tensor | None = None) -> Tensor:
    """``sum(valid * values) / max(sum(valid), 1)``, a scalar; the plain mean when ``valid`` is None."""
    if valid is None:
        return values.mean()
    _check_same_shape("valid", valid, "values", values)
    weight = valid.to(values.dtype)
    return (weight * values).sum() / weight.sum().clamp_min(1.0)


def reinforce_loss(log_probs: Tensor, advantages: Tensor, valid: Tensor | None = None) -> Tensor:
    """The REINFORCE surrogate ``L = -mean_valid[log pi(a_t | s_t) * A_t]`` (Williams 1992),
    whose gradient is the policy-gradient estimate ``-mean_valid[A_t grad log pi(a_t | s_t)]``.

    Args:
        log_probs: ``[...]`` ``log pi(a_t | s_t)`` under the policy being differentiated.
        advantages: ``[...]`` advantage estimates ``A_t``.
        valid: ``[...]`` bool mask of real steps; None means all.

    Returns:
        A scalar loss.
    """
    _check_same_shape("advantages", advantages, "log_probs", log_probs)
    return -masked_mean(log_probs * advantages, valid)


def importance_weighted_loss(
    log_probs: Tensor, old_log_probs: Tensor, advantages: Tensor, valid: Tensor | None = None
) -> Tensor:
    """The importance-weighted surrogate ``L = -mean_valid[exp(log pi - log pi_old) * A_t]``
    (Kakade and Langford 2002; TRPO's objective). At ``pi = pi_old`` its gradient equals
    that of `reinforce_loss`.

    Args:
        log_probs: ``[...]`` ``log pi(a_t | s_t)`` under the policy being differentiated.
        old_log_probs: ``[...]`` ``log pi_old(a_t | s_t)`` under the policy that collected
            the data; pass it detached for the usual surrogate.
        advantages: ``[...]`` advantage estimates ``A_t`` under ``pi_old``.
        valid: ``[...]`` bool mask of real steps; None means all.

    Returns:
        A scalar loss.
    """
    _check_same_shape("old_log_probs", old_log_probs, "log_probs", log_probs)
    _check_same_shape("advantages", advantages, "log_probs", log_probs)
    ratios = torch.exp(log_probs - old_log_probs)
    return -masked_mean(ratios * advantages, valid)


def standardize(advantages: Tensor, valid: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """``(A - mean) / (std + eps)`` with the mean and the (population) standard deviation
    taken over the valid steps; 0 at invalid steps.

    Args:
        advantages: ``[...]`` values to standardise.
        valid: ``[...]`` bool mask of real steps; None means all.
        eps: added to the standard deviation, > 0.

    Returns:
        ``[...]`` standardised advantages.
    """
    if not 0 < eps < math.inf:
        raise ValueError(f"`eps` must be finite and positive; got {eps}")
    mean = masked_mean(advantages, valid)
    centred = advantages - mean
    std = masked_mean(centred**2, valid).sqrt()
    standardized = centred / (std + eps)
    return standardized if valid is None else standardized * valid.to(advantages.dtype)


def _check_same_shape(name: str, tensor: Tensor, reference_name: str, reference: Tensor) -> None:
    if tensor.shape != reference.shape:
        raise ValueError(
            f"`{name}` must have the shape of `{reference_name}`, {tuple(reference.shape)}; "
            f"got {tuple(tensor.shape)}"
        )
