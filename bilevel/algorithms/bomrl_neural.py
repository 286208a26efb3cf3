"""BO-MRL with a neural policy: one collection, many adaptation steps, an implicit hypergradient.

Xu et al. 2024, "Meta-Reinforcement Learning with Universal Policy Adaptation" (arXiv 2410.09728),
the neural (MuJoCo) setting; the tabular setting is `bilevel.algorithms.bomrl`. The meta-policy
``pi_phi`` is a Gaussian MLP. Per meta-iteration, for ``N`` tasks ``T_i``:

    D_i       = B episodes of pi_phi on T_i                                  (the one collection)
    theta*_i  = argmax_theta  J^_i(theta) - lambda D(phi, theta)             (Sec. 4, "Alg")
    J^_i(theta) - J_i(phi) = 1/(1 - gamma) E_{s ~ nu_phi, a ~ pi_phi}[pi_theta(a|s) / pi_phi(a|s) A_phi(s, a)]
    D'_i      = B episodes of pi_{theta*_i} on T_i                           (fresh data)
    h         = mean_i (d theta*_i / d phi)^T (-grad_theta J_i(theta*_i))   (Prop. 1, implicit function theorem)
    phi      <- TRPO step against h within mean KL(pi_phi_old || pi_phi) <= delta on the D_i states

The lower bound is estimated on ``D_i`` as ``mean_valid[exp(log pi_theta - log pi_phi) A]`` with
the advantages ``A`` of MAML-RL (GAE over a linear feature baseline, standardised per task):
the factor ``1/(1 - gamma)`` and the scale of the advantages are absorbed in ``lambda``, which is
therefore measured in standardised-advantage units. Distances, on the states of ``D_i``:

- D1: ``mean_valid KL(pi_phi(.|s) || pi_theta(.|s))``;
- D2: ``mean_valid KL(pi_theta(.|s) || pi_phi(.|s))``;
- D3: ``||theta - phi||^2`` over all parameters.

The adaptation minimises the negated regularised objective ``L(theta) = lambda D(phi, theta) -
J^(theta)`` from ``theta_0 = phi`` with one of two solvers (`ADAPT_SOLVERS`):

- ``adam``: ``steps`` Adam steps (`bilevel.inner.unroll`), the authors' solver. It stops near, not
  at, a stationary point, and the unclipped lower bound is not bounded above in ``theta`` (the ratio
  ``pi_theta / pi_phi`` grows exponentially in a mean shift, D1 only quadratically), so it can run
  away; ``clip > 0`` bounds it (`soft_clip`);
- ``newton``: ``steps`` iterations of `bilevel.newton_cg`, damped Newton-CG (Levenberg-Marquardt
  damping ``mu``, Nocedal & Wright Sec. 7.1 and 10.3): ``(H + mu I) d = -g`` by ``cg_iters`` CG
  iterations on Hessian-vector products,
  then the longest step ``t d``, ``t`` in ``{1, 1/2, ..., 2^-15}``, that satisfies Armijo's condition
  ``L(theta + t d) <= L(theta) + 1e-4 t g.d`` (so ``L`` never increases); a failed line search multiplies
  ``mu`` by 10 and keeps ``theta``, a success divides it by 3. It stops once ``||g|| <= tol``: the
  stationary point the implicit hypergradient assumes.

Either solver takes an optional trust region ``D(phi, theta) <= max_distance``: a step that would leave
it is not taken (Adam: the adaptation stops there and returns its best iterate; Newton: the line
search shortens the step). At a solution on the boundary the optimality condition is not ``g = 0``, so
`BOMRLNeural.step` logs the optimality residual and the fraction of tasks stopped by the region.

The solution is differentiated by the implicit function theorem (`bilevel.implicit_vjp`, the backward
pass of `bilevel.implicit_root`) on the optimality condition ``F(theta, phi) = grad_theta [lambda D(phi,
theta) - J^(theta)] = 0``: a linear solve on the Hessian of the regularised objective, damped, with
diagnostics, for all tasks in one vmap (`hypergradients`). The Hessian need not be positive definite at
the adapted parameters (Adam stops near, not at, a maximiser, and the importance-weighted bound has
curvature of either sign): on HalfCheetah-dir batches Lanczos finds eigenvalues down to about -0.03
against a largest of about 20, so with the default damping 1e-2 the system is indefinite and nearly
singular and no 10-iteration solve meets a 1e-2 relative residual (docs/reproductions/bomrl-halfcheetah.md).
``implicit_solver`` picks conjugate gradient (the authors'), MINRES (the same system; over the same Krylov
space its residual is the least, so never above CG's, and it is defined for indefinite matrices) or CG on
the normal equations. As in the
paper's hypergradient, the data ``D_i`` (states, actions, advantages, ``log pi_phi`` at
collection) are constants: ``phi`` enters the optimality condition only through ``D``. The
right-hand side ``-grad_theta J_i(theta*_i)`` is the gradient of the REINFORCE loss on ``D'_i``, so ``h``
is the gradient of the meta-loss ``-J``. The outer step is `bilevel.trpo_step` minimising the linear loss
``<h, phi - phi_old>``, whose gradient is ``h``: its line search accepts the first fraction of the
natural-gradient step within the KL radius.

Shape convention: ``N`` tasks, ``T`` steps, ``B`` episodes per task, ``D`` and ``A`` the
observation and action sizes; per-task tensors ``[T, B, ...]``, stacked ``[N, T, B, ...]``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import torch
import torchopt
from torch import Tensor, nn
from torch.func import vmap

from bilevel import tree
from bilevel.algorithms.bomrl import DISTANCES
from bilevel.implicit import implicit_root, implicit_vjp
from bilevel.inner import adam, newton_cg, unroll
from bilevel.linalg import SolveInfo, known_all_false
from bilevel.nets import gaussian_kl
from bilevel.rl import importance_weighted_loss, masked_mean, reinforce_loss
from bilevel.rl.meta_batches import (
    NAVIGATION,
    PolicyGradientLearner,
    PolicyGradientSettings,
    TaskData,
    TaskEpisodes,
    action_distribution,
    task_data,
)
from bilevel.runs import RunConfig, register
from bilevel.tree import Tree
from bilevel.trpo import TRPOSettings, trpo_step

__all__ = [
    "ADAPT_SOLVERS",
    "DISTANCES",
    "IMPLICIT_SOLVERS",
    "Adaptation",
    "AdaptationBatch",
    "BOMRLNeural",
    "BOMRLNeuralConfig",
    "adapt_tasks",
    "adaptation_batches",
    "adaptation_loss",
    "adaptation_residual",
    "distance",
    "hypergradients",
    "implicit_adaptation",
    "lower_bound_gain",
    "meta_kl",
    "policy_gradient",
    "soft_clip",
    "solve_adaptation",
]

ADAPT_SOLVERS = ("adam", "newton")
IMPLICIT_SOLVERS = ("cg", "minres", "normal_cg")


class AdaptationBatch(NamedTuple):
    """One task's collection by ``pi_phi``, constant during adaptation: ``obs`` ``[T, B, D]``,
    ``actions`` ``[T, B, A]``, standardised ``advantages`` ``[T, B]``, ``weights`` ``[T, B]`` (1.0 on
    valid steps, 0.0 on padding) and ``log_probs`` ``[T, B]``, ``log pi_phi(a|s)`` at collection.
    A leading ``[N]`` when stacked over tasks."""

    obs: Tensor
    actions: Tensor
    advantages: Tensor
    weights: Tensor
    log_probs: Tensor


class Adaptation(NamedTuple):
    """The within-task algorithm: ``steps`` steps of ``solver`` (``adam`` with learning rate ``lr``, or
    ``newton`` with ``cg_iters`` CG iterations, initial damping ``damping`` and stopping tolerance ``tol``
    on the gradient norm) on the lower bound minus ``lam`` times the ``distance`` (``D1``, ``D2`` or
    ``D3``) of ``policy``'s parameters, within ``distance <= max_distance`` (module docstring); ``clip``
    > 0 clips the importance ratio pessimistically (`soft_clip`)."""

    policy: nn.Module
    distance: str
    lam: float
    lr: float
    steps: int
    solver: str = "adam"
    max_distance: float = math.inf
    cg_iters: int = 10
    damping: float = 1e-2
    tol: float = 1e-4
    clip: float = 0.0


def adaptation_batches(policy: nn.Module, meta_params: Tree, data: TaskData) -> AdaptationBatch:
    """The `AdaptationBatch` of every task of ``data`` (``[N, ...]``), collected by ``meta_params``."""
    with torch.no_grad():
        log_probs = action_distribution(policy, meta_params, data.obs).log_prob(data.actions)
    return AdaptationBatch(data.obs, data.actions, data.advantages, data.valid.to(data.advantages.dtype), log_probs)


def soft_clip(ratios: Tensor, advantages: Tensor, clip: float) -> Tensor:
    """The pessimistic smooth clip ``c(rho, A)``, elementwise: with ``x = rho - 1``,
    ``1 + eps tanh(x / eps)`` where ``x A > 0`` (the ratio would raise the estimate) and ``rho`` elsewhere.

    Since ``eps tanh(x / eps)`` lies between 0 and ``x``, ``c(rho, A) A <= rho A`` for every ``rho`` and
    ``A``, with ``c A <= (1 + eps) max(A, 0)``; ``c`` is twice continuously differentiable in ``rho``
    (``tanh(u) = u - u^3 / 3 + ...``), unlike PPO's ``min(rho A, clip(rho, 1 - eps, 1 + eps) A)`` (Schulman
    et al. 2017, eq. 7), which it bounds from below and whose kinks keep a Newton solver off ``g = 0``."""
    shifted = ratios - 1
    optimistic = shifted * advantages > 0
    return torch.where(optimistic, 1 + clip * torch.tanh(shifted / clip), ratios)


def lower_bound_gain(params: Tree, batch: AdaptationBatch, policy: nn.Module, clip: float = 0.0) -> Tensor:
    """``J^(pi_theta) - J(pi_phi)`` up to the factor absorbed in lambda (module docstring): the
    importance-weighted advantage ``mean_valid[rho A]``, ``rho = pi_theta(a|s) / pi_phi(a|s)``, on one
    task's batch; scalar. With ``clip = eps > 0``, ``mean_valid[c(rho, A) A]`` with the pessimistic smooth
    clip `soft_clip`: it is ``<=`` the unclipped estimate for every ``theta``, so the paper's bound stays a
    lower bound (a looser one), and it is ``<= (1 + eps) mean_valid[max(A, 0)]``, so the regularised
    objective is bounded above and every ``theta`` that improves on ``phi`` (objective 0, standardised
    ``A`` has mean 0) has ``lambda D(phi, theta) <= (1 + eps) mean_valid[max(A, 0)]``: no runaway."""
    return _gain(action_distribution(policy, params, batch.obs).log_prob(batch.actions), batch, clip)


def _gain(log_probs: Tensor, batch: AdaptationBatch, clip: float) -> Tensor:
    if clip == 0:
        return -importance_weighted_loss(log_probs, batch.log_probs, batch.advantages, batch.weights)
    ratios = torch.exp(log_probs - batch.log_probs)
    return masked_mean(soft_clip(ratios, batch.advantages, clip) * batch.advantages, batch.weights)


def distance(params: Tree, meta_params: Tree, batch: AdaptationBatch, policy: nn.Module, kind: str) -> Tensor:
    """``D(phi, theta)`` on one task's batch states: D1 ``mean KL(pi_phi || pi_theta)``, D2
    ``mean KL(pi_theta || pi_phi)``, D3 ``||theta - phi||^2``; scalar."""
    if kind == "D3":
        return _distance(params, meta_params, None, None, batch, kind)
    meta = action_distribution(policy, meta_params, batch.obs)
    return _distance(params, meta_params, action_distribution(policy, params, batch.obs), meta, batch, kind)


def _distance(params: Tree, meta_params: Tree, adapted: Any, meta: Any, batch: AdaptationBatch, kind: str) -> Tensor:
    """`distance` from the two policies' distributions on the batch states (unused for D3)."""
    if kind == "D3":
        gap = tree.sub(params, meta_params)
        return tree.dot(gap, gap)
    if kind == "D1":
        kl = gaussian_kl(meta.mean, meta.log_std, adapted.mean, adapted.log_std)
    else:
        kl = gaussian_kl(adapted.mean, adapted.log_std, meta.mean, meta.log_std)
    return masked_mean(kl, batch.weights)


