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
    "gauss_newton_vector_operator",
    "hessian_vector_operator",
    "hvp",
    "known_all_false",
    "make_solver",
    "minres",
    "neumann_series",
    "solve_cg",
    "solve_dense",
    "solve_minres",
    "solve_neumann",
    "solve_normal_cg",
]


class SolveInfo(NamedTuple):
    """Diagnostics of a linear solve; all 0-dim tensors.

    ``iterations`` counts the iterations that changed the solution, ``residual_norm`` is the
    residual the iteration tracks and ``converged`` whether it met ``max(tol * ||b||, atol)``.
    For CG and MINRES the tracked residual is updated by recursion (CG's ``r - alpha A p``,
    MINRES's ``phibar``): it equals ``||b - A x||`` in exact arithmetic, but in floating point the
    true residual stalls near ``eps * cond(A) * ||b||`` while the recursion keeps falling. In float32
    a ``tol`` below about ``1e-6 * cond(A)`` is therefore met by the recursion only; compute
    ``||b - A x||`` yourself where the true value matters. The other solvers report the true
    residual."""

    iterations: Tensor
    residual_norm: Tensor
    converged: Tensor


def known_all_false(flag: Tensor) -> bool:
    """Whether the 0-dim boolean ``flag`` is known to be False everywhere, for a masked loop to stop early:
    never under ``vmap``, where it may differ per batch element; under ``grad`` and eagerly its value is
    read."""
    while _functorch.is_functorch_wrapped_tensor(flag):
        if _functorch.is_batchedtensor(flag):
            return False
        flag = _functorch.get_unwrapped(flag)
    return not bool(flag)


def _damped(matvec: MatVec, damping: float) -> MatVec:
    if damping == 0.0:
        return matvec
    return lambda v: tree.axpy(damping, v, matvec(v))


def _check_common(max_iter: int | None, tol: float, damping: float, atol: float = 0.0) -> None:
    if max_iter is not None and (isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1):
        raise ValueError(f"`max_iter` must be an int >= 1 or None; got {max_iter!r}")
    if not tol >= 0:
        raise ValueError(f"`tol` must be >= 0; got {tol}")
    if not atol >= 0:
        raise ValueError(f"`atol` must be >= 0; got {atol}")
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0; got {damping}")


def _check_rhs(b: Tree) -> None:
    if tree.numel(b) == 0:
        raise ValueError("the right-hand side `b` has no entries: nothing to solve")


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
    _check_common(max_iter, tol, damping, atol)
    _check_rhs(b)
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

    for _ in range(limit):
        active = rs > threshold_sq
        if known_all_false(active):
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


