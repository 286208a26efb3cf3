"""Conjugate gradient, the other linear solvers, and Hessian-vector products."""

import itertools

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from bilevel import conjugate_gradient, hvp, tree
from bilevel.linalg import hessian_vector_operator, make_solver, minres

DTYPE = torch.float64


def spd_matrix(seed: int, n: int, condition: float = 100.0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    return q @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(condition)).item(), n, dtype=DTYPE)) @ q.T


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), damping=st.sampled_from([0.0, 0.1, 2.0]))
def test_cg_solves_random_spd_systems(seed, n, damping):
    A = spd_matrix(seed, n)
    b = torch.randn(n, dtype=DTYPE, generator=torch.Generator().manual_seed(seed + 1))
    x, info = conjugate_gradient(lambda v: A @ v, b, tol=1e-13, damping=damping)
    expected = torch.linalg.solve(A + damping * torch.eye(n, dtype=DTYPE), b)
    torch.testing.assert_close(x, expected, rtol=1e-9, atol=1e-11)
    assert bool(info.converged)
    assert int(info.iterations) <= 2 * n + 10


def test_cg_over_trees_and_under_vmap():
    A = spd_matrix(0, 5)
    b = {"u": torch.randn(2, dtype=DTYPE), "v": torch.randn(3, dtype=DTYPE)}
    flat_b, unravel = tree.ravel(b)

    def matvec(t):
        return unravel(A @ tree.ravel(t)[0])

    x, _ = conjugate_gradient(matvec, b, tol=1e-13)
    torch.testing.assert_close(tree.ravel(x)[0], torch.linalg.solve(A, flat_b))

    rhs = torch.randn(4, 5, dtype=DTYPE)
    batched, infos = torch.func.vmap(lambda r: conjugate_gradient(lambda v: A @ v, r, tol=1e-13))(rhs)
    torch.testing.assert_close(batched, torch.linalg.solve(A, rhs.T).T)
    assert infos.converged.all()


