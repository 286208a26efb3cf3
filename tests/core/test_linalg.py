"""Conjugate gradient, the other linear solvers, and Hessian-vector products."""

import hypothesis.strategies as st
import pytest
import torch
from hypothesis import given, settings

from bilevel import conjugate_gradient, hvp, tree
from bilevel.linalg import hessian_vector_operator, make_solver

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


@pytest.mark.parametrize("name", ["cg", "normal_cg", "neumann", "dense"])
def test_named_solvers_agree(name):
    A = spd_matrix(4, 6, condition=5.0)
    b = torch.randn(6, dtype=DTYPE)
    options = {"step_size": 0.3, "max_iter": 400} if name == "neumann" else {}
    x, info = make_solver(name, **options)(lambda v: A @ v, b, rmatvec=lambda v: A.T @ v)
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-9, atol=1e-10)
    assert bool(info.converged)


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
