"""`unroll` against closed forms on strongly convex quadratic inner problems; `newton_cg` reaching
stationary points without ever raising the loss."""

import itertools

import hypothesis.strategies as st
import pytest
import torch
import torchopt
from hypothesis import given, settings

from bilevel import implicit_root, unroll
from bilevel.inner import adam, meta_sgd, newton_cg

DTYPE = torch.float64


def quadratic_problem(seed: int, dim: int):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(dim, dim, generator=g, dtype=DTYPE)
    curvature = m @ m.T / dim + torch.eye(dim, dtype=DTYPE)
    x0 = torch.randn(dim, generator=g, dtype=DTYPE)
    b = torch.randn(dim, generator=g, dtype=DTYPE)
    target = torch.randn(dim, generator=g, dtype=DTYPE)
    return curvature, x0, b, target


def inner_loss(curvature, b):
    return lambda p: 0.5 * p["x"] @ curvature @ p["x"] - b @ p["x"]


def outer_loss(x, target):
    return 0.5 * ((x - target) ** 2).sum() + (x**3).sum() / 3


def closed_form(curvature, x0, b, target, lr, steps, first_order):
    """x_K = B^K x0 + sum_j B^j lr b, B = I - lr A; dL/dx0 = (B^K)^T g, dL/db = (lr sum_j B^j)^T g;
    first order: dx_K/dx0 = I, dx_K/db = 0."""
    eye = torch.eye(len(x0), dtype=DTYPE)
    contraction = eye - lr * curvature
    powers = [torch.linalg.matrix_power(contraction, j) for j in range(steps + 1)]
    x_final = powers[steps] @ x0 + lr * sum(powers[:steps], torch.zeros_like(eye)) @ b
    g = (x_final - target) + x_final**2
    if first_order:
        return g, torch.zeros_like(b)
    return powers[steps].T @ g, (lr * sum(powers[:steps], torch.zeros_like(eye))).T @ g


def meta_objective(curvature, target, lr, steps, first_order=False):
    def objective(x0, b):
        adapted = unroll(inner_loss(curvature, b), {"x": x0}, torchopt.sgd(lr), steps, first_order=first_order)
        return outer_loss(adapted["x"], target)

    return objective


def relative_error(a, b):
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**31), dim=st.integers(1, 6), steps=st.integers(0, 8),
       lr=st.floats(0.01, 0.3), first_order=st.booleans())
def test_meta_gradient_matches_closed_form(seed, dim, steps, lr, first_order):
    curvature, x0, b, target = quadratic_problem(seed, dim)
    grad_x0, grad_b = torch.func.grad(meta_objective(curvature, target, lr, steps, first_order), argnums=(0, 1))(
        x0, b
    )
    expected_x0, expected_b = closed_form(curvature, x0, b, target, lr, steps, first_order)
    assert relative_error(grad_x0, expected_x0) <= 1e-8
    if first_order or steps == 0:
        assert grad_b.abs().max() == 0
    else:
        assert relative_error(grad_b, expected_b) <= 1e-8


def test_autograd_and_func_grad_agree():
    curvature, x0, b, target = quadratic_problem(0, 4)
    objective = meta_objective(curvature, target, 0.1, 5)
    x0_leaf, b_leaf = x0.clone().requires_grad_(), b.clone().requires_grad_()
    objective(x0_leaf, b_leaf).backward()
    grad_x0, grad_b = torch.func.grad(objective, argnums=(0, 1))(x0, b)
    torch.testing.assert_close(x0_leaf.grad, grad_x0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(b_leaf.grad, grad_b, rtol=1e-12, atol=1e-14)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), dim=st.integers(1, 5), steps=st.integers(0, 5), first_order=st.booleans(),
       optimizer=st.sampled_from(["sgd", "adam", "meta_sgd"]))
