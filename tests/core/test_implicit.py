"""`implicit_root` against exact hypergradients, finite differences and torch.func transforms."""

import warnings

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from bilevel import implicit_root
from bilevel.implicit import LinearSolveWarning, implicit_vjp
from bilevel.linalg import solve_neumann

DTYPE = torch.float64


def ridge_data(seed: int, n: int, d: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=DTYPE), torch.randn(n, generator=g, dtype=DTYPE),
            torch.randn(d, generator=g, dtype=DTYPE))


def ridge_objective(params, X, y, lam):
    return 0.5 * ((X @ params["w"] - y) ** 2).sum() + 0.5 * lam * (params["w"] ** 2).sum()


def ridge_optimality(params, X, y, lam):
    return torch.func.grad(ridge_objective)(params, X, y, lam)


def ridge_closed_form(X, y, lam):
    return torch.linalg.solve(X.T @ X + lam * torch.eye(X.shape[1], dtype=DTYPE), X.T @ y)


def solve_by_gradient_descent(init, X, y, lam):
    """A solver unrelated to the closed form: plain gradient descent to convergence."""
    w = init["w"]
    step = 1.0 / (torch.linalg.matrix_norm(X, ord=2) ** 2 + lam)
    for _ in range(5000):
        w = w - step * (X.T @ (X @ w - y) + lam * w)
    return {"w": w}


def outer_loss(w, target):
    return ((w - target) ** 2).sum()


def solver_options(name, X, lam):
    if name == "neumann":
        eig = torch.linalg.eigvalsh(X.T @ X)
        return {"solve": solve_neumann(max_iter=4000, step_size=float(1.0 / (eig[-1] + lam)), tol=1e-12)}
    return {"solve": name}


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), d=st.integers(1, 6), lam=st.floats(0.5, 5.0),
       solver=st.sampled_from(["cg", "minres", "normal_cg", "neumann", "dense"]))
def test_ridge_hypergradient_is_exact_for_every_solver(seed, d, lam, solver):
    X, y, target = ridge_data(seed, 3 * d + 5, d)
    X = X / X.shape[0] ** 0.5 * 2
    ridge = implicit_root(ridge_optimality, **solver_options(solver, X, lam))(
        lambda init, X, y, lam: {"w": ridge_closed_form(X, y, lam)})
    lam = torch.tensor(lam, dtype=DTYPE)
    init = {"w": torch.zeros(d, dtype=DTYPE)}
    hyper = torch.func.grad(lambda l, y: outer_loss(ridge(init, X, y, l)["w"], target), argnums=(0, 1))(lam, y)
    exact = torch.func.grad(lambda l, y: outer_loss(ridge_closed_form(X, y, l), target), argnums=(0, 1))(lam, y)
    for ours, reference in zip(hyper, exact, strict=True):
        assert float((ours - reference).norm() / reference.norm()) <= 1e-8


def test_any_solver_and_autograd_and_diagnostics():
    X, y, target = ridge_data(0, 40, 5)
    ridge = implicit_root(ridge_optimality, solve="cg", tol=1e-12)(solve_by_gradient_descent)
    lam = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    y_leaf = y.clone().requires_grad_()
    outer_loss(ridge({"w": torch.zeros(5, dtype=DTYPE)}, X, y_leaf, lam)["w"], target).backward()
    exact = torch.func.grad(lambda l, y: outer_loss(ridge_closed_form(X, y, l), target), argnums=(0, 1))(
        lam.detach(), y)
    torch.testing.assert_close(lam.grad, exact[0], rtol=1e-8, atol=0)
    torch.testing.assert_close(y_leaf.grad, exact[1], rtol=1e-8, atol=0)
    assert ridge.diagnostics.calls == 1
    assert ridge.diagnostics.converged
    assert 1 <= ridge.diagnostics.iterations <= 5
    assert ridge.diagnostics.residual_norm < 1e-10


def logistic_objective(params, X, labels, log_lam):
    logits = X @ params["w"] + params["b"]
    data = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
    return data + 0.5 * torch.exp(log_lam) @ params["w"] ** 2


def logistic_solver(init, X, labels, log_lam):
    """Newton's method on the strictly convex regularised logistic loss."""
    params = init
    flat = torch.cat([params["w"], params["b"].reshape(1)])
    for _ in range(30):
        def objective(v):
            return logistic_objective({"w": v[:-1], "b": v[-1]}, X, labels, log_lam)
        flat = flat - torch.linalg.solve(torch.func.hessian(objective)(flat), torch.func.grad(objective)(flat))
    return {"w": flat[:-1], "b": flat[-1]}