def minres(
    matvec: MatVec,
    b: Tree,
    *,
    max_iter: int | None = None,
    tol: float = 1e-10,
    atol: float = 0.0,
    damping: float = 0.0,
) -> tuple[Tree, SolveInfo]:
    """Solve ``(A + damping I) x = b`` for symmetric ``A``, definite or not, by MINRES.

    Paige & Saunders (1975), as in SciPy's ``minres`` without a preconditioner: Lanczos builds an
    orthonormal basis ``V_k`` of the Krylov space ``K_k(A, b)`` with ``A V_k = V_{k+1} T_k``
    (``T_k`` tridiagonal, ``(k + 1) x k``), and ``x_k = V_k y_k`` minimises ``||b - A x||`` over
    ``K_k``, ``y_k = argmin ||beta_1 e_1 - T_k y||`` by Givens rotations updated one column a step.
    The residual norm is then non-increasing in ``k`` and equals the rotations' running product
    ``phibar_k``. CG minimises the ``A``-norm of the error instead, which is a norm only for a
    positive-definite ``A``: on an indefinite one its iterates are undefined where ``p.A p = 0`` and
    its residual can grow; MINRES's cannot. One ``matvec`` an iteration, like CG.

    Args:
        matvec: ``v -> A v`` on trees shaped like ``b``, ``A`` symmetric.
        b: the right-hand side tree.
        max_iter: iteration limit; ``None``: twice the number of unknowns plus ten. Under ``vmap``
            every iteration runs.
        tol: relative tolerance: stop once ``||r|| <= max(tol * ||b||, atol)``.
        atol: absolute tolerance.
        damping: Tikhonov damping added to the operator.

    Returns:
        ``(x, SolveInfo)``; ``residual_norm`` is ``phibar``, ``||b - (A + damping I) x||`` in exact
        arithmetic.
    """
    _check_common(max_iter, tol, damping, atol)
    _check_rhs(b)
    operator = _damped(matvec, damping)
    limit = 2 * tree.numel(b) + 10 if max_iter is None else max_iter
    beta1 = tree.norm(b)
    threshold = torch.clamp(tol * beta1, min=atol)
    tiny = torch.finfo(beta1.dtype).tiny ** 0.5

    def safe(value: Tensor) -> Tensor:
        return torch.where(value > tiny, value, torch.ones_like(value))

    zero = torch.zeros_like(beta1)
    x, w, w2 = tree.zeros_like(b), tree.zeros_like(b), tree.zeros_like(b)
    r1, r2, y = b, b, b
    beta, oldb, dbar, epsln, phibar = beta1, zero, zero, zero, beta1
    cs, sn = -torch.ones_like(beta1), zero
    iterations = torch.zeros((), dtype=torch.long, device=beta1.device)

    for k in range(limit):
        active = (phibar > threshold) & (beta > tiny)
        if known_all_false(active):
            break
        v = tree.scale(y, 1 / safe(beta))
        y_new = operator(v)
        if k > 0:
            y_new = tree.axpy(-beta / safe(oldb), r1, y_new)
        alpha = tree.dot(v, y_new)
        y_new = tree.axpy(-alpha / safe(beta), r2, y_new)
        beta_new = tree.norm(y_new)
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln_new = sn * beta_new
        dbar_new = -cs * beta_new
        gamma = torch.clamp(torch.sqrt(gbar**2 + beta_new**2), min=tiny)
        cs_new, sn_new = gbar / gamma, beta_new / gamma
        phi = cs_new * phibar
        w_new = tree.scale(tree.sub(tree.sub(v, tree.scale(w2, epsln)), tree.scale(w, delta)), 1 / gamma)

        def keep(new: Any, old: Any, active: Tensor = active) -> Any:
            if isinstance(new, Tensor):
                return torch.where(active, new, old)
            return tree.where(active, new, old)

        x = keep(tree.axpy(phi, w_new, x), x)
        w2, w = keep(w, w2), keep(w_new, w)
        r1, r2, y = keep(r2, r1), keep(y_new, r2), keep(y_new, y)
        oldb, beta = keep(beta, oldb), keep(beta_new, beta)
        epsln, dbar = keep(epsln_new, epsln), keep(dbar_new, dbar)
        cs, sn = keep(cs_new, cs), keep(sn_new, sn)
        phibar = keep(sn_new * phibar, phibar)
        iterations = iterations + active.long()

    return x, SolveInfo(iterations, phibar, phibar <= threshold)


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
    if max_iter is None:
        raise ValueError("`max_iter` of the Neumann series must be an int >= 1; got None")
    _check_common(max_iter, tol, damping)
    if not step_size > 0:
        raise ValueError(f"`step_size` must be > 0; got {step_size}")
    _check_rhs(b)
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