def test_autograd_gradient_equals_func_gradient(seed, dim, steps, first_order, optimizer):
    """`unroll(gradient="autograd")`: the same adapted parameters and the same meta-gradient, in the start
    point and in the meta-parameters the loss closes over, as the ``torch.func.grad`` path."""
    curvature, x0, b, target = quadratic_problem(seed, dim)
    make = {"sgd": lambda: torchopt.sgd(0.1), "adam": lambda: adam(0.05), "meta_sgd": lambda: meta_sgd(0.1)}[optimizer]
    results = []
    for gradient in ("func", "autograd"):
        x0_leaf, b_leaf = x0.clone().requires_grad_(), b.clone().requires_grad_()
        adapted = unroll(inner_loss(curvature, b_leaf), {"x": x0_leaf}, make(), steps,
                         first_order=first_order, gradient=gradient)
        outer_loss(adapted["x"], target).backward()
        results.append((adapted["x"].detach(), x0_leaf.grad, b_leaf.grad))
    for func_value, autograd_value in zip(*results, strict=True):
        if func_value is None or autograd_value is None:
            assert func_value is None or not func_value.any()
            assert autograd_value is None or not autograd_value.any()
        else:
            torch.testing.assert_close(autograd_value, func_value, rtol=1e-12, atol=1e-14)


def test_autograd_gradient_refuses_torch_func_transforms():
    def objective(x0):
        return unroll(lambda p: (p["x"] ** 2).sum(), {"x": x0}, torchopt.sgd(0.1), 1, gradient="autograd")["x"].sum()

    with pytest.raises(RuntimeError, match=r"torch\.func"):
        torch.func.grad(objective)(torch.ones(2, dtype=DTYPE))


@pytest.mark.parametrize("optimizer", [torchopt.sgd(0.1), adam(0.05), meta_sgd(0.1)], ids=["sgd", "adam", "meta_sgd"])
def test_vmap_over_tasks_equals_loop(optimizer):
    curvature, x0, _, target = quadratic_problem(1, 3)
    task_b = torch.randn(6, 3, dtype=DTYPE, generator=torch.Generator().manual_seed(2))

    def objective(x0, b):
        adapted = unroll(inner_loss(curvature, b), {"x": x0}, optimizer, 4)
        return outer_loss(adapted["x"], target)

    batched = torch.func.vmap(torch.func.grad(objective), in_dims=(None, 0))(x0, task_b)
    looped = torch.stack([torch.func.grad(objective)(x0, b) for b in task_b])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)


def test_meta_sgd_learning_rate_gradient_matches_finite_differences():
    curvature, x0, b, target = quadratic_problem(3, 3)

    def objective(rates):
        adapted = unroll(inner_loss(curvature, b), {"x": x0}, meta_sgd({"x": rates}), 3)
        return outer_loss(adapted["x"], target)

    rates = torch.tensor([0.1, 0.2, 0.05], dtype=DTYPE)
    grad = torch.func.grad(objective)(rates)
    eps = 1e-6
    fd = torch.stack([(objective(rates + eps * e) - objective(rates - eps * e)) / (2 * eps)
                      for e in torch.eye(3, dtype=DTYPE)])
    torch.testing.assert_close(grad, fd, rtol=1e-7, atol=1e-9)


def test_differentiable_adam_is_finite_at_zero_gradient():
    def objective(x0, optimizer):
        return unroll(lambda p: (p["x"] ** 2).sum(), {"x": x0}, optimizer, 3)["x"].sum()

    zero_start = torch.zeros(4, dtype=DTYPE)
    ours = torch.func.grad(objective)(zero_start, adam(0.1))
    assert torch.isfinite(ours).all()
    torchopt_default = torch.func.grad(objective)(zero_start, torchopt.adam(0.1))
    assert torch.isnan(torchopt_default).all(), "TorchOpt's eps_root=0 default is the NaN this guards against"


def test_adam_meta_gradient_matches_finite_differences():
    curvature, x0, b, target = quadratic_problem(4, 3)

    def objective(x0):
        adapted = unroll(inner_loss(curvature, b), {"x": x0}, adam(0.05, eps=1e-3), 4)
        return outer_loss(adapted["x"], target)

    grad = torch.func.grad(objective)(x0)
    eps = 1e-6
    fd = torch.stack([(objective(x0 + eps * e) - objective(x0 - eps * e)) / (2 * eps)
                      for e in torch.eye(3, dtype=DTYPE)])
    torch.testing.assert_close(grad, fd, rtol=1e-6, atol=1e-8)


