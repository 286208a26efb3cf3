"""Linear algebra over parameter trees: curvature products and linear solvers.

Every solver takes a linear operator as a function ``matvec(v) -> A v`` on trees
and returns ``(x, SolveInfo)``. The solvers run a fixed number of iterations with
converged entries frozen by ``torch.where``, so they run unchanged under ``vmap``
and ``grad``; outside any ``torch.func`` transform they stop as soon as the
residual meets the tolerance.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch._C._functorch as _functorch
from torch import Tensor

from bilevel import tree
from bilevel._checks import scalar_valued
from bilevel.tree import Tree

MatVec = Callable[[Tree], Tree]

__all__ = [
    "LinearSolver",
    "SolveInfo",
    "conjugate_gradient",
    "hessian_vector_operator",
    "hvp",
    "make_solver",
    "neumann_series",
    "solve_cg",
    "solve_dense",
    "solve_neumann",
    "solve_normal_cg",
]


class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve; all 0-dim tensors.

    ``iterations`` counts the iterations that changed the solution,
    ``residual_norm`` is ``||b - A x||`` at the returned ``x`` and
    ``converged`` whether it met ``max(tol * ||b||, atol)``."""

    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor


def _outside_transforms() -> bool:
    return _functorch.maybe_current_level() is None


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping == 0.0:
        return matvec
    return lambda v: tree.axpy(damping, v, matvec(v))


def _check_common(max_iter: int | None, tol: float, damping: float) -> None:
    if max_iter is not None and max_iter < 1:
        raise ValueError(f"`max_iter` must be >= 1 or None; got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"`tol` must be >= 0; got {tol}")
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0; got {damping}")


def conjugate_gradient(
    matvec: MatVec,
    b: Tree,
    *,
    x0: Tree | None = None,
    max_iter: int | None = None,
    tol: float = 1e-10,
    atol: float = 0.0,
    damping: float = 0.0,
) -> tuple[Tree, SolveInfo]:
    """Solve ``(A + damping I) x = b`` for symmetric positive-definite ``A``.

    Hestenes-Stiefel conjugate gradient over trees (Nocedal & Wright, Alg. 5.2):
    ``alpha_k = r_k.r_k / p_k.A p_k``, ``x_{k+1} = x_k + alpha_k p_k``,
    ``r_{k+1} = r_k - alpha_k A p_k``, ``p_{k+1} = r_{k+1} + (r_{k+1}.r_{k+1} / r_k.r_k) p_k``.

    Args:
        matvec: ``v -> A v`` on trees shaped like ``b``.
        b: the right-hand side tree.
        x0: the starting point (zeros by default).
        max_iter: iteration limit; ``None`` means twice the number of unknowns
            plus ten (CG is exact after ``n`` steps in exact arithmetic; the rest
            absorbs rounding). Under ``vmap`` every iteration runs.
        tol: relative tolerance: stop once ``||r|| <= max(tol * ||b||, atol)``.
        atol: absolute tolerance.
        damping: Tikhonov damping added to the operator.

    Returns:
        ``(x, SolveInfo)``.
    """
    _check_common(max_iter, tol, damping)
    operator = _damped(matvec, damping)
    limit = 2 * tree.numel(b) + 10 if max_iter is None else max_iter
    b_norm_sq = tree.dot(b, b)
    threshold_sq = torch.clamp(tol**2 * b_norm_sq, min=atol**2)

    if x0 is None:
        x = tree.zeros_like(b)
        r = b
    else:
        tree.check_same_structure(x0, b, ("x0", "b"))
        x = x0
        r = tree.sub(b, operator(x0))
    p = r
    rs = tree.dot(r, r)
    iterations = torch.zeros((), dtype=torch.long, device=rs.device)
    eager = _outside_transforms()

    for _ in range(limit):
        active = rs > threshold_sq
        if eager and not bool(active):
            break
        Ap = operator(p)
        pAp = tree.dot(p, Ap)
        alpha = torch.where(active, rs / torch.where(active, pAp, torch.ones_like(pAp)), 0.0)
        x = tree.axpy(alpha, p, x)
        r = tree.axpy(-alpha, Ap, r)
        rs_new = tree.dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), 0.0)
        p = tree.map(lambda ri, pi, a=active, bt=beta: torch.where(a, ri + bt * pi, pi), r, p)
        rs = torch.where(active, rs_new, rs)
        iterations = iterations + active.long()

    return x, SolveInfo(iterations, torch.sqrt(rs), rs <= threshold_sq)