def test_logistic_regression_matches_central_finite_differences():
    g = torch.Generator().manual_seed(5)
    X = torch.randn(60, 4, generator=g, dtype=DTYPE)
    true_w = torch.tensor([1.0, -2, 0.5, 0], dtype=DTYPE)
    labels = (torch.rand(60, generator=g, dtype=DTYPE) < torch.sigmoid(X @ true_w)).to(DTYPE)
    X_val = torch.randn(30, 4, generator=g, dtype=DTYPE)
    labels_val = (torch.rand(30, generator=g, dtype=DTYPE) < 0.5).to(DTYPE)
    init = {"w": torch.zeros(4, dtype=DTYPE), "b": torch.zeros((), dtype=DTYPE)}
    fit = implicit_root(torch.func.grad(logistic_objective), solve="cg", tol=1e-13)(logistic_solver)

    def validation_loss(log_lam, solver):
        params = solver(init, X, labels, log_lam)
        return torch.nn.functional.binary_cross_entropy_with_logits(X_val @ params["w"] + params["b"], labels_val)

    log_lam = torch.tensor([0.0, 1.0, -1.0, 0.5], dtype=DTYPE)
    hyper = torch.func.grad(validation_loss)(log_lam, fit)
    eps = 1e-5
    fd = torch.stack([(validation_loss(log_lam + eps * e, logistic_solver)
                       - validation_loss(log_lam - eps * e, logistic_solver)) / (2 * eps)
                      for e in torch.eye(4, dtype=DTYPE)])
    torch.testing.assert_close(hyper, fd, rtol=1e-6, atol=1e-9)


def test_vmap_equals_loop_and_jacrev_equals_exact_jacobian():
    X, y, _ = ridge_data(1, 30, 4)
    ridge = implicit_root(ridge_optimality)(solve_by_gradient_descent)
    init = {"w": torch.zeros(4, dtype=DTYPE)}
    lams = torch.tensor([0.2, 1.0, 3.0], dtype=DTYPE)

    def weight_norm(lam):
        return (ridge(init, X, y, lam)["w"] ** 2).sum()

    batched = torch.func.vmap(torch.func.grad(weight_norm))(lams)
    looped = torch.stack([torch.func.grad(weight_norm)(lam) for lam in lams])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-14)

    lam = torch.tensor(0.7, dtype=DTYPE)
    jac = torch.func.jacrev(lambda y: ridge(init, X, y, lam)["w"])(y)
    exact = torch.linalg.solve(X.T @ X + lam * torch.eye(4, dtype=DTYPE), X.T)
    torch.testing.assert_close(jac, exact, rtol=1e-9, atol=1e-12)


def test_implicit_vjp_under_vmap_returns_each_solve_and_equals_the_decorated_gradient():
    """The backward pass as a function: vmapped over ridge penalties it gives every task's hypergradient
    (as `implicit_root`'s gradient does, task by task) and every task's `SolveInfo`, which the decorated
    solver cannot record under vmap; the decorated solver's ``relative_residual`` is ``residual / ||v||``."""
    X, y, target = ridge_data(3, 25, 4)
    lams = torch.tensor([0.3, 1.0, 4.0], dtype=DTYPE)
    ridge = implicit_root(ridge_optimality, solve="cg", max_iter=2)(
        lambda init, X, y, lam: {"w": ridge_closed_form(X, y, lam)})

    def hypergradient(lam):
        w = ridge_closed_form(X, y, lam)
        cotangent = {"w": torch.func.grad(outer_loss)(w, target)}
        (grad,), info = implicit_vjp(lambda p, lam: ridge_optimality(p, X, y, lam), {"w": w}, (lam,), cotangent,
                                     solve="cg", max_iter=2)
        return grad, info, cotangent["w"].norm()

    grads, infos, rhs_norms = torch.func.vmap(hypergradient)(lams)
    assert infos.residual_norm.shape == (3,) and not infos.converged.any()
    for lam, grad, residual, rhs_norm in zip(lams, grads, infos.residual_norm, rhs_norms, strict=True):
        with pytest.warns(LinearSolveWarning):
            expected = torch.func.grad(lambda lam: outer_loss(ridge(None, X, y, lam)["w"], target))(lam)
        torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-14)
        assert ridge.diagnostics.residual_norm == pytest.approx(float(residual), rel=1e-12)
        assert ridge.diagnostics.relative_residual == pytest.approx(float(residual / rhs_norm), rel=1e-12)


