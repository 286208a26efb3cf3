"""The TRPO step: a natural-gradient direction and a KL-constrained line search.

Schulman et al. 2015 (TRPO), Appendix C: with ``g = dL/dtheta`` of the loss to
minimise and ``F`` the Hessian of the mean KL at the current parameters,

    s = F^{-1} g                      (conjugate gradient, Fisher-vector products)
    beta = sqrt(2 delta / s^T F s)    (the step that reaches KL = delta to 2nd order)
    theta' = theta - rho^j beta s     (the first j with L(theta') < L(theta) and KL <= delta)

The Fisher-vector product ``F v`` is the Hessian-vector product of ``kl_fn``
(`bilevel.linalg.hessian_vector_operator`: by default the gradient of the KL is
taken once and each product is a vjp through it; forward-over-reverse on request),
so ``loss_fn`` and ``kl_fn`` may contain an inner adaptation (MAML-TRPO): the
product then differentiates to third order. With ``hvp_mode="gauss-newton"`` and
``kl_fn = output_kl_fn o outputs_fn`` it is ``J^T H J v``
(`bilevel.linalg.gauss_newton_vector_operator`; ``J`` the Jacobian of the policy's
distribution parameters, ``H`` the KL's Hessian in their space): the same matrix,
since the KL's gradient in output space vanishes at ``theta_old``, with one order of
differentiation fewer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from bilevel import tree
from bilevel._checks import scalar_valued
from bilevel.linalg import SolveInfo, conjugate_gradient, gauss_newton_vector_operator, hessian_vector_operator
from bilevel.tree import Tree

__all__ = ["TRPOInfo", "TRPOSettings", "trpo_step"]


@dataclass(frozen=True)
class TRPOInfo:
    """The record of one TRPO step (floats, for logging).

    ``expected_improvement`` is ``beta * g^T s``, the first-order decrease of the
    loss for the full step; ``step_fraction`` the accepted ``rho^j`` (0 when the
    step was rejected)."""

    loss_before: float
    loss_after: float
    kl: float
    expected_improvement: float
    backtracks: int
    accepted: bool
    step_fraction: float
    cg: SolveInfo

    def metrics(self) -> dict[str, float]:
        """The record as floats for a metrics row: ``trpo_kl``, ``trpo_improvement`` (loss before minus
        after), ``trpo_expected_improvement``, ``trpo_backtracks``, ``trpo_accepted``, ``trpo_step_fraction``,
        ``surrogate_loss`` (before the step) and ``cg_residual`` (of the natural-gradient solve)."""
        return {"trpo_kl": self.kl, "trpo_improvement": self.loss_before - self.loss_after,
                "trpo_expected_improvement": self.expected_improvement, "trpo_backtracks": float(self.backtracks),
                "trpo_accepted": float(self.accepted), "trpo_step_fraction": self.step_fraction,
                "surrogate_loss": self.loss_before, "cg_residual": float(self.cg.residual_norm)}


def _check(max_kl: float, cg_iters: int, damping: float, backtrack_ratio: float, max_backtracks: int) -> None:
    if not max_kl > 0:
        raise ValueError(f"`max_kl` must be > 0; got {max_kl}")
    if not (isinstance(cg_iters, int) and cg_iters >= 1):
        raise ValueError(f"`cg_iters` must be an int >= 1; got {cg_iters!r}")
    if not damping >= 0:
        raise ValueError(f"`damping` must be >= 0; got {damping}")
    if not 0 < backtrack_ratio < 1:
        raise ValueError(f"`backtrack_ratio` must lie in (0, 1); got {backtrack_ratio}")
    if not (isinstance(max_backtracks, int) and max_backtracks >= 1):
        raise ValueError(f"`max_backtracks` must be an int >= 1; got {max_backtracks!r}")


HVP_MODES = ("reverse-over-reverse", "forward-over-reverse", "gauss-newton")


def _check_fisher(hvp_mode: str, outputs_fn: Callable[..., Any] | None,
                  output_kl_fn: Callable[..., Any] | None) -> None:
    if hvp_mode not in HVP_MODES:
        raise ValueError(f"`hvp_mode` must be one of {list(HVP_MODES)}; got {hvp_mode!r}")
    given = {"outputs_fn": outputs_fn, "output_kl_fn": output_kl_fn}
    if hvp_mode == "gauss-newton":
        for name, fn in given.items():
            if not callable(fn):
                raise ValueError(f"hvp_mode 'gauss-newton' needs `{name}` (a callable); got {fn!r}")
    else:
        for name, fn in given.items():
            if fn is not None:
                raise ValueError(f"`{name}` applies only with hvp_mode 'gauss-newton'; got hvp_mode {hvp_mode!r}")


def trpo_step(
    loss_fn: Callable[[Tree], Tensor],
    kl_fn: Callable[[Tree], Tensor],
    params: Tree,
    *,
    max_kl: float = 0.01,
    cg_iters: int = 10,
    damping: float = 1e-5,
    backtrack_ratio: float = 0.8,
    max_backtracks: int = 15,
    hvp_mode: str = "reverse-over-reverse",
    loss_and_kl_fn: Callable[[Tree], tuple[Tensor, Tensor]] | None = None,
    outputs_fn: Callable[[Tree], Tree] | None = None,
    output_kl_fn: Callable[[Tree], Tensor] | None = None,
) -> tuple[Tree, TRPOInfo]:
    """One TRPO update of ``params``.

    Args:
        loss_fn: ``params -> scalar`` loss to minimise (the negated surrogate
            objective; for MAML-TRPO, evaluated after the inner adaptation).
        kl_fn: ``params -> scalar`` mean KL between the data-collecting policy
            (fixed, closed over) and the policy at ``params``; zero at ``params``.
        params: the current parameters (treated as constants: the step itself is
            not differentiated).
        max_kl: the trust-region radius ``delta``.
        cg_iters: conjugate-gradient iterations for ``F^{-1} g``.
        damping: added to ``F`` for the solve. The step length ``beta`` uses the undamped curvature
            ``s^T F s``, so a component of ``s`` in ``F``'s null space (a parameter ``kl_fn`` does not read)
            is bounded only by ``1 / damping`` and the KL test of the line search cannot see it: keep
            every parameter of ``params`` in the policy whose KL is measured.
        backtrack_ratio: the line search's ratio ``rho``: it tries ``rho^j`` of the full step.
        max_backtracks: the line search tries ``j = 0, ..., max_backtracks - 1``.
        hvp_mode: how Fisher-vector products are formed: ``"reverse-over-reverse"`` or
            ``"forward-over-reverse"``, the Hessian of ``kl_fn`` (see
            `bilevel.linalg.hessian_vector_operator`), or ``"gauss-newton"``, ``J^T H J v`` through
            ``outputs_fn`` and ``output_kl_fn`` (see `bilevel.linalg.gauss_newton_vector_operator`).
        outputs_fn: for ``"gauss-newton"`` only: ``params -> y``, the tree of the policy's distribution
            parameters on the KL's states (e.g. ``(mean [..., A], log_std [A])``, after any inner adaptation).
        output_kl_fn: for ``"gauss-newton"`` only: ``y -> scalar`` with ``output_kl_fn(outputs_fn(p)) ==
            kl_fn(p)``; its gradient must vanish at ``outputs_fn(params)`` (the KL from the data-collecting
            policy) for the products to equal the exact ones.
        loss_and_kl_fn: ``params -> (loss_fn(params), kl_fn(params))`` in one evaluation, for the
            line search's candidates, when the two share work (an inner adaptation, a forward pass);
            it must return the same numbers. Default: the two functions called in turn.

    Returns:
        ``(new_params, TRPOInfo)``; ``new_params`` is a detached copy of ``params`` (the same values) when no
        step both lowered the loss and kept the KL within ``max_kl``.
    """
    _check(max_kl, cg_iters, damping, backtrack_ratio, max_backtracks)
    _check_fisher(hvp_mode, outputs_fn, output_kl_fn)
    params = tree.detach(params)
    grads, loss_before = torch.func.grad_and_value(scalar_valued(loss_fn, "loss_fn"))(params)

    if hvp_mode == "gauss-newton":
        fisher_vector_product = gauss_newton_vector_operator(outputs_fn, output_kl_fn, params)
    else:
        fisher_vector_product = hessian_vector_operator(kl_fn, params, mode=hvp_mode)
    direction, cg_info = conjugate_gradient(fisher_vector_product, grads, max_iter=cg_iters, damping=damping)
    curvature = tree.dot(direction, fisher_vector_product(direction))
    beta = torch.sqrt(2.0 * max_kl / torch.clamp(curvature, min=torch.finfo(curvature.dtype).tiny))
    full_step = tree.scale(direction, -beta)
    expected_improvement = float(beta * tree.dot(grads, direction))
    evaluate = loss_and_kl_fn if loss_and_kl_fn is not None else lambda p: (loss_fn(p), kl_fn(p))

    with torch.no_grad():
        fraction = 1.0
        for backtracks in range(max_backtracks):
            candidate = tree.axpy(fraction, full_step, params)
            loss, kl = evaluate(candidate)
            if bool(torch.isfinite(loss) & torch.isfinite(kl)) and float(kl) <= max_kl and loss < loss_before:
                info = TRPOInfo(float(loss_before), float(loss), float(kl), expected_improvement,
                                backtracks, True, fraction, cg_info)
                return candidate, info
            fraction *= backtrack_ratio
    info = TRPOInfo(float(loss_before), float(loss_before), 0.0, expected_improvement,
                    max_backtracks, False, 0.0, cg_info)
    return params, info


@dataclass
class TRPOSettings:
    """`trpo_step`'s settings as config fields, for the learners whose outer step it is
    (defaults: pytorch-maml-rl's and MB-MPO's). A config lists it before ``RunConfig`` among
    its bases, so that its `validate` runs and then passes on."""

    max_kl: float = 0.01
    """The TRPO trust-region radius delta on the mean KL."""
    cg_iters: int = 10
    """Conjugate-gradient iterations for the natural-gradient direction."""
    cg_damping: float = 1e-5
    """Damping added to the Fisher matrix in the conjugate-gradient solve."""
    ls_backtracks: int = 15
    """Line-search steps tried."""
    ls_ratio: float = 0.8
    """Line-search step shrink factor."""

    def validate(self) -> None:
        if not self.max_kl > 0:
            raise ValueError(f"`max_kl` must be > 0; got {self.max_kl}")
        for name in ("cg_iters", "ls_backtracks"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        if not self.cg_damping >= 0:
            raise ValueError(f"`cg_damping` must be >= 0; got {self.cg_damping}")
        if not 0 < self.ls_ratio < 1:
            raise ValueError(f"`ls_ratio` must lie in (0, 1); got {self.ls_ratio}")
        parent = super()
        if hasattr(parent, "validate"):
            parent.validate()

    def trpo_options(self) -> dict[str, float | int]:
        """The keyword arguments of `trpo_step` these settings give."""
        return {"max_kl": self.max_kl, "cg_iters": self.cg_iters, "damping": self.cg_damping,
                "backtrack_ratio": self.ls_ratio, "max_backtracks": self.ls_backtracks}