def test_iteration_limit_reports_unconverged():
    A = spd_matrix(3, 20, condition=1e6)
    b = torch.ones(20, dtype=DTYPE)
    x, info = conjugate_gradient(lambda v: A @ v, b, max_iter=3)
    assert int(info.iterations) == 3
    assert not bool(info.converged)
    torch.testing.assert_close(info.residual_norm, torch.linalg.vector_norm(b - A @ x), rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("name", ["cg", "minres", "normal_cg", "neumann", "dense"])
def test_named_solvers_agree(name):
    A = spd_matrix(4, 6, condition=5.0)
    b = torch.randn(6, dtype=DTYPE)
    options = {"step_size": 0.3, "max_iter": 400} if name == "neumann" else {}
    x, info = make_solver(name, **options)(lambda v: A @ v, b, rmatvec=lambda v: A.T @ v)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert bool(info.converged)


def symmetric_indefinite_matrix(seed: int, n: int, negative: int):
    """``Q diag(s) Q^T`` with ``|s|`` log-spaced in [0.5, 5] and ``min(negative, n)`` of them negative."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    spectrum = torch.logspace(-0.3, 0.7, n, dtype=DTYPE)
    spectrum[: min(negative, n)] *= -1
    return q @ torch.diag(spectrum) @ q.T


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), negative=st.integers(0, 12),
       damping=st.sampled_from([0.0, 0.1]))
def test_minres_solves_random_symmetric_indefinite_systems(seed, n, negative, damping):
    A = symmetric_indefinite_matrix(seed, n, negative)
    b = torch.randn(n, dtype=DTYPE, generator=torch.Generator().manual_seed(seed + 1))
    x, info = minres(lambda v: A @ v, b, tol=1e-13, damping=damping)
    expected = torch.linalg.solve(A + damping * torch.eye(n, dtype=DTYPE), b)
    torch.testing.assert_close(x, expected, rtol=1e-8, atol=1e-10)
    assert bool(info.converged)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), negative=st.integers(0, 5))
def test_minres_residual_is_true_non_increasing_and_at_most_cgs(seed, negative):
    """MINRES minimises ``||b - A x||`` over the Krylov space that holds CG's iterate: after ``k``
    iterations its residual is at most CG's (compared on positive-definite systems, where CG is
    defined), never grows with ``k``, and the reported ``phibar`` is the true residual."""
    n = 15
    A = symmetric_indefinite_matrix(seed, n, negative)
    b = torch.randn(n, dtype=DTYPE, generator=torch.Generator().manual_seed(seed + 1))
    residuals = []
    for k in range(1, 9):
        x, info = minres(lambda v: A @ v, b, max_iter=k, tol=0.0)
        true = torch.linalg.vector_norm(b - A @ x)
        torch.testing.assert_close(info.residual_norm, true, rtol=1e-8, atol=1e-12)
        residuals.append(float(true))
        if negative == 0:
            x_cg, _ = conjugate_gradient(lambda v: A @ v, b, max_iter=k, tol=0.0)
            assert float(true) <= float(torch.linalg.vector_norm(b - A @ x_cg)) * (1 + 1e-9) + 1e-12
    assert all(later <= earlier * (1 + 1e-9) + 1e-12 for earlier, later in itertools.pairwise(residuals))


def test_minres_over_trees_under_vmap_equals_a_loop():
    A = symmetric_indefinite_matrix(5, 5, 2)
    b = torch.randn(4, 5, dtype=DTYPE, generator=torch.Generator().manual_seed(6))

    def matvec(t):
        product = A @ torch.cat([t["u"], t["v"]])
        return {"u": product[:2], "v": product[2:]}

    def solve(rhs):
        x, info = minres(matvec, {"u": rhs[:2], "v": rhs[2:]}, max_iter=4, tol=0.0)
        return torch.cat([x["u"], x["v"]]), info.residual_norm

    batched, batched_residuals = torch.func.vmap(solve)(b)
    for row, x, residual in zip(b, batched, batched_residuals, strict=True):
        looped, looped_residual = solve(row)
        torch.testing.assert_close(x, looped, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(residual, looped_residual, rtol=1e-12, atol=1e-14)


def test_normal_cg_solves_non_symmetric_systems():
    g = torch.Generator().manual_seed(7)
    A = torch.randn(5, 5, generator=g, dtype=DTYPE) + 5 * torch.eye(5, dtype=DTYPE)
    b = torch.randn(5, generator=g, dtype=DTYPE)
    x, _ = make_solver("normal_cg", tol=1e-14)(lambda v: A @ v, b, rmatvec=lambda v: A.T @ v)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("mode", ["forward-over-reverse", "reverse-over-reverse"])
def test_hvp_matches_explicit_hessian(mode):
    g = torch.Generator().manual_seed(8)
    params = {"a": torch.randn(3, generator=g, dtype=DTYPE), "b": torch.randn(2, generator=g, dtype=DTYPE)}
    v = {"a": torch.randn(3, generator=g, dtype=DTYPE), "b": torch.randn(2, generator=g, dtype=DTYPE)}

    def f(p, scale):
        return scale * torch.sin(p["a"]).sum() * (p["b"] ** 2).sum() + (p["a"] ** 4).sum()

    flat, unravel = tree.ravel(params)
    hessian = torch.func.hessian(lambda x: f(unravel(x), 2.0))(flat)
    product = hvp(f, params, v, 2.0, mode=mode)
    torch.testing.assert_close(tree.ravel(product)[0], hessian @ tree.ravel(v)[0])
    operator = hessian_vector_operator(f, params, 2.0, mode=mode)
    for _ in range(2):
        w = tree.map(torch.randn_like, v)
        torch.testing.assert_close(tree.ravel(operator(w))[0], hessian @ tree.ravel(w)[0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="damping"):
        conjugate_gradient(lambda v: v, torch.ones(2), damping=-1.0)
    with pytest.raises(ValueError, match="mode"):
        hvp(lambda p: p.sum(), torch.ones(2), torch.ones(2), mode="fast")
    with pytest.raises(ValueError, match="params"):
        hvp(lambda p: p["a"].sum(), {"a": torch.ones(2)}, {"b": torch.ones(2)})
    with pytest.raises(ValueError, match="rmatvec"):
        make_solver("normal_cg")(lambda v: v, torch.ones(2))