def adaptation_loss(params: Tree, meta_params: Tree, batch: AdaptationBatch, adaptation: Adaptation) -> Tensor:
    """``lambda D(phi, theta) - (J^(theta) - J(phi))``, the negated regularised lower bound the
    adaptation minimises over ``theta = params``; scalar. One forward pass of each policy on the batch
    states serves both terms."""
    return _adaptation_loss(params, meta_params, _meta_distribution(meta_params, batch, adaptation), batch, adaptation)


def _meta_distribution(meta_params: Tree, batch: AdaptationBatch, adaptation: Adaptation) -> Any:
    """``pi_phi(.|s)`` on the batch states, which D1 and D2 read; ``None`` for D3."""
    if adaptation.distance == "D3":
        return None
    return action_distribution(adaptation.policy, meta_params, batch.obs)


def _adaptation_loss(
    params: Tree, meta_params: Tree, meta: Any, batch: AdaptationBatch, adaptation: Adaptation
) -> Tensor:
    """`adaptation_loss` given ``meta`` = `_meta_distribution`: a solver, to which ``phi`` is a constant,
    computes it once rather than at every step."""
    adapted = action_distribution(adaptation.policy, params, batch.obs)
    gain = _gain(adapted.log_prob(batch.actions), batch, adaptation.clip)
    return adaptation.lam * _distance(params, meta_params, adapted, meta, batch, adaptation.distance) - gain