def gauss_newton_vector_operator(
    outputs_fn: Callable[..., Tree],
    output_loss_fn: Callable[[Tree], Tensor],
    params: Tree,
    *args: Any,
    mode: str = "reverse",
) -> MatVec:
    """The Gauss-Newton operator ``v -> J^T H J v`` of ``f = output_loss_fn(outputs_fn(params, *args))`` at
    ``params``, for repeated use (a conjugate-gradient solve).

    ``y = outputs_fn(params, *args)`` is a tree of outputs (a policy's mean ``[..., A]`` and log-std),
    ``J = dy / d params`` its Jacobian and ``H = d^2 output_loss_fn / dy^2`` the output loss's Hessian at ``y``.
    Since ``d^2 f / d params^2 = J^T H J + sum_k (d output_loss_fn / dy_k) d^2 y_k / d params^2``, the operator
    equals the Hessian-vector product of ``f`` wherever ``output_loss_fn`` has zero gradient at ``y``: the
    mean KL ``KL(pi_old || pi_y)`` at ``pi_y = pi_old``, where it is the Fisher-vector product of TRPO. It is
    symmetric, and positive semi-definite when ``H`` is (a convex output loss).

    Linearised once: one ``vjp`` of ``outputs_fn``, kept for ``J^T u``, and one of the output loss's gradient
    (`hessian_vector_operator` on ``y``) for ``H``. ``mode="reverse"`` also linearises ``u -> J^T u`` (a
    ``vjp`` of the kept vjp at ``u = 0``; exact, the map is linear), so that each product is three reverse
    passes through kept graphs: ``J v``, ``H (J v)``, ``J^T (H J v)``. ``mode="forward"`` forms ``J v`` by a
    ``jvp`` through ``outputs_fn`` at every product, keeping one graph fewer. When ``outputs_fn`` contains an
    inner gradient step (MAML) the products differentiate it once fewer than the exact Hessian-vector product:
    on MB-MPO's meta-KL (5 models x 200 steps x 20 trajectories, one inner step) a product costs 0.45 s
    ``"reverse"`` and 0.6-0.8 s ``"forward"`` against 0.8-1.1 s exact with the Jacobian penalty in the inner
    loss, 0.045 s, 0.09 s and 0.086 s without. ``output_loss_fn(y)`` must return a scalar."""
    if mode not in ("reverse", "forward"):
        raise ValueError(f"`mode` must be 'reverse' or 'forward'; got {mode!r}")
    outputs, vjp_fn = torch.func.vjp(lambda p: outputs_fn(p, *args), params)
    output_hvp = hessian_vector_operator(scalar_valued(output_loss_fn, "output_loss_fn"), outputs)
    if mode == "reverse":
        _, jacobian_product = torch.func.vjp(lambda u: vjp_fn(u)[0], tree.zeros_like(outputs))

        def product(v: Tree) -> Tree:
            tree.check_same_structure(params, v, ("params", "v"))
            return vjp_fn(output_hvp(jacobian_product(v)[0]))[0]

        return product

    def forward_product(v: Tree) -> Tree:
        tree.check_same_structure(params, v, ("params", "v"))
        jv = torch.func.jvp(lambda p: outputs_fn(p, *args), (params,), (v,))[1]
        return vjp_fn(output_hvp(jv))[0]

    return forward_product


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
    ``normal_cg``. Build one with `solve_cg`, `solve_minres`, `solve_normal_cg`, `solve_neumann`,
    `solve_dense` or `make_solver`."""

    method: str
    max_iter: int | None = None
    tol: float = 1e-10
    damping: float = 0.0
    step_size: float = 1.0

    def __post_init__(self) -> None:
        if self.method not in _FACTORIES:
            raise ValueError(f"`method` must be one of {sorted(_FACTORIES)}; got {self.method!r}")

    def __call__(self, matvec: MatVec, b: Tree, rmatvec: MatVec | None = None) -> tuple[Tree, SolveInfo]:
        if self.method == "cg":
            return conjugate_gradient(matvec, b, max_iter=self.max_iter, tol=self.tol, damping=self.damping)
        if self.method == "minres":
            return minres(matvec, b, max_iter=self.max_iter, tol=self.tol, damping=self.damping)
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


def solve_minres(max_iter: int | None = None, tol: float = 1e-10, damping: float = 0.0) -> LinearSolver:
    """MINRES (see `minres`): for symmetric systems, definite or not (the Hessian of a non-convex
    inner objective), with a residual that never grows."""
    _check_common(max_iter, tol, damping)
    return LinearSolver("minres", max_iter=max_iter, tol=tol, damping=damping)


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
    "minres": solve_minres,
    "normal_cg": solve_normal_cg,
    "neumann": solve_neumann,
    "dense": solve_dense,
}


def make_solver(solve: str | LinearSolver | Callable[..., Any], **kwargs: Any) -> Callable[..., Any]:
    """Resolve a solver given by name (``"cg"``, ``"minres"``, ``"normal_cg"``, ``"neumann"``,
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