def test_scalar_root():
    cube_root = implicit_root(lambda x, theta: x**3 - theta)(lambda init, theta: theta ** (1 / 3))
    theta = torch.tensor(8.0, dtype=DTYPE)
    grad = torch.func.grad(lambda t: cube_root(torch.tensor(1.0, dtype=DTYPE), t))(theta)
    torch.testing.assert_close(grad, torch.tensor(1 / 12, dtype=DTYPE), rtol=1e-12, atol=0)


def test_ill_conditioned_solve_warns_with_its_residual():
    d = 30
    spectrum = torch.logspace(-8, 0, d, dtype=DTYPE)
    q, _ = torch.linalg.qr(torch.randn(d, d, dtype=DTYPE, generator=torch.Generator().manual_seed(0)))
    hessian = q @ torch.diag(spectrum) @ q.T
    root = implicit_root(lambda x, b: hessian @ x - b, solve="cg", max_iter=5)(
        lambda init, b: torch.linalg.solve(hessian, b))
    b = torch.ones(d, dtype=DTYPE, requires_grad=True)
    with pytest.warns(LinearSolveWarning, match="residual"):
        root(torch.zeros(d, dtype=DTYPE), b).sum().backward()
    assert root.diagnostics.converged is False
    assert root.diagnostics.iterations == 5


def test_no_warning_when_converged():
    X, y, _ = ridge_data(2, 20, 3)
    ridge = implicit_root(ridge_optimality)(lambda init, X, y, lam: {"w": ridge_closed_form(X, y, lam)})
    lam = torch.tensor(1.0, dtype=DTYPE, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LinearSolveWarning)
        ridge({"w": torch.zeros(3, dtype=DTYPE)}, X, y, lam)["w"].sum().backward()
    assert ridge.diagnostics.converged is True
    assert lam.grad is not None and torch.isfinite(lam.grad)


def test_bad_solver_is_named():
    with pytest.raises(ValueError, match="'qr'"):
        implicit_root(ridge_optimality, solve="qr")
    with pytest.raises(TypeError, match="solve"):
        implicit_root(ridge_optimality, solve=3)
    with pytest.raises(ValueError, match="max_iter"):
        implicit_root(ridge_optimality, solve="cg", max_iter=0)
    with pytest.raises(TypeError, match="optimality_fn"):
        implicit_root(None)


@pytest.mark.parametrize("solver", [{"solve": "cg", "tol": 1e-14}, {"solve": "dense"}])
def test_second_derivatives_follow_the_solution(solver):
    """Differentiating the backward pass again sees ``x*(lambda)``: the Hessian of the outer loss in
    ``(lambda, y)`` by ``jacrev(jacrev)``, ``grad(grad)`` and autograd's double backward equals the closed
    form's (float64)."""
    X, y, target = ridge_data(4, 12, 3)
    ridge = implicit_root(ridge_optimality, **solver)(
        lambda init, X, y, lam: {"w": ridge_closed_form(X, y, lam)})
    init = {"w": torch.zeros(3, dtype=DTYPE)}
    lam = torch.tensor(0.7, dtype=DTYPE)

    def ours(lam, y):
        return outer_loss(ridge(init, X, y, lam)["w"], target)

    def exact(lam, y):
        return outer_loss(ridge_closed_form(X, y, lam), target)

    for argnums in (0, 1):
        hessian = torch.func.jacrev(torch.func.jacrev(ours, argnums=argnums), argnums=argnums)(lam, y)
        reference = torch.func.jacrev(torch.func.jacrev(exact, argnums=argnums), argnums=argnums)(lam, y)
        torch.testing.assert_close(hessian, reference, rtol=1e-8, atol=1e-12)
    second = torch.func.grad(torch.func.grad(ours))(lam, y)
    torch.testing.assert_close(second, torch.func.grad(torch.func.grad(exact))(lam, y), rtol=1e-8, atol=0)
    leaf = lam.clone().requires_grad_()
    (first,) = torch.autograd.grad(ours(leaf, y), leaf, create_graph=True)
    (double,) = torch.autograd.grad(first, leaf)
    torch.testing.assert_close(double, second, rtol=1e-10, atol=0)