adaptation_residual = torch.func.grad(adaptation_loss)
"""The optimality condition ``F(theta, phi, batch, adaptation) = d adaptation_loss / d theta``, like ``theta``."""


def solve_adaptation(init: Tree, meta_params: Tree, batch: AdaptationBatch, adaptation: Adaptation) -> Tree:
    """``adaptation.steps`` steps of ``adaptation.solver`` on `adaptation_loss` from ``init`` (module
    docstring); vmap-able over tasks (the stopping rules are masks, not branches)."""
    if adaptation.solver not in ADAPT_SOLVERS:
        raise ValueError(f"unknown adaptation `solver` {adaptation.solver!r}; choose one of {list(ADAPT_SOLVERS)}")
    meta = _meta_distribution(meta_params, batch, adaptation)
    loss = functools.partial(_adaptation_loss, meta_params=meta_params, meta=meta, batch=batch, adaptation=adaptation)
    if adaptation.solver == "newton":
        feasible = None if math.isinf(adaptation.max_distance) else functools.partial(
            _inside, meta_params=meta_params, batch=batch, adaptation=adaptation)
        return newton_cg(loss, init, adaptation.steps, cg_iters=adaptation.cg_iters, damping=adaptation.damping,
                         tol=adaptation.tol, feasible=feasible)
    if math.isinf(adaptation.max_distance):
        return unroll(loss, init, adam(adaptation.lr), adaptation.steps)
    return _safeguarded_adam(loss, init, meta_params, batch, adaptation)