def neumann_series(
    matvec: MatVec,
    b: Tree,
    *,
    max_iter: int = 50,
    step_size: float = 1.0,
    tol: float = 1e-10,
    damping: float = 0.0,
) -> tuple[Tree, SolveInfo]:
    """Approximate ``(A + damping I)^{-1} b`` by the truncated Neumann series
    ``x = step_size * sum_{k=0}^{K} (I - step_size A)^k b``.

    Converges when the spectral radius of ``I - step_size A`` is below one (for
    symmetric positive-definite ``A``: ``step_size < 2 / lambda_max``); it needs
    no symmetry. The reported residual is ``||b - A x||`` at the end."""
    _check_common(max_iter, tol, damping)
    operator = _damped(matvec, damping)
    term = tree.scale(b, step_size)
    x = term
    for _ in range(max_iter):
        term = tree.sub(term, tree.scale(operator(term), step_size))
        x = tree.add(x, term)
    residual = tree.norm(tree.sub(b, operator(x)))
    converged = residual <= tol * tree.norm(b)
    return x, SolveInfo(torch.tensor(max_iter, device=residual.device), residual, converged)


def hessian_vector_operator(
    f: Callable[..., Tensor],
    params: Tree,
    *args: Any,
    mode: str = "reverse-over-reverse",
) -> MatVec:
    """The linear operator ``v -> (d^2 f / d params^2) v`` at ``params``, for repeated use
    (a conjugate-gradient solve).

    ``mode="reverse-over-reverse"`` linearises once: it runs ``grad(f)`` a single time,
    keeps its graph, and each product is one ``vjp`` through it (the Hessian is
    symmetric, so ``v^T H = (H v)^T``). ``mode="forward-over-reverse"`` computes
    ``jvp(grad(f), params, v)`` afresh for every product: no graph is kept, at the cost
    of a full forward-mode pass each time. On the MAML-TRPO KL of
    ``examples/custom_method.py`` (20 tasks, one inner step) a product costs 0.24 s
    reverse-over-reverse after a 0.18 s linearisation, against 1.36 s forward-over-reverse.
    ``f(params, *args)`` must return a scalar; ``f`` may itself contain gradient steps
    (then the products are third-order derivatives)."""
    grad_f = torch.func.grad(scalar_valued(lambda p: f(p, *args), "f"))
    if mode == "reverse-over-reverse":
        _, vjp_fn = torch.func.vjp(grad_f, params)

        def product(v: Tree) -> Tree:
            tree.check_same_structure(params, v, ("params", "v"))
            return vjp_fn(v)[0]

        return product
    if mode == "forward-over-reverse":

        def forward_product(v: Tree) -> Tree:
            tree.check_same_structure(params, v, ("params", "v"))
            return torch.func.jvp(grad_f, (params,), (v,))[1]

        return forward_product
    raise ValueError(f"`mode` must be 'forward-over-reverse' or 'reverse-over-reverse'; got {mode!r}")


def hvp(
    f: Callable[..., Tensor],
    params: Tree,
    v: Tree,
    *args: Any,
    mode: str = "forward-over-reverse",
) -> Tree:
    """One Hessian-vector product ``(d^2 f / d params^2) v``.

    ``f(params, *args)`` must return a scalar. ``mode="forward-over-reverse"`` is
    ``jvp(grad(f), params, v)``, which keeps no graph; ``"reverse-over-reverse"`` is
    ``vjp(grad(f))(v)``. For many products at the same point, build the operator once
    with `hessian_vector_operator`. Composes with further ``torch.func`` transforms."""
    tree.check_same_structure(params, v, ("params", "v"))
    return hessian_vector_operator(f, params, *args, mode=mode)(v)


@dataclass(frozen=True)
class LinearSolver:
    """A configured linear solver: ``solver(matvec, b, rmatvec=None) -> (x, SolveInfo)``.

    ``matvec`` applies ``A``; ``rmatvec`` applies ``A^T`` and is needed only by
    ``normal_cg``. Build one with `solve_cg`, `solve_normal_cg`, `solve_neumann`,
    `solve_dense` or `make_solver`."""

    method: str
    max_iter: int | None = None
    tol: float = 1e-10
    damping: float = 0.0
    step_size: float = 1.0

    def __call__(self, matvec: MatVec, b: Tree, rmatvec: MatVec | None = None) -> tuple[Tree, SolveInfo]:
        if self.method == "cg":
            return conjugate_gradient(matvec, b, max_iter=self.max_iter, tol=self.tol, damping=self.damping)
        if self.method == "normal_cg":
            if rmatvec is None:
                raise ValueError("the 'normal_cg' solver needs `rmatvec` (v -> A^T v)")
            return _normal_cg(matvec, rmatvec, b, self)
        if self.method == "neumann":
            return neumann_series(
                matvec,
                b,
                max_iter=50 if self.max_iter is None else self.max_iter,
                step_size=self.step_size,
                tol=self.tol,
                damping=self.damping,
            )
        return _dense_solve(matvec, b, self)