def test_integer_meta_arguments_are_constants():
    """An integer tensor among the meta arguments (labels) gets no gradient and breaks nothing, under
    ``grad`` and ``backward``."""
    X, _, target = ridge_data(5, 10, 3)
    labels = torch.tensor([0, 1, 1, 0, 1, 0, 0, 1, 1, 1])

    def optimality(params, lam, labels):
        return ridge_optimality(params, X, labels.to(DTYPE), lam)

    ridge = implicit_root(optimality, tol=1e-13)(
        lambda init, lam, labels: {"w": ridge_closed_form(X, labels.to(DTYPE), lam)})
    init = {"w": torch.zeros(3, dtype=DTYPE)}
    lam = torch.tensor(0.4, dtype=DTYPE)
    exact = torch.func.grad(lambda l: outer_loss(ridge_closed_form(X, labels.to(DTYPE), l), target))(lam)
    ours = torch.func.grad(lambda l: outer_loss(ridge(init, l, labels)["w"], target))(lam)
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=0)
    leaf = lam.clone().requires_grad_()
    outer_loss(ridge(init, leaf, labels)["w"], target).backward()
    torch.testing.assert_close(leaf.grad, exact, rtol=1e-9, atol=0)


class _NoBackward(torch.autograd.Function):
    """The identity, whose backward pass fails: a data path that must not be differentiated."""

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        raise AssertionError("the backward pass differentiated a meta argument nobody asked about")


def test_meta_arguments_a_backward_pass_does_not_differentiate_are_constants():
    """The data ``X, y`` reach the optimality condition through a path that fails if differentiated; the
    gradient in ``lam`` still equals the closed form's, under ``grad`` and ``backward``; asking for the
    data's gradient too does differentiate it."""
    X, y, target = ridge_data(6, 10, 3)
    ridge = implicit_root(lambda p, X, y, lam: ridge_optimality(p, _NoBackward.apply(X), y, lam), tol=1e-13)(
        lambda init, X, y, lam: {"w": ridge_closed_form(X, y, lam)})
    init = {"w": torch.zeros(3, dtype=DTYPE)}
    lam = torch.tensor(0.4, dtype=DTYPE)
    exact = torch.func.grad(lambda l: outer_loss(ridge_closed_form(X, y, l), target))(lam)
    ours = torch.func.grad(lambda l: outer_loss(ridge(init, X, y, l)["w"], target))(lam)
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=0)
    leaf = lam.clone().requires_grad_()
    outer_loss(ridge(init, X, y, leaf)["w"], target).backward()
    torch.testing.assert_close(leaf.grad, exact, rtol=1e-9, atol=0)
    with pytest.raises(AssertionError, match="nobody asked"):
        torch.func.grad(lambda data: outer_loss(ridge(init, data, y, lam)["w"], target))(X)


@pytest.mark.parametrize("solve", [{"solve": "dense"}, {"solve": "normal_cg", "tol": 1e-14}])
def test_a_non_symmetric_optimality_condition_solves_the_transposed_system(solve):
    """``F(x, theta) = A x - B theta`` with a non-symmetric ``A``: ``x* = A^{-1} B theta`` and the hypergradient
    of ``||x* - t||^2`` is ``B^T A^{-T} 2 (x* - t)``. A backward pass that solved ``(dF/dx) u = -v`` instead of
    the transposed system would be right only for symmetric ``dF/dx`` (every gradient-of-an-objective case)."""
    g = torch.Generator().manual_seed(11)
    A = torch.randn(4, 4, generator=g, dtype=DTYPE) + 4 * torch.eye(4, dtype=DTYPE)
    A = A + 2.0 * torch.triu(torch.ones(4, 4, dtype=DTYPE), 1)
    B = torch.randn(4, 3, generator=g, dtype=DTYPE)
    target = torch.randn(4, generator=g, dtype=DTYPE)
    theta = torch.randn(3, generator=g, dtype=DTYPE)
    root = implicit_root(lambda x, theta: A @ x - B @ theta, **solve)(
        lambda init, theta: torch.linalg.solve(A, B @ theta))
    ours = torch.func.grad(lambda th: ((root(torch.zeros(4, dtype=DTYPE), th) - target) ** 2).sum())(theta)
    x_star = torch.linalg.solve(A, B @ theta)
    exact = B.T @ torch.linalg.solve(A.T, 2 * (x_star - target))
    torch.testing.assert_close(ours, exact, rtol=1e-9, atol=1e-12)