def _inside(params: Tree, meta_params: Tree, batch: AdaptationBatch, adaptation: Adaptation) -> Tensor:
    reached = distance(params, meta_params, batch, adaptation.policy, adaptation.distance)
    return reached <= adaptation.max_distance


def _safeguarded_adam(
    loss: Callable[[Tree], Tensor], init: Tree, meta_params: Tree, batch: AdaptationBatch, adaptation: Adaptation
) -> Tree:
    """Adam steps that stop at the first step leaving ``D <= max_distance``; the iterate of lowest
    ``loss`` so far is returned, so the regularised objective never ends below its start."""
    optimizer = adam(adaptation.lr)
    grad_fn = torch.func.grad(loss)
    params, state = init, None
    best, best_loss = init, loss(init)
    running = torch.ones((), dtype=torch.bool, device=best_loss.device)
    for _ in range(adaptation.steps):
        grads = grad_fn(params)
        state = optimizer.init(grads) if state is None else state
        updates, state = optimizer.update(grads, state, params=params, inplace=False)
        proposal = torchopt.apply_updates(params, updates, inplace=False)
        running = running & _inside(proposal, meta_params, batch, adaptation)
        proposal_loss = loss(proposal)
        better = running & (proposal_loss < best_loss)
        best, best_loss = tree.where(better, proposal, best), torch.where(better, proposal_loss, best_loss)
        params = tree.where(running, proposal, params)
        if known_all_false(running):
            break
    return best