def _normal_cg(matvec: MatVec, rmatvec: MatVec, b: Tree, config: LinearSolver) -> tuple[Tree, SolveInfo]:
    """Solve ``A x = b`` through the normal equations ``(A^T A + damping I) x = A^T b``;
    the reported residual is that of the original system."""
    x, info = conjugate_gradient(
        lambda v: rmatvec(matvec(v)),
        rmatvec(b),
        max_iter=config.max_iter,
        tol=config.tol,
        damping=config.damping,
    )
    residual = tree.norm(tree.sub(b, matvec(x)))
    return x, SolveInfo(info.iterations, residual, info.converged)


def _dense_solve(matvec: MatVec, b: Tree, config: LinearSolver) -> tuple[Tree, SolveInfo]:
    """Materialise ``A`` column by column (one batched ``matvec`` over the identity)
    and solve with ``torch.linalg.solve``: exact, for up to a few thousand unknowns.
    ``converged`` flags only a (numerically) singular matrix: a relative residual
    above 1e-6."""
    b_flat, unravel = tree.ravel(b)
    n = b_flat.shape[-1]
    eye = torch.eye(n, dtype=b_flat.dtype, device=b_flat.device)
    columns = torch.func.vmap(lambda e: tree.ravel(matvec(unravel(e)))[0])(eye)
    matrix = columns.T + config.damping * eye
    x_flat = torch.linalg.solve(matrix, b_flat)
    residual = torch.linalg.vector_norm(b_flat - matrix @ x_flat)
    converged = torch.isfinite(residual) & (residual <= 1e-6 * torch.linalg.vector_norm(b_flat))
    return unravel(x_flat), SolveInfo(torch.tensor(1, device=residual.device), residual, converged)


def solve_cg(max_iter: int | None = None, tol: float = 1e-10, damping: float = 0.0) -> LinearSolver:
    """Conjugate gradient: for symmetric positive-definite systems (the Hessian of a
    convex inner objective)."""
    _check_common(max_iter, tol, damping)
    return LinearSolver("cg", max_iter=max_iter, tol=tol, damping=damping)


def solve_normal_cg(max_iter: int | None = None, tol: float = 1e-10, damping: float = 0.0) -> LinearSolver:
    """Conjugate gradient on the normal equations: any non-singular system, at the
    price of squaring its condition number."""
    _check_common(max_iter, tol, damping)
    return LinearSolver("normal_cg", max_iter=max_iter, tol=tol, damping=damping)


def solve_neumann(
    max_iter: int = 50, step_size: float = 1.0, tol: float = 1e-10, damping: float = 0.0
) -> LinearSolver:
    """Truncated Neumann series (see `neumann_series`)."""
    _check_common(max_iter, tol, damping)
    if not step_size > 0:
        raise ValueError(f"`step_size` must be > 0; got {step_size}")
    return LinearSolver("neumann", max_iter=max_iter, tol=tol, damping=damping, step_size=step_size)


def solve_dense(damping: float = 0.0) -> LinearSolver:
    """Exact dense solve of the materialised matrix (see `_dense_solve`)."""
    _check_common(None, 0.0, damping)
    return LinearSolver("dense", damping=damping)


_FACTORIES: dict[str, Callable[..., LinearSolver]] = {
    "cg": solve_cg,
    "normal_cg": solve_normal_cg,
    "neumann": solve_neumann,
    "dense": solve_dense,
}


def make_solver(solve: str | LinearSolver | Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """Resolve a solver given by name (``"cg"``, ``"normal_cg"``, ``"neumann"``,
    ``"dense"``, with ``kwargs`` for its factory), a `LinearSolver`, or any
    callable of the same signature."""
    if isinstance(solve, str):
        if solve not in _FACTORIES:
            raise ValueError(f"`solve` must be one of {sorted(_FACTORIES)}; got {solve!r}")
        return _FACTORIES[solve](**kwargs)
    if kwargs:
        raise ValueError(f"solver options {sorted(kwargs)} apply only when `solve` is a name")
    if not callable(solve):
        raise TypeError(f"`solve` must be a solver name or a callable; got {type(solve).__name__}")
    return solve
