"""Conjugate gradient, the other linear solvers, Hessian-vector and Gauss-Newton products."""

import itertools

import hypothesis.strategies as st
import pytest
import torch
import torchopt
from hypothesis import given, settings

from bilevel import conjugate_gradient, hvp, tree, unroll
from bilevel.linalg import (
    LinearSolver,
    gauss_newton_vector_operator,
    hessian_vector_operator,
    make_solver,
    minres,
    neumann_series,
)
from bilevel.nets import gaussian_kl

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
    assert int(info.iterations) <= 2 * n


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


def test_dense_solves_non_symmetric_systems():
    g = torch.Generator().manual_seed(8)
    A = torch.randn(5, 5, generator=g, dtype=DTYPE) + 5 * torch.eye(5, dtype=DTYPE)
    A = A + 3.0 * torch.triu(torch.ones(5, 5, dtype=DTYPE), 1)
    b = {"u": torch.randn(2, generator=g, dtype=DTYPE), "v": torch.randn(3, generator=g, dtype=DTYPE)}

    def matvec(t):
        product = A @ torch.cat([t["u"], t["v"]])
        return {"u": product[:2], "v": product[2:]}

    x, info = make_solver("dense")(matvec, b)
    torch.testing.assert_close(torch.cat([x["u"], x["v"]]), torch.linalg.solve(A, torch.cat([b["u"], b["v"]])),
                               rtol=1e-10, atol=1e-12)
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