def implicit_adaptation(
    batch: AdaptationBatch,
    adaptation: Adaptation,
    solver: Callable[[Tree, Tree, AdaptationBatch, Adaptation], Tree] = solve_adaptation,
    solve: str = "cg",
    **solve_options: Any,
) -> Callable[[Tree], Tree]:
    """``phi -> theta*(phi)`` for one task: ``solver(phi, phi, batch, adaptation)`` (`solve_adaptation`
    by default, any solver of `adaptation_loss`), differentiable in ``phi`` by `implicit_root` (the linear
    solver ``solve``, one of `IMPLICIT_SOLVERS`, with ``solve_options``: ``max_iter``, ``tol``,
    ``damping``) on `adaptation_residual`. The returned function's ``diagnostics`` hold the last backward
    pass's solve. For a meta-batch, `adapt_tasks` and `hypergradients` do the same work in one vmap."""
    residual = functools.partial(adaptation_residual, batch=batch, adaptation=adaptation)
    decorated = implicit_root(residual, solve=solve, **solve_options)(
        functools.partial(solver, batch=batch, adaptation=adaptation)
    )

    def adapted(meta_params: Tree) -> Tree:
        return decorated(meta_params, meta_params)

    adapted.diagnostics = decorated.diagnostics  # type: ignore[attr-defined]
    return adapted


def adapt_tasks(meta_params: Tree, batches: AdaptationBatch, adaptation: Adaptation) -> Tree:
    """`solve_adaptation` from ``meta_params`` for every task of ``batches`` (``[N, ...]``) in one
    vmap, without a hypergradient: a tree with a leading ``[N]``."""
    solve = functools.partial(solve_adaptation, adaptation=adaptation)
    return vmap(solve, in_dims=(None, None, 0))(meta_params, meta_params, batches)


def hypergradients(
    meta_params: Tree,
    adapted_params: Tree,
    batches: AdaptationBatch,
    cotangents: Tree,
    adaptation: Adaptation,
    solve: str = "cg",
    **solve_options: Any,
) -> tuple[Tree, SolveInfo]:
    """Every task's hypergradient ``(d theta*_i / d phi)^T v_i`` in one vmap over tasks: per task,
    `implicit_vjp` on the optimality condition `adaptation_residual` at ``theta*_i``,

        (H_i + mu I) u_i = -v_i,   H_i = d^2 L_i / d theta^2 (theta*_i)   (symmetric: dF/dtheta = H_i)
        h_i = u_i^T d^2 L_i / d phi d theta (theta*_i)

    with ``L_i`` = `adaptation_loss`, the linear solver ``solve`` (`IMPLICIT_SOLVERS`) and its
    ``solve_options`` (``max_iter``, ``tol``, ``damping`` = ``mu``). The pullback of
    `implicit_adaptation` for each task, without the Python loop over tasks.

    Args:
        meta_params: ``phi``, shared by all tasks.
        adapted_params: ``theta*_i``, a tree with a leading ``[N]``.
        batches: the tasks' `AdaptationBatch`, ``[N, ...]``.
        cotangents: ``v_i``, a tree like ``adapted_params`` (``[N]``-leading).
        adaptation: the within-task algorithm (its loss; its solver is not run here).

    Returns:
        ``(h, info)``: ``h`` a tree like ``adapted_params`` (``[N]``-leading) and the solves' `SolveInfo`
        with ``[N]`` entries (residual norm ``||v_i + (H_i + mu I) u_i||``).
    """
    if solve not in IMPLICIT_SOLVERS:
        raise ValueError(f"unknown implicit `solve` {solve!r}; choose one of {list(IMPLICIT_SOLVERS)}")

    def task(theta: Tree, batch: AdaptationBatch, cotangent: Tree) -> tuple[Tree, SolveInfo]:
        residual = functools.partial(adaptation_residual, batch=batch, adaptation=adaptation)
        (grad,), info = implicit_vjp(residual, theta, (meta_params,), cotangent, solve=solve, **solve_options)
        return grad, info

    return vmap(task)(tree.detach(adapted_params), batches, cotangents)


