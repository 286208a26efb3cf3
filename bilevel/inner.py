"""Differentiable inner loops: unrolled adaptation with TorchOpt optimisers.

``unroll`` runs ``theta_{k+1} = theta_k + update(grad L(theta_k))`` for a fixed
number of steps with any TorchOpt ``GradientTransformation`` (Finn et al. 2017,
eq. 1, for SGD). The gradient is taken with ``torch.func.grad`` so the loop
composes with an outer ``torch.func.grad``, ``vmap`` (one batched computation
over tasks) and with plain ``torch.autograd``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torchopt
from torch import Tensor
from torchopt.base import GradientTransformation

from bilevel import tree
from bilevel._checks import scalar_valued
from bilevel.tree import Tree

__all__ = ["adam", "meta_sgd", "unroll"]


def unroll(
    inner_loss: Callable[[Tree], Tensor],
    params: Tree,
    optimizer: GradientTransformation,
    steps: int,
    *,
    first_order: bool = False,
) -> Tree:
    """Adapt ``params`` by ``steps`` optimiser steps on ``inner_loss``.

    Args:
        inner_loss: ``params -> scalar``; may close over meta-parameters (an
            attention net, a learned loss) and task data.
        params: the initial parameter tree ``theta_0``.
        optimizer: any TorchOpt ``GradientTransformation`` (``torchopt.sgd``,
            `adam`, `meta_sgd`, ...), applied functionally with ``inplace=False``.
        steps: the number of inner steps ``K >= 0``.
        first_order: treat each inner gradient as a constant (first-order MAML):
            ``d theta_K / d theta_0 = I`` for SGD and no gradient flows through the
            inner gradients to the meta-parameters that the loss closes over.

    Returns:
        ``theta_K``, a tree like ``params``, differentiable with respect to
        ``params`` and to every tensor ``inner_loss`` closes over.

    The optimiser state is initialised from the first gradient (a tree of the
    same shapes as ``params``), so that under ``vmap`` over tasks with shared
    initial parameters it is batched like the gradients; TorchOpt's in-place
    moment updates would otherwise write batched values into unbatched state.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
        raise ValueError(f"`steps` must be an int >= 0; got {steps!r}")
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(
            f"`optimizer` must be a TorchOpt GradientTransformation; got {type(optimizer).__name__}"
        )
    grad_fn = torch.func.grad(scalar_valued(inner_loss, "inner_loss"))
    state = None
    for _ in range(steps):
        grads = grad_fn(params)
        if first_order:
            grads = tree.detach(grads)
        if state is None:
            state = optimizer.init(grads)
        updates, state = optimizer.update(grads, state, params=params, inplace=False)
        params = torchopt.apply_updates(params, updates, inplace=False)
    return params


def meta_sgd(lrs: float | Tensor | Tree) -> GradientTransformation:
    """Gradient descent with learnable learning rates (Meta-SGD, Li et al. 2017, eq. 1):
    ``theta <- theta - lrs (.) g``.

    ``lrs`` is a scalar, a 0-dim tensor, or a tree shaped like the parameters
    (one rate per parameter entry); gradients flow to every tensor in it."""

    def init(params: Tree) -> tuple[()]:
        if isinstance(lrs, (float, int, Tensor)):
            return ()
        tree.check_same_structure(lrs, params, ("lrs", "params"))
        return ()

    def update(
        updates: Tree, state: tuple[()], *, params: Tree | None = None, inplace: bool = True
    ) -> tuple[Tree, tuple[()]]:
        if isinstance(lrs, (float, int, Tensor)):
            return tree.scale(updates, -lrs), state
        return tree.map(lambda g, lr: -lr * g, updates, lrs), state

    return GradientTransformation(init, update)


def adam(
    lr: float | Tensor,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    eps_root: float = 1e-16,
) -> GradientTransformation:
    """TorchOpt's Adam with ``eps_root > 0`` by default.

    Adam divides by ``sqrt(nu_hat + eps_root) + eps``; with ``eps_root = 0`` (TorchOpt's
    default) the derivative of ``sqrt`` at a zero second moment is infinite and the
    meta-gradient through a zero inner gradient becomes NaN."""
    if not eps_root > 0:
        raise ValueError(f"`eps_root` must be > 0 for a differentiable Adam; got {eps_root}")
    return torchopt.adam(lr, betas=betas, eps=eps, eps_root=eps_root)