def gaussian_mlp_kl_problem(seed: int, inner_steps: int):
    """A tanh-MLP Gaussian policy ``N(mu_theta'(s), exp(log_std'))`` on 16 states, ``theta'`` after ``inner_steps``
    policy-gradient steps on a second batch; ``outputs_fn(theta) = (mu [16, 2], log_std [2])`` and
    ``kl(y) = mean_s KL(pi_old(.|s) || N(y))`` with ``pi_old`` the policy at the returned ``theta``."""
    g = torch.Generator().manual_seed(seed)
    params = {"w1": 0.5 * torch.randn(5, 3, generator=g, dtype=DTYPE), "b1": 0.1 * torch.randn(5, generator=g,
                                                                                              dtype=DTYPE),
              "w2": 0.5 * torch.randn(2, 5, generator=g, dtype=DTYPE), "b2": torch.zeros(2, dtype=DTYPE),
              "log_std": -0.5 + 0.1 * torch.randn(2, generator=g, dtype=DTYPE)}
    obs, inner_obs = torch.randn(16, 3, generator=g, dtype=DTYPE), torch.randn(16, 3, generator=g, dtype=DTYPE)
    inner_actions = torch.randn(16, 2, generator=g, dtype=DTYPE)
    inner_advantages = torch.randn(16, generator=g, dtype=DTYPE)

    def mean(p, states):
        return torch.tanh(states @ p["w1"].T + p["b1"]) @ p["w2"].T + p["b2"]

    def adapted(p):
        def pg_loss(q):
            log_prob = torch.distributions.Normal(mean(q, inner_obs), q["log_std"].exp()).log_prob(inner_actions)
            return -(log_prob.sum(-1) * inner_advantages).mean()

        return unroll(pg_loss, p, torchopt.sgd(0.3), inner_steps)

    def outputs_fn(p):
        q = adapted(p)
        return mean(q, obs), q["log_std"]

    old_mean, old_log_std = tree.detach(outputs_fn(params))

    def kl_of_outputs(y):
        return gaussian_kl(old_mean, old_log_std, y[0], y[1]).mean()

    return params, outputs_fn, kl_of_outputs


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31), inner_steps=st.sampled_from([0, 1]), mode=st.sampled_from(["reverse", "forward"]))
def test_gauss_newton_equals_the_kl_hessian_at_the_old_policy(seed, inner_steps, mode):
    """At ``theta_old`` the KL's output gradient vanishes, so ``J^T H J v`` is the exact Hessian-vector product of
    ``theta -> KL(outputs_fn(theta))``, with or without a (MAML) inner step inside ``outputs_fn``."""
    params, outputs_fn, kl_of_outputs = gaussian_mlp_kl_problem(seed, inner_steps)
    exact = hessian_vector_operator(lambda p: kl_of_outputs(outputs_fn(p)), params)
    gauss_newton = gauss_newton_vector_operator(outputs_fn, kl_of_outputs, params, mode=mode)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(2):
        v = tree.map(lambda x: torch.randn(x.shape, generator=g, dtype=DTYPE), params)
        torch.testing.assert_close(tree.ravel(gauss_newton(v))[0], tree.ravel(exact(v))[0], rtol=1e-10,
                                   atol=1e-12)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_gauss_newton_equals_the_dense_jacobian_product_away_from_a_minimum(mode):
    """``J^T H J`` from ``jacrev`` and ``hessian``, at a point where the output loss's gradient is not zero (so
    it differs from the full Hessian); extra ``args`` reach ``outputs_fn``."""
    g = torch.Generator().manual_seed(3)
    params = {"a": torch.randn(3, generator=g, dtype=DTYPE), "b": torch.randn(2, generator=g, dtype=DTYPE)}
    x = torch.randn(4, 3, generator=g, dtype=DTYPE)

    def outputs_fn(p, inputs):
        return {"u": torch.sin(inputs @ p["a"]) * p["b"][0], "w": p["b"] ** 3 + p["a"][:2] * p["b"]}

    def output_loss(y):
        return (y["u"] ** 4).sum() + torch.cos(y["w"]).sum() + y["u"].sum() * y["w"].prod()

    flat, unravel = tree.ravel(params)
    outputs, unravel_out = tree.ravel(outputs_fn(params, x))
    jacobian = torch.func.jacrev(lambda z: tree.ravel(outputs_fn(unravel(z), x))[0])(flat)
    output_hessian = torch.func.hessian(lambda y: output_loss(unravel_out(y)))(outputs)
    dense = jacobian.T @ output_hessian @ jacobian
    full = torch.func.hessian(lambda z: output_loss(outputs_fn(unravel(z), x)))(flat)
    assert not torch.allclose(dense, full)
    operator = gauss_newton_vector_operator(outputs_fn, output_loss, params, x, mode=mode)
    for _ in range(3):
        v = torch.randn(flat.shape, generator=g, dtype=DTYPE)
        torch.testing.assert_close(tree.ravel(operator(unravel(v)))[0], dense @ v, rtol=1e-10, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31), mode=st.sampled_from(["reverse", "forward"]))
def test_gauss_newton_is_symmetric_positive_semidefinite_for_a_convex_output_loss(seed, mode):
    """The matrix of ``J^T H J`` for a convex output loss (log-sum-exp plus a squared norm), materialised column by
    column, is symmetric with eigenvalues ``>= 0`` (to rounding), though ``outputs_fn`` is not linear."""
    g = torch.Generator().manual_seed(seed)
    params = {"w": torch.randn(4, 3, generator=g, dtype=DTYPE), "c": torch.randn(4, generator=g, dtype=DTYPE)}
    x = torch.randn(6, 3, generator=g, dtype=DTYPE)

    def outputs_fn(p):
        return torch.tanh(x @ p["w"].T + p["c"])

    def output_loss(y):
        return torch.logsumexp(y, dim=-1).sum() + 0.1 * (y**2).sum()

    flat, unravel = tree.ravel(params)
    operator = gauss_newton_vector_operator(outputs_fn, output_loss, params, mode=mode)
    matrix = torch.stack([tree.ravel(operator(unravel(e)))[0] for e in torch.eye(flat.numel(), dtype=DTYPE)], 1)
    torch.testing.assert_close(matrix, matrix.T, rtol=1e-10, atol=1e-12)
    eigenvalues = torch.linalg.eigvalsh(matrix)
    assert float(eigenvalues.min()) >= -1e-10 * max(1.0, float(eigenvalues.max()))