def policy_gradient(policy: nn.Module, adapted_params: Tree, fresh: TaskData) -> Tree:
    """``-grad_theta J_i(theta)`` at each task's adapted parameters (leading ``[N]``) by REINFORCE
    on its fresh batch (``[N, ...]``): the cotangent of the hypergradient, ``[N]``-leading tree."""

    def task_loss(params: Tree, obs: Tensor, actions: Tensor, advantages: Tensor, valid: Tensor) -> Tensor:
        log_probs = action_distribution(policy, params, obs).log_prob(actions)
        return reinforce_loss(log_probs, advantages, valid)

    return vmap(torch.func.grad(task_loss))(tree.detach(adapted_params), *fresh)


def meta_kl(policy: nn.Module, old_params: Tree, data: TaskData) -> Callable[[Tree], Tensor]:
    """``phi -> mean_valid KL(pi_phi_old(.|s) || pi_phi(.|s))`` over the states of every task of ``data``."""
    with torch.no_grad():
        old = action_distribution(policy, old_params, data.obs)
        old_mean, old_log_std = old.mean, old.log_std

    def kl(params: Tree) -> Tensor:
        new = action_distribution(policy, params, data.obs)
        return masked_mean(gaussian_kl(old_mean, old_log_std, new.mean, new.log_std), data.valid)

    return kl


@dataclasses.dataclass
class BOMRLNeuralConfig(PolicyGradientSettings, TRPOSettings, RunConfig):
    """BO-MRL with a Gaussian MLP policy; the adaptation defaults are the authors' HalfCheetah-vel ones
    (lambda 0.5, 50 Adam steps at 1e-3, 10 tasks x 20 episodes). The episodes, advantages, policy and
    collection are `PolicyGradientSettings`', which differ from the authors' in the policy (64 x 64 here,
    2 x 128 tanh theirs) and gamma (0.99 here, 0.995 theirs)."""

    env: str = NAVIGATION
    """The task family: navigation-2d, halfcheetah-vel, halfcheetah-dir or ant-dir."""
    iterations: int = 500
    """Meta-iterations."""
    meta_batch_size: int = 10
    """Tasks sampled per meta-iteration (the authors: 10 for HalfCheetah-vel)."""
    episodes_per_task: int = 20
    """Episodes per task in the one collection and again in the fresh batch (the authors: 20)."""
    distance: str = "D1"
    """The adaptation's distance: D1 = KL(pi_phi || pi), D2 = KL(pi || pi_phi), D3 = ||theta - phi||^2."""
    lam: float = 0.5
    """The distance weight lambda > 0, in standardised-advantage units (the authors: 0.5)."""
    adapt_lr: float = 1e-3
    """Adam learning rate of the adaptation (the authors: 1e-3)."""
    adapt_steps: int = 50
    """Steps of the adaptation's solver on the one collection (the authors: 50 Adam steps)."""
    adapt_solver: str = "adam"
    """The adaptation's solver: adam (the authors') or newton (damped Newton-CG with a line search)."""
    adapt_clip: float = 0.0
    """eps > 0: the lower bound with the pessimistic smooth clip of the ratio to 1 +- eps (`soft_clip`),
    bounded above, so the adaptation cannot run away; 0: the paper's unclipped ratio."""
    adapt_max_distance: float = 0.0
    """> 0: a trust region D(phi, theta) <= this value on the adaptation's steps; 0: none."""
    adapt_cg_iters: int = 10
    """newton: CG iterations per Newton step."""
    implicit_solver: str = "cg"
    """The hypergradient's linear solver: cg (the authors'), minres (MINRES: the least residual over the
    same Krylov space, for an indefinite Hessian) or normal_cg (CG on the normal equations)."""
    implicit_cg_iters: int = 10
    """Iterations of the hypergradient's linear solve (the authors: 10 CG iterations)."""
    implicit_damping: float = 1e-2
    """Damping added to the Hessian of the regularised objective in that solve."""
    implicit_tol: float = 1e-2
    """Relative residual under which that solve counts as converged (diagnostics and warning)."""

    def validate(self) -> None:
        super().validate()
        if self.distance not in DISTANCES:
            raise ValueError(f"unknown `distance` {self.distance!r}; choose one of {list(DISTANCES)}")
        if self.adapt_solver not in ADAPT_SOLVERS:
            raise ValueError(f"unknown `adapt_solver` {self.adapt_solver!r}; choose one of {list(ADAPT_SOLVERS)}")
        if self.implicit_solver not in IMPLICIT_SOLVERS:
            raise ValueError(
                f"unknown `implicit_solver` {self.implicit_solver!r}; choose one of {list(IMPLICIT_SOLVERS)}"
            )
        if not 0 <= self.adapt_clip < 1:
            raise ValueError(f"`adapt_clip` must lie in [0, 1); got {self.adapt_clip}")
        positive = (
            "meta_batch_size",
            "episodes_per_task",
            "adapt_steps",
            "adapt_cg_iters",
            "implicit_cg_iters",
        )
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        for name in ("lam", "adapt_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0; got {getattr(self, name)}")
        for name in ("implicit_damping", "implicit_tol", "adapt_max_distance"):
            if getattr(self, name) < 0:
                raise ValueError(f"`{name}` must be >= 0; got {getattr(self, name)}")


