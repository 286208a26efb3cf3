"""Differentiable inner loops: unrolled adaptation with TorchOpt optimisers, and a solver to a
stationary point.

``unroll`` runs ``theta_{k+1} = theta_k + update(grad L(theta_k))`` for a fixed
number of steps with any TorchOpt ``GradientTransformation`` (Finn et al. 2017,
eq. 1, for SGD). The gradient is taken with ``torch.func.grad`` so the loop
composes with an outer ``torch.func.grad``, ``vmap`` (one batched computation
over tasks) and with plain ``torch.autograd``; ``gradient="autograd"`` takes it
with ``torch.autograd.grad(create_graph=True)`` instead, for a caller outside any
``torch.func`` transform that differentiates the result with ``torch.autograd``
(the same numbers, less dispatch per operation on small networks).

``newton_cg`` minimises a loss to ``||grad L|| <= tol``: the solution an implicit
hypergradient (`bilevel.implicit_root`) differentiates, where an unrolled loop stops
near, not at, a stationary point. Its stopping rules are masks, so it runs under
``vmap`` over tasks.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch._C._functorch as _functorch
import torchopt
from torch import Tensor
from torchopt.base import GradientTransformation

from bilevel import tree
from bilevel._checks import scalar_valued
from bilevel.linalg import conjugate_gradient, known_all_false
from bilevel.tree import Tree

__all__ = ["adam", "meta_sgd", "newton_cg", "unroll"]


def unroll(
    inner_loss: Callable[[Tree], Tensor],
    params: Tree,
    optimizer: GradientTransformation,
    steps: int,
    *,
    first_order: bool = False,
    gradient: str = "func",
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
        gradient: ``"func"`` (``torch.func.grad``: composes with ``vmap``, ``grad``,
            ``jvp``) or ``"autograd"`` (``torch.autograd.grad`` on the tape, with
            ``create_graph`` unless ``first_order``; only outside ``torch.func``
            transforms). Leaves of ``params`` that do not require grad are
            differentiated as fresh leaves, so their steps are constants in them.

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
    if gradient not in ("func", "autograd"):
        raise ValueError(f"`gradient` must be 'func' or 'autograd'; got {gradient!r}")
    loss = scalar_valued(inner_loss, "inner_loss")
    if gradient == "autograd":
        if _functorch.maybe_current_level() is not None:
            raise RuntimeError("`gradient='autograd'` cannot run inside a torch.func transform; use 'func'")
        grad_fn = _tape_gradient(loss, create_graph=not first_order)
    else:
        grad_fn = torch.func.grad(loss)
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


def _tape_gradient(loss: Callable[[Tree], Tensor], *, create_graph: bool) -> Callable[[Tree], Tree]:
    """``params -> grad loss(params)`` by ``torch.autograd.grad``, every leaf a tensor it can differentiate
    (leaves that do not require grad are detached copies); a leaf ``loss`` does not read gets zeros."""

    def grad_fn(params: Tree) -> Tree:
        with torch.enable_grad():
            inputs = tree.map(lambda leaf: leaf if leaf.requires_grad else leaf.detach().requires_grad_(), params)
            flat = tree.leaves(inputs)
            grads = iter(torch.autograd.grad(loss(inputs), flat, create_graph=create_graph, materialize_grads=True))
            return tree.map(lambda _: next(grads), inputs)

    return grad_fn


def meta_sgd(lrs: float | Tensor | Tree) -> GradientTransformation:
    """Gradient descent with learnable learning rates (Meta-SGD, Li et al. 2017, eq. 1):
    ``theta <- theta - lrs (.) g``.

    ``lrs`` is a scalar, a 0-dim tensor, or a tree shaped like the parameters
    (one rate per parameter entry); gradients flow to every tensor in it."""
    scalar = isinstance(lrs, (float, int)) or (isinstance(lrs, Tensor) and lrs.ndim == 0)
    if isinstance(lrs, Tensor) and not scalar:
        raise ValueError(
            f"`lrs` as a single tensor must be 0-dim; got shape {tuple(lrs.shape)} (give a tree shaped like "
            "the parameters for per-entry rates)"
        )

    def init(params: Tree) -> tuple[()]:
        if not scalar:
            tree.check_same_structure(lrs, params, ("lrs", "params"))
        return ()

    def update(
        updates: Tree, state: tuple[()], *, params: Tree | None = None, inplace: bool = True
    ) -> tuple[Tree, tuple[()]]:
        if scalar:
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


def newton_cg(
    loss: Callable[[Tree], Tensor],
    params: Tree,
    steps: int,
    *,
    cg_iters: int = 10,
    damping: float = 1e-2,
    tol: float = 1e-6,
    feasible: Callable[[Tree], Tensor] | None = None,
    armijo: float = 1e-4,
    halvings: int = 16,
) -> Tree:
    """Minimise ``loss`` from ``params`` by damped Newton-CG with a backtracking line search.

    Each of at most ``steps`` iterations with ``g = grad L(theta)``, ``||g|| > tol`` (Nocedal & Wright
    2006, Alg. 7.1 with Levenberg-Marquardt damping ``mu``, Sec. 10.3):

        (H(theta) + mu I) d = -g                     ``cg_iters`` CG iterations on Hessian-vector products
        d <- -g  if  g.d >= 0                        (an indefinite H can give an ascent direction)
        theta <- theta + t d,  t = max{2^-j : L(theta + t d) <= L(theta) + armijo t g.d,
                                             feasible(theta + t d)},  j < halvings

    A step whose line search finds no such ``t`` keeps ``theta`` and multiplies ``mu`` by 10; an accepted
    step divides it by 3 (``mu`` starts at ``damping``). So ``L`` never increases and, with ``feasible``
    (``theta -> 0-dim bool``, True at ``params``), every iterate stays feasible: a trust region ends the
    solve on its boundary, where ``g = 0`` need not hold.

    Args:
        loss: ``theta -> scalar``, twice differentiable.
        params: the starting tree ``theta_0``.
        steps: the most Newton iterations, ``>= 0``.
        cg_iters: CG iterations per Newton step, ``>= 1``.
        damping: the initial Levenberg-Marquardt damping ``mu``, ``>= 0``.
        tol: stop once ``||g|| <= tol`` (the tree's 2-norm).
        feasible: ``theta -> 0-dim bool``; a step to an infeasible point is shortened.
        armijo: the sufficient-decrease constant, in ``(0, 1)``.
        halvings: the most step lengths ``2^-j`` tried per line search, ``>= 1``.

    Returns:
        The last iterate, a tree like ``params``. It is not differentiable through the iterations in a
        useful way: differentiate the solution with `bilevel.implicit_root` on ``grad L = 0``.
    """
    for name, value, least in (("steps", steps, 0), ("cg_iters", cg_iters, 1), ("halvings", halvings, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise ValueError(f"`{name}` must be an int >= {least}; got {value!r}")
    for name, value in (("damping", damping), ("tol", tol)):
        if not value >= 0:
            raise ValueError(f"`{name}` must be >= 0; got {value}")
    if not 0 < armijo < 1:
        raise ValueError(f"`armijo` must lie in (0, 1); got {armijo}")
    if not tree.leaves(params):
        raise ValueError("`params` has no tensor leaves: nothing to minimise")
    grad_fn = torch.func.grad(scalar_valued(loss, "loss"))
    first = tree.leaves(params)[0]
    mu = torch.full((), damping, dtype=first.dtype, device=first.device)
    for _ in range(steps):
        grads, hessian_vjp = torch.func.vjp(grad_fn, params)
        running = tree.norm(grads) > tol
        if known_all_false(running):
            break

        def damped_hessian(v: Tree, mu: Tensor = mu, hessian_vjp: Callable = hessian_vjp) -> Tree:
            return tree.axpy(mu, v, hessian_vjp(v)[0])

        descent = tree.scale(grads, -1.0)
        direction, _ = conjugate_gradient(damped_hessian, descent, max_iter=cg_iters)
        direction = tree.where(tree.dot(grads, direction) < 0, direction, descent)
        slope = tree.dot(grads, direction)
        start = loss(params)
        step = tree.zeros_like(params)
        found = torch.zeros((), dtype=torch.bool, device=first.device)
        for j in range(halvings):
            fraction = 0.5**j
            candidate = tree.axpy(fraction, direction, params)
            accept = ~found & (loss(candidate) <= start + armijo * fraction * slope)
            if feasible is not None:
                accept = accept & feasible(candidate)
            step = tree.where(accept, tree.scale(direction, fraction), step)
            found = found | accept
            if known_all_false(~found):
                break
        params = tree.where(running & found, tree.add(params, step), params)
        mu = torch.where(running, torch.where(found, mu / 3, mu * 10), mu)
    return params