def test_gauss_newton_bad_arguments_are_named():
    params = {"a": torch.ones(2, dtype=DTYPE)}
    with pytest.raises(ValueError, match="output_loss_fn"):
        gauss_newton_vector_operator(lambda p: p["a"] * 2, lambda y: y, params)
    operator = gauss_newton_vector_operator(lambda p: p["a"] * 2, lambda y: (y**2).sum(), params)
    with pytest.raises(ValueError, match="params"):
        operator({"b": torch.ones(2, dtype=DTYPE)})
    with pytest.raises(ValueError, match=r"mode.*'jvp'"):
        gauss_newton_vector_operator(lambda p: p["a"] * 2, lambda y: (y**2).sum(), params, mode="jvp")


def counting(A):
    calls = []

    def matvec(v):
        calls.append(1)
        return A @ v

    return matvec, calls


@pytest.mark.parametrize("solver", [conjugate_gradient, minres])
def test_early_stop_under_grad_as_outside_transforms(solver):
    """Under ``torch.func.grad`` a solve stops when its residual meets the tolerance, as it does
    eagerly, rather than running all ``2 n + 10`` masked iterations (only ``vmap`` must run them)."""
    n = 60
    A = spd_matrix(8, n, condition=10.0)
    b = torch.randn(n, dtype=DTYPE, generator=torch.Generator().manual_seed(9))
    matvec, eager_calls = counting(A)
    _, info = solver(matvec, b, tol=1e-10)
    assert bool(info.converged) and len(eager_calls) < n
    matvec, grad_calls = counting(A)

    def solved_sum(rhs):
        return solver(matvec, rhs, tol=1e-10)[0].sum()

    gradient = torch.func.grad(solved_sum)(b)
    assert len(grad_calls) == len(eager_calls)
    torch.testing.assert_close(gradient, torch.linalg.solve(A, torch.ones(n, dtype=DTYPE)), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda A, b: make_solver("cg", max_iter=2.5)(lambda v: A @ v, b), "max_iter"),
        (lambda A, b: conjugate_gradient(lambda v: A @ v, b, atol=-0.5), "atol"),
        (lambda A, b: minres(lambda v: A @ v, b, atol=-0.5), "atol"),
        (lambda A, b: conjugate_gradient(lambda v: v, {}), "no entries"),
        (lambda A, b: LinearSolver("cgg")(lambda v: A @ v, b), "'cgg'"),
        (lambda A, b: neumann_series(lambda v: A @ v, b, max_iter=None), "max_iter"),
        (lambda A, b: neumann_series(lambda v: A @ v, b, step_size=-1.0), "step_size"),
    ],
)
def test_bad_solver_input_is_named(call, message):
    A = spd_matrix(10, 3)
    with pytest.raises(ValueError, match=message):
        call(A, torch.ones(3, dtype=DTYPE))


@pytest.mark.parametrize("name", ["cg", "minres", "neumann"])
@pytest.mark.parametrize("iterations", [2, 4, 6])
def test_converged_is_exactly_the_residual_meeting_the_tolerance(name, iterations):
    """``converged`` is ``residual_norm <= tol * ||b||`` with no slack: with the tolerance set just below and
    just above the residual that ``iterations`` steps reach, the flag is False and then True."""
    A = spd_matrix(12, 10, condition=50.0)
    b = torch.randn(10, dtype=DTYPE, generator=torch.Generator().manual_seed(13))
    options = {"step_size": 0.02} if name == "neumann" else {}

    def solve(tol):
        return make_solver(name, max_iter=iterations, tol=tol, **options)(lambda v: A @ v, b)

    _, info = solve(0.0)
    reached = float(info.residual_norm / torch.linalg.vector_norm(b))
    assert reached > 0
    for factor, expected in ((1 / 1.5, False), (1.5, True)):
        _, info = solve(reached * factor)
        assert bool(info.converged) is expected, (factor, reached)