def _solve_metrics(info: SolveInfo, cotangents: Tree) -> dict[str, float]:
    """Over tasks: the hypergradient solves' iterations, absolute residual ``||v_i + (H_i + mu I) u_i||``,
    fraction converged (means), and the relative residual (absolute over ``||v_i||``, mean and max)."""
    rhs_norms = vmap(tree.norm)(cotangents)
    relative = info.residual_norm / rhs_norms.clamp_min(torch.finfo(rhs_norms.dtype).tiny)
    return {
        "implicit_cg_iterations": float(info.iterations.double().mean()),
        "implicit_cg_residual": float(info.residual_norm.mean()),
        "implicit_cg_converged": float(info.converged.double().mean()),
        "implicit_residual_relative": float(relative.mean()),
        "implicit_residual_relative_max": float(relative.max()),
    }


@register("bomrl-neural")
class BOMRLNeural(PolicyGradientLearner):
    """BO-MRL (Xu et al. 2024) with a Gaussian MLP policy on 2-D navigation, HalfCheetah velocity and
    direction and Ant direction. Family, policy, sampling, seeds and state are MAML-TRPO's
    (`PolicyGradientLearner`), so the two see the same tasks at every iteration for the same seed."""

    Config = BOMRLNeuralConfig
    envs = (NAVIGATION, "halfcheetah-vel", "halfcheetah-dir", "ant-dir")
    config: BOMRLNeuralConfig

    def adaptation(self, steps: int | None = None) -> Adaptation:
        """The config's `Adaptation`, with ``steps`` overridable."""
        config = self.config
        return Adaptation(
            self.policy,
            config.distance,
            config.lam,
            config.adapt_lr,
            config.adapt_steps if steps is None else steps,
            solver=config.adapt_solver,
            max_distance=config.adapt_max_distance or math.inf,
            cg_iters=config.adapt_cg_iters,
            clip=config.adapt_clip,
        )

    def step(self) -> dict[str, float]:
        """One meta-iteration (module docstring), batched over tasks: the adaptation (`adapt_tasks`) and
        the hypergradient (`hypergradients`) are one vmap each. An unconverged hypergradient solve does not
        warn: ``implicit_cg_converged`` (the fraction of tasks), ``implicit_cg_residual`` and
        ``implicit_residual_relative`` record it."""
        config = self.config
        tasks = self.family.sample_tasks(config.meta_batch_size, np.random.default_rng(self._seed("tasks")))
        generator = torch.Generator(self.device).manual_seed(self._seed("actions"))
        adaptation = self.adaptation()
        meta_params = self.meta_params

        train_episodes = self.sample(tasks, meta_params, generator, per_task=False, env_seed=self._seed("train_envs"))
        train = task_data(train_episodes, config.gamma, config.gae_lambda)
        batches = adaptation_batches(self.policy, meta_params, train)

        adapted_params = adapt_tasks(meta_params, batches, adaptation)

        fresh_episodes = self.sample(tasks, adapted_params, generator, per_task=True, env_seed=self._seed("valid_envs"))
        fresh = task_data(fresh_episodes, config.gamma, config.gae_lambda)
        cotangents = policy_gradient(self.policy, adapted_params, fresh)
        per_task, solves = hypergradients(
            meta_params,
            adapted_params,
            batches,
            cotangents,
            adaptation,
            solve=config.implicit_solver,
            max_iter=config.implicit_cg_iters,
            tol=config.implicit_tol,
            damping=config.implicit_damping,
        )
        hypergradient = tree.map(lambda leaf: leaf.mean(0), per_task)

        def linear_loss(params: Tree) -> Tensor:
            return tree.dot(hypergradient, tree.sub(params, meta_params))

        self.meta_params, info = trpo_step(
            linear_loss,
            meta_kl(self.policy, meta_params, train),
            meta_params,
            **config.trpo_options(),
        )
        self.env_steps += int(train_episodes.valid.sum()) + int(fresh_episodes.valid.sum())
        return_before = float(train_episodes.episode_returns().mean())
        return_after = float(fresh_episodes.episode_returns().mean())
        return {
            "return": return_after,
            "return_before": return_before,
            "return_after": return_after,
            "hypergradient_norm": float(tree.norm(hypergradient)),
            **self._adaptation_metrics(meta_params, adapted_params, batches, adaptation),
            **_solve_metrics(solves, cotangents),
            **info.metrics(),
        }

    @staticmethod
    def _adaptation_metrics(
        meta_params: Tree, adapted_params: Tree, batches: AdaptationBatch, adaptation: Adaptation
    ) -> dict[str, float]:
        """Over tasks: the regularised objective's gain (mean, min), the distance reached (mean, max), the
        optimality residual's norm ``||g(theta*)||`` at the adapted parameters (mean, max; 0 at an exact
        stationary point), its mean ratio to ``||g(phi)||`` at the start, and the fraction of tasks that
        ended on the trust region's boundary (``D >= 0.99 max_distance``)."""

        def per_task(theta: Tree, batch: AdaptationBatch) -> tuple[Tensor, ...]:
            gain = adaptation_loss(meta_params, meta_params, batch, adaptation) - adaptation_loss(
                theta, meta_params, batch, adaptation
            )
            reached = distance(theta, meta_params, batch, adaptation.policy, adaptation.distance)
            residual = tree.norm(adaptation_residual(theta, meta_params, batch, adaptation))
            start = tree.norm(adaptation_residual(meta_params, meta_params, batch, adaptation))
            return gain, reached, residual, start

        gain, reached, residual, start = vmap(per_task)(adapted_params, batches)
        return {
            "adaptation_gain": float(gain.mean()),
            "adaptation_gain_min": float(gain.min()),
            "adaptation_distance": float(reached.mean()),
            "adaptation_distance_max": float(reached.max()),
            "adaptation_residual": float(residual.mean()),
            "adaptation_residual_max": float(residual.max()),
            "adaptation_residual_relative": float((residual / start.clamp_min(1e-12)).mean()),
            "adaptation_boundary": float((reached >= 0.99 * adaptation.max_distance).float().mean()),
        }

    def evaluate(
        self, tasks: int = 40, adaptation_steps: int | None = None, episodes: int | None = None, seed: int = 0
    ) -> dict[str, float]:
        """Mean undiscounted return on held-out tasks before and after one adaptation.

        Per task: ``episodes`` stochastic episodes of the meta-policy (the one collection),
        ``adaptation_steps`` steps of the adaptation's solver on them (default: the
        config's ``adapt_steps``), then stochastic and deterministic (mean-action) episodes of
        the meta-policy and the adapted policy, reported separately (`adaptation_returns`)."""
        adaptation_steps = self.config.adapt_steps if adaptation_steps is None else adaptation_steps
        adaptation = self.adaptation(steps=adaptation_steps)

        def adapt_all(meta_params: Tree, episodes: TaskEpisodes) -> Tree:
            data = task_data(episodes, self.config.gamma, self.config.gae_lambda)
            return adapt_tasks(meta_params, adaptation_batches(self.policy, meta_params, data), adaptation)

        return self.evaluate_adaptation(adapt_all, tasks, adaptation_steps, episodes, seed)