def test_bad_input_is_named():
    params = {"x": torch.zeros(2)}
    with pytest.raises(ValueError, match="inner_loss"):
        unroll(lambda p: p["x"] * 2, params, torchopt.sgd(0.1), 1)
    with pytest.raises(ValueError, match="steps"):
        unroll(lambda p: p["x"].sum(), params, torchopt.sgd(0.1), -1)
    with pytest.raises(TypeError, match="optimizer"):
        unroll(lambda p: p["x"].sum(), params, torch.optim.SGD, 1)
    with pytest.raises(ValueError, match="'tape'"):
        unroll(lambda p: p["x"].sum(), params, torchopt.sgd(0.1), 1, gradient="tape")
    with pytest.raises(ValueError, match="lrs"):
        unroll(lambda p: p["x"].sum(), params, meta_sgd({"y": torch.ones(2)}), 1)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        meta_sgd(torch.ones(2))
    with pytest.raises(ValueError, match="eps_root"):
        adam(0.1, eps_root=0.0)


def rosenbrock(p):
    x = p["x"]
    return (100 * (x[1:] - x[:-1] ** 2) ** 2 + (1 - x[:-1]) ** 2).sum()


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), dim=st.integers(1, 6))
def test_newton_cg_solves_a_quadratic_in_one_step(seed, dim):
    curvature, x0, b, _ = quadratic_problem(seed, dim)
    solution = newton_cg(inner_loss(curvature, b), {"x": x0}, steps=1, cg_iters=dim, damping=0.0, tol=0.0)
    torch.testing.assert_close(solution["x"], torch.linalg.solve(curvature, b), rtol=1e-8, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(start=st.lists(st.floats(-2.0, 2.0), min_size=2, max_size=4))
def test_newton_cg_never_raises_the_loss(start):
    params = {"x": torch.tensor(start, dtype=DTYPE)}
    losses = [rosenbrock(params)]
    for _ in range(30):
        params = newton_cg(rosenbrock, params, steps=1, cg_iters=8, tol=1e-9)
        losses.append(rosenbrock(params))
    assert all(later <= earlier for earlier, later in itertools.pairwise(losses))


@settings(max_examples=10, deadline=None)
@given(x=st.floats(-2.0, 2.0), y=st.floats(-2.0, 2.0))
def test_newton_cg_reaches_the_stationary_point_of_a_nonconvex_loss(x, y):
    solved = newton_cg(rosenbrock, {"x": torch.tensor([x, y], dtype=DTYPE)}, steps=200, cg_iters=2, tol=1e-9)
    assert torch.func.grad(rosenbrock)(solved)["x"].norm() <= 1e-9
    torch.testing.assert_close(solved["x"], torch.ones(2, dtype=DTYPE))


def test_newton_cg_keeps_every_iterate_feasible():
    radius = 0.5
    within = lambda p: p["x"].norm() <= radius  # noqa: E731
    solved = newton_cg(rosenbrock, {"x": torch.zeros(3, dtype=DTYPE)}, steps=50, feasible=within)
    assert solved["x"].norm() <= radius
    assert rosenbrock(solved) < rosenbrock({"x": torch.zeros(3, dtype=DTYPE)})


def test_newton_cg_under_vmap_equals_a_loop_and_feeds_implicit_root():
    starts = torch.tensor([[-1.2, 1.0], [0.5, -0.5], [1.5, 2.0]], dtype=DTYPE)

    def solve(x0):
        return newton_cg(rosenbrock, {"x": x0}, steps=100, cg_iters=4, tol=1e-10)["x"]

    torch.testing.assert_close(torch.vmap(solve)(starts), torch.stack([solve(x0) for x0 in starts]))

    curvature, x0, b, target = quadratic_problem(3, 4)
    residual = torch.func.grad(lambda p, shift: inner_loss(curvature, b + shift)(p))
    solver = implicit_root(residual, solve="dense")(
        lambda init, shift: newton_cg(inner_loss(curvature, b + shift), init, steps=20, cg_iters=4, tol=1e-12))
    shift = torch.zeros(4, dtype=DTYPE, requires_grad=True)
    (grad,) = torch.autograd.grad(outer_loss(solver({"x": x0}, shift)["x"], target), shift)
    x_star = torch.linalg.solve(curvature, b)
    expected = torch.linalg.solve(curvature, x_star - target + x_star**2)
    torch.testing.assert_close(grad, expected, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize(("options", "message"), [({"steps": -1}, "steps"), ({"cg_iters": 0}, "cg_iters"),
                                                   ({"damping": -1.0}, "damping"), ({"armijo": 1.0}, "armijo")])
def test_newton_cg_bad_input_is_named(options, message):
    with pytest.raises(ValueError, match=message):
        newton_cg(rosenbrock, {"x": torch.zeros(2, dtype=DTYPE)}, **{"steps": 1, **options})
