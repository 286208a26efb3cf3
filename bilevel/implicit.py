"""Implicit-function hypergradients for any inner solver.

Let ``x*(theta)`` be defined by ``F(x*, theta) = 0``. By the implicit function
theorem ``dx*/dtheta = -(dF/dx)^{-1} dF/dtheta``, so for a cotangent ``v``
(the gradient of an outer loss with respect to ``x*``)

    v^T dx*/dtheta = u^T dF/dtheta,   where   (dF/dx)^T u = -v.

The backward pass is three steps: a vjp in ``x`` that defines the linear
operator, a linear solve, and a vjp in ``theta``. The solver itself is never
differentiated: it may be any algorithm, even a non-differentiable one.

The rule is a ``torch.autograd.Function`` with ``setup_context`` and a generated
vmap rule, so it works under ``torch.autograd``, ``torch.func.grad``, ``vmap``,
``jacrev`` and their compositions (TorchOpt's ``custom_root`` supports none of the
``torch.func`` transforms). Second derivatives are exact too: the backward pass
reads the solution through the same rule, so differentiating it again sees
``x*(theta)``. Forward mode (``jvp``, ``jacfwd``, ``hessian``) is not supported.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optree
import torch
import torch._C._functorch as _functorch
from torch import Tensor

from bilevel import tree
from bilevel.linalg import LinearSolver, SolveInfo, make_solver
from bilevel.tree import Tree

__all__ = ["ImplicitDiagnostics", "LinearSolveWarning", "implicit_root", "implicit_vjp"]


class LinearSolveWarning(RuntimeWarning):
    """The linear system of an implicit backward pass was not solved to tolerance."""


@dataclass
class ImplicitDiagnostics:
    """The last linear solve of a decorated solver's backward pass, as floats.

    Written by every backward pass that runs outside ``vmap`` (inside ``vmap``
    the values are batched and are not recorded: `implicit_vjp` returns them
    as tensors instead); ``calls`` counts those passes. ``relative_residual`` is
    ``residual_norm / ||v||``, ``v`` the cotangent (the right-hand side)."""

    iterations: int | None = None
    residual_norm: float | None = None
    converged: bool | None = None
    relative_residual: float | None = None
    calls: int = 0


def _unwrap(x: Tensor) -> Tensor:
    while _functorch.is_functorch_wrapped_tensor(x):
        if _functorch.is_batchedtensor(x):
            raise RuntimeError("batched")
        x = _functorch.get_unwrapped(x)
    return x


def _record(diagnostics: ImplicitDiagnostics, info: SolveInfo, rhs_norm: Tensor, name: str) -> None:
    try:
        iterations, residual, converged, rhs_norm = (_unwrap(t).detach() for t in (*info, rhs_norm))
    except RuntimeError:
        return
    diagnostics.iterations = int(iterations)
    diagnostics.residual_norm = float(residual)
    diagnostics.converged = bool(converged)
    diagnostics.relative_residual = float(residual / rhs_norm) if float(rhs_norm) > 0 else 0.0
    diagnostics.calls += 1
    if not diagnostics.converged:
        warnings.warn(
            f"implicit_root({name}): the linear solve of the backward pass stopped at residual "
            f"{diagnostics.residual_norm:.3e} after {diagnostics.iterations} iterations without "
            "meeting its tolerance; raise `max_iter`, add `damping`, or choose another `solve`",
            LinearSolveWarning,
            stacklevel=4,
        )


def implicit_vjp(
    optimality_fn: Callable[..., Tree],
    solution: Tree,
    meta_args: tuple[Tree, ...],
    cotangent: Tree,
    *,
    solve: str | LinearSolver | Callable[..., Any] = "cg",
    **solve_options: Any,
) -> tuple[tuple[Tree, ...], SolveInfo]:
    """The implicit backward pass as a pure function: ``v^T dx*/dtheta`` at a root ``x*`` of ``F``.

    With ``F = optimality_fn(x, *meta_args)`` zero at ``x = solution`` and ``v = cotangent``:

        solve  (dF/dx)^T u = -v          (``u`` shaped like ``x``; products by vjp, no matrix formed)
        return u^T dF/dtheta_j            for every meta argument ``theta_j``, and the solve's `SolveInfo`

    Unlike a decorated solver's ``diagnostics`` (`implicit_root`), the `SolveInfo` is returned, so under
    ``vmap`` (one batched solve over tasks) it comes back batched: ``[N]`` iterations, residual norms
    (``||v + (dF/dx)^T u||``) and flags. Every meta argument is a tree of tensors and gets a cotangent;
    close over constants in ``optimality_fn``. ``solve`` and ``solve_options`` as in `implicit_root`.

    Returns:
        ``(cotangents, info)``: a tuple of trees shaped like ``meta_args``, and the `SolveInfo`.
    """
    linear_solver = make_solver(solve, **solve_options)

    def residual_in_solution(x: Tree) -> Tree:
        return optimality_fn(x, *meta_args)

    _, vjp_solution = torch.func.vjp(residual_in_solution, solution)

    def rmatvec(v: Tree) -> Tree:
        return torch.func.jvp(residual_in_solution, (solution,), (v,))[1]

    u, info = linear_solver(lambda w: vjp_solution(w)[0], tree.scale(cotangent, -1.0), rmatvec=rmatvec)
    _, vjp_meta = torch.func.vjp(lambda *m: optimality_fn(solution, *m), *meta_args)
    return tuple(vjp_meta(u)), info


class _ImplicitRoot(torch.autograd.Function):
    generate_vmap_rule = True

    @staticmethod
    def forward(problem: _Problem, *leaves: Tensor) -> tuple[Tensor, ...]:
        return tuple(x.clone() for x in leaves[: problem.num_solution_leaves])

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        problem, *leaves = inputs
        ctx.problem = problem
        ctx.save_for_backward(*leaves)

    @staticmethod
    def backward(ctx: Any, *solution_cotangent: Tensor) -> tuple[Tensor | None, ...]:
        problem: _Problem = ctx.problem
        leaves = ctx.saved_tensors
        meta_leaves = leaves[problem.num_solution_leaves :]
        # The solution re-enters through the rule itself, so that a second derivative sees x*(theta):
        # without it, differentiating this backward pass would hold x* fixed.
        solution_leaves = _ImplicitRoot.apply(problem, *leaves[: problem.num_solution_leaves], *meta_leaves)
        solution = problem.solution_tree(solution_leaves)
        cotangent = problem.solution_tree(solution_cotangent)
        # Meta leaves no caller differentiates (data batches, say) are held constant: no vjp through them.
        needed = ctx.needs_input_grad[1 + problem.num_solution_leaves :]
        wanted = tuple(d and n for d, n in zip(problem.differentiable, needed, strict=True))
        differentiable = [leaf for leaf, w in zip(meta_leaves, wanted, strict=True) if w]

        def optimality(x: Tree, *free: Tensor) -> Tree:
            it = iter(free)
            merged = tuple(next(it) if w else leaf for leaf, w in zip(meta_leaves, wanted, strict=True))
            return problem.optimality(x, merged)

        free_cotangent, info = implicit_vjp(
            optimality, solution, differentiable, cotangent, solve=problem.linear_solver
        )
        _record(problem.diagnostics, info, tree.norm(cotangent), problem.name)
        it = iter(free_cotangent)
        meta_cotangent = tuple(next(it) if w else None for w in wanted)
        return (None,) + (None,) * problem.num_solution_leaves + meta_cotangent


@dataclass(frozen=True)
class _Problem:
    """What the backward pass needs besides tensors: how to rebuild the trees."""

    optimality_fn: Callable[..., Tree]
    linear_solver: Callable[..., tuple[Tree, SolveInfo]]
    diagnostics: ImplicitDiagnostics
    name: str
    solution_spec: Any
    meta_spec: Any
    meta_template: tuple[Any, ...]
    num_solution_leaves: int
    differentiable: tuple[bool, ...]

    def solution_tree(self, leaves: tuple[Tensor, ...]) -> Tree:
        return optree.tree_unflatten(self.solution_spec, list(leaves))

    def optimality(self, solution: Tree, tensor_leaves: tuple[Tensor, ...]) -> Tree:
        meta_leaves = list(self.meta_template)
        it = iter(tensor_leaves)
        for i, leaf in enumerate(meta_leaves):
            if leaf is _TENSOR:
                meta_leaves[i] = next(it)
        meta_args = optree.tree_unflatten(self.meta_spec, meta_leaves)
        return self.optimality_fn(solution, *meta_args)


_TENSOR = object()


def implicit_root(
    optimality_fn: Callable[..., Tree],
    *,
    solve: str | LinearSolver | Callable[..., Any] = "cg",
    **solve_options: Any,
) -> Callable[[Callable[..., Tree]], Callable[..., Tree]]:
    """Decorate ``solver(init, *meta_args) -> solution`` so that the gradient of its
    solution comes from the implicit function theorem.

    Args:
        optimality_fn: ``F(solution, *meta_args) -> residual``, zero at the solution,
            the residual a tree shaped like the solution (for an inner minimisation,
            the gradient of the inner objective). ``solution`` and every meta
            argument may be a tree; non-tensor meta arguments and integer or boolean tensors (labels,
            indices) are constants, and so, in a backward pass, is every tensor that pass does not
            differentiate (a data batch without ``requires_grad``, or outside ``torch.func.grad``'s
            argument): the solve's ``u^T dF/dtheta`` is taken for the differentiated ones only.
        solve: the linear solver of ``(dF/dx)^T u = -v``: ``"cg"`` (``dF/dx``
            symmetric positive definite), ``"minres"`` (symmetric, definite or not:
            the Hessian of a non-convex inner objective), ``"normal_cg"`` (any non-singular),
            ``"neumann"``, ``"dense"``, a `bilevel.linalg.LinearSolver`, or a callable
            ``(matvec, b, rmatvec=None) -> (u, SolveInfo)``.
        **solve_options: options of the named solver (``max_iter``, ``tol``,
            ``damping``; ``step_size`` for ``neumann``). Under ``vmap`` (one batched solve over tasks)
            CG and MINRES run every one of their ``max_iter`` iterations, by default twice the number of
            unknowns plus ten: give a ``max_iter`` near what one solve needs (a few tens for a small
            network), or the batched backward pass costs time and memory for thousands of iterations.

    Returns:
        A decorator. The decorated solver returns the solution unchanged; its
        gradient with respect to every tensor in ``meta_args`` is implicit, with
        respect to ``init`` it is zero. ``decorated.diagnostics`` holds the last
        backward pass's linear-solve record (`ImplicitDiagnostics`); a solve that
        misses its tolerance warns with a `LinearSolveWarning`. Under ``vmap`` neither
        happens (the values are batched): use `implicit_vjp`, which returns them per task.
        The gradient is only as good as the solver's root: nothing here checks that
        ``optimality_fn`` vanishes at the returned solution (for `newton_cg`, compare the
        norm of the inner gradient there with its ``tol``).
    """
    if not callable(optimality_fn):
        raise TypeError(f"`optimality_fn` must be callable; got {type(optimality_fn).__name__}")
    linear_solver = make_solver(solve, **solve_options)

    def decorator(solver: Callable[..., Tree]) -> Callable[..., Tree]:
        diagnostics = ImplicitDiagnostics()
        name = getattr(solver, "__name__", "solver")

        @functools.wraps(solver)
        def decorated(init: Tree, *meta_args: Any) -> Tree:
            meta_leaves, meta_spec = optree.tree_flatten(meta_args, none_is_leaf=True)
            tensor_leaves = [leaf for leaf in meta_leaves if isinstance(leaf, Tensor)]
            template = tuple(_TENSOR if isinstance(leaf, Tensor) else leaf for leaf in meta_leaves)
            frozen_args = optree.tree_map(
                lambda a: a.detach() if isinstance(a, Tensor) else a, meta_args, none_is_leaf=True
            )
            solution = tree.detach(solver(tree.detach(init), *frozen_args))
            solution_leaves, solution_spec = optree.tree_flatten(solution)
            problem = _Problem(
                optimality_fn=optimality_fn,
                linear_solver=linear_solver,
                diagnostics=diagnostics,
                name=name,
                solution_spec=solution_spec,
                meta_spec=meta_spec,
                meta_template=template,
                num_solution_leaves=len(solution_leaves),
                differentiable=tuple(leaf.is_floating_point() or leaf.is_complex() for leaf in tensor_leaves),
            )
            outputs = _ImplicitRoot.apply(problem, *solution_leaves, *tensor_leaves)
            return optree.tree_unflatten(solution_spec, list(outputs))

        decorated.diagnostics = diagnostics  # type: ignore[attr-defined]
        return decorated

    return decorator
