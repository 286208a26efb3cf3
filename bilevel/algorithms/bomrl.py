"""BO-MRL on tabular Frozen Lake: bilevel meta-RL with universal policy adaptation.

Xu et al. 2024, "Meta-Reinforcement Learning with Universal Policy Adaptation" (arXiv 2410.09728).
A softmax meta-policy ``pi_phi`` (logits ``phi [S_obs, A]``) collects data once per task; the
within-task algorithm (Sec. 4, "Alg") maximises the lower bound of the task's return

    J^(pi) = J(pi_phi) + 1/(1 - gamma) E_{s ~ nu_phi, a ~ pi}[A_phi(s, a)]
           = J(pi_phi) + sum_s d_phi(s) sum_a pi(a|s) A_phi(s, a)

minus ``lambda`` times a distance; the meta-algorithm ascends the mean over tasks of
``J_task(pi_adapted(phi))`` with the hypergradient of the implicit function theorem (Prop. 1),
here from `bilevel.implicit_root` on the adaptation's optimality condition.

Distances, each weighted like the advantage term (by ``d_phi = nu_phi / (1 - gamma)``), so
that ``lambda`` is a per-state temperature and D2 gives the authors' ``pi ∝ pi_phi exp(Q / lambda)``:

- D1: ``sum_s d_phi(s) KL(pi_phi(.|s) || pi(.|s))``; per state ``pi(a|s) = lambda pi_phi(a|s) / (mu_s - A(s, a))``
  with ``mu_s`` the root of ``sum_a pi(a|s) = 1`` in ``(max_a A, max_a A + lambda]`` (bisection).
- D2: ``sum_s d_phi(s) KL(pi(.|s) || pi_phi(.|s))``; per state ``pi(a|s) ∝ pi_phi(a|s) exp(A(s, a) / lambda)``.
- D3: ``||theta - phi||^2``, the paper's parameter distance, unweighted; no closed form (damped Newton).

Because D1 and D2 weight every state's problem by ``d_phi(s)``, the maximiser is the per-state
one wherever ``d_phi(s) > 0`` and arbitrary where a state is never visited. The optimality
condition therefore drops the weights (it is the weighted condition divided by ``d_phi(s)``),
which keeps it non-singular in unvisited states, where it yields ``pi = pi_phi`` for zero
advantage (every Monte-Carlo estimate there is zero). D3's condition keeps the weights.

Gauge: the logits of a softmax are defined up to a shift per state, so the raw condition has a
singular Jacobian along ``1``. The adapted logits are taken with the same per-state mean as
``phi`` and the condition gains the gradient of ``1/2 sum_s (mean_a theta_s - mean_a phi_s)^2``,
which vanishes at that representative and makes the Jacobian non-singular; the shift it
adds to ``d theta / d phi`` cannot change any policy.

Meta-gradient: with exact statistics (``exact=True``) ``A_phi`` and ``d_phi`` come from the task's
tensors and are differentiated as functions of ``phi`` (the result equals the finite
differences of the exact meta-objective); with Monte-Carlo statistics they are data, constant in
``phi``, as in the paper's hypergradient. The outer objective ``J_task(pi_adapted)`` is exact.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torchopt
from torch import Tensor
from torch.func import vmap

from bilevel.algorithms._tabular import (
    ESTIMATORS,
    TaskStatistics,
    collect_statistics,
    exact_statistics,
    sample_statistics,
    softmax_policy,
)
from bilevel.envs import (
    FrozenLakeTask,
    TabularMDP,
    evaluate_policy,
    make_family,
    stack_mdps,
    transposed_map,
    value_iteration,
)
from bilevel.implicit import implicit_root
from bilevel.inner import meta_sgd, unroll
from bilevel.runs import Learner, RunConfig, derive_seed, register

__all__ = [
    "DISTANCES",
    "BOMRLConfig",
    "BOMRLLearner",
    "adapt_logits",
    "adaptation_loss",
    "adaptation_residual",
    "check_adaptation_options",
    "episode_collection",
    "exact_collection",
    "exact_meta_objective",
    "forward_kl_adaptation",
    "forward_kl_offset",
    "gym_episode_collection",
    "lower_bound_gain",
    "meta_test",
    "one_round_gap_bound",
    "parameter_distance_adaptation",
    "policy_gradient_adaptation",
    "regularised_lower_bound_gain",
    "reverse_kl_adaptation",
    "sampled_meta_objective",
    "state_divergences",
    "task_return",
]

DISTANCES = ("D1", "D2", "D3")
SAMPLERS = ("tensors", "gym")
SPLITS = ("test", "train", "validation")
ROOT_SEARCH_ITERATIONS = 80
D3_GRADIENT_STEPS = 100
D3_NEWTON_STEPS = 25
NEWTON_MIN_CURVATURE = 1e-8
BOUND_ROUNDS = 10
IMPLICIT_DAMPING = 1e-12
"""Added to the implicit system's diagonal: a near-deterministic adapted policy (a logit gap above
about 37) has curvatures below float64's resolution next to the gauge's, an exactly singular matrix."""


def check_adaptation_options(lam: float, distance: str) -> None:
    """Raise ``ValueError`` naming ``distance`` or ``lam`` when it is not usable."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown `distance` {distance!r}; choose one of {list(DISTANCES)}")
    if not lam > 0:
        raise ValueError(f"`lam` must be > 0; got {lam}")


def lower_bound_gain(logits: Tensor, advantages: Tensor, visitation: Tensor) -> Tensor:
    """``J^(pi_theta) - J(pi_phi) = sum_s d_phi(s) sum_a pi_theta(a|s) A_phi(s, a)`` (Sec. 4); scalar per task.

    ``logits [S_obs, A]`` (``theta``), ``advantages [S_obs, A]``, ``visitation [S_obs]``."""
    return (visitation * (softmax_policy(logits) * advantages).sum(dim=-1)).sum(dim=-1)


def state_divergences(logits: Tensor, behaviour_logits: Tensor, distance: str) -> Tensor:
    """Per-state ``KL(pi_phi || pi_theta)`` (D1) or ``KL(pi_theta || pi_phi)`` (D2); ``[S_obs]``."""
    log_policy = torch.log_softmax(logits, dim=-1)
    log_behaviour = torch.log_softmax(behaviour_logits, dim=-1)
    if distance == "D1":
        return (log_behaviour.exp() * (log_behaviour - log_policy)).sum(dim=-1)
    return (log_policy.exp() * (log_policy - log_behaviour)).sum(dim=-1)


def regularised_lower_bound_gain(
    logits: Tensor, behaviour_logits: Tensor, advantages: Tensor, visitation: Tensor, lam: float, distance: str
) -> Tensor:
    """``J^(pi_theta) - J(pi_phi) - lambda D(pi_phi, pi_theta)``, what adaptation maximises; scalar.

    D1/D2: ``sum_s d_phi(s) [sum_a pi_theta A - lambda KL_s]``; D3: ``lower bound - lambda ||theta - phi||^2``."""
    gain = lower_bound_gain(logits, advantages, visitation)
    if distance == "D3":
        return gain - lam * ((logits - behaviour_logits) ** 2).sum()
    return gain - lam * (visitation * state_divergences(logits, behaviour_logits, distance)).sum(dim=-1)


def _gauge_penalty(logits: Tensor, behaviour_logits: Tensor) -> Tensor:
    """``1/2 sum_s (mean_a theta_s - mean_a phi_s)^2``: fixes the softmax's per-state shift."""
    return 0.5 * ((logits.mean(dim=-1) - behaviour_logits.mean(dim=-1)) ** 2).sum()


def _same_gauge(logits: Tensor, behaviour_logits: Tensor) -> Tensor:
    """The representative of ``logits`` whose per-state mean is that of ``behaviour_logits``."""
    return logits - logits.mean(dim=-1, keepdim=True) + behaviour_logits.mean(dim=-1, keepdim=True)


def adaptation_loss(
    logits: Tensor, behaviour_logits: Tensor, advantages: Tensor, visitation: Tensor, lam: float, distance: str
) -> Tensor:
    """The inner minimisation whose stationary point is the adapted policy (module docstring); scalar.

    D1/D2: ``sum_s [lambda KL_s - sum_a pi_theta A]`` (the per-state problems, weights
    dropped); D3: ``lambda ||theta - phi||^2 - lower-bound gain``. Both plus the gauge penalty."""
    if distance == "D3":
        objective = regularised_lower_bound_gain(logits, behaviour_logits, advantages, visitation, lam, distance)
    else:
        per_state_gain = (softmax_policy(logits) * advantages).sum(dim=-1)
        objective = (per_state_gain - lam * state_divergences(logits, behaviour_logits, distance)).sum()
    return _gauge_penalty(logits, behaviour_logits) - objective


adaptation_residual = torch.func.grad(adaptation_loss)
"""The optimality condition ``F(theta, phi, A, d) = d adaptation_loss / d theta = 0``; ``[S_obs, A]``."""


def reverse_kl_adaptation(behaviour_logits: Tensor, advantages: Tensor, lam: float) -> Tensor:
    """D2's closed form ``theta = phi + A / lambda`` (``pi ∝ pi_phi exp(A / lambda)``), in the gauge of ``phi``."""
    return _same_gauge(behaviour_logits + advantages / lam, behaviour_logits)


def forward_kl_offset(behaviour_policy: Tensor, advantages: Tensor, lam: float) -> Tensor:
    """``u_s = mu_s - max_a A(s, a) [S_obs]``, ``mu_s`` the multiplier with
    ``sum_a lambda pi_phi(a|s) / (u_s + gap_s(a)) = 1``, ``gap_s(a) = max_a' A(s, a') - A(s, a) >= 0``.

    The sum falls monotonically in ``u`` from ``>= 1`` at ``lambda pi_phi(a*|s)`` (``a*`` the argmax) to
    ``<= 1`` at ``lambda``, so the root is unique in that bracket; it is found by bisection on ``log u``.
    Searching ``u`` rather than ``mu`` keeps its relative precision when ``pi_phi(a*|s)`` is tiny: ``u`` is then
    of the order of ``lambda pi_phi(a*|s)``, below the resolution of ``mu`` near ``max_a A``."""
    best, best_action = advantages.max(dim=-1)
    gaps = best[..., None] - advantages
    tiny = torch.finfo(behaviour_policy.dtype).tiny
    best_prior = behaviour_policy.gather(-1, best_action[..., None]).squeeze(-1).clamp(min=tiny)
    lower = torch.log(lam * best_prior)
    upper = lower - torch.log(best_prior)
    for _ in range(ROOT_SEARCH_ITERATIONS):
        middle = 0.5 * (lower + upper)
        total = (lam * behaviour_policy / (torch.exp(middle)[..., None] + gaps)).sum(dim=-1)
        above = total > 1
        lower = torch.where(above, middle, lower)
        upper = torch.where(above, upper, middle)
    return torch.exp(0.5 * (lower + upper))


def forward_kl_adaptation(behaviour_logits: Tensor, advantages: Tensor, lam: float) -> Tensor:
    """D1's solution ``pi(a|s) = lambda pi_phi(a|s) / (mu_s - A(s, a))`` as logits in the gauge of ``phi``,
    with ``mu_s - A(s, a) = u_s + gap_s(a)`` from `forward_kl_offset`."""
    behaviour_policy = softmax_policy(behaviour_logits)
    offset = forward_kl_offset(behaviour_policy, advantages, lam)
    gaps = advantages.max(dim=-1, keepdim=True).values - advantages
    policy = lam * behaviour_policy / (offset[..., None] + gaps)
    return _same_gauge(torch.log(policy), behaviour_logits)


def parameter_distance_adaptation(
    init: Tensor, behaviour_logits: Tensor, advantages: Tensor, visitation: Tensor, lam: float
) -> Tensor:
    """D3: gradient descent (`unroll`) on `adaptation_loss` from ``init``, then damped Newton steps
    (curvatures of the Hessian taken in absolute value, floored, so a step never climbs)."""
    loss = functools.partial(
        adaptation_loss,
        behaviour_logits=behaviour_logits,
        advantages=advantages,
        visitation=visitation,
        lam=lam,
        distance="D3",
    )
    curvature_bound = 2 * lam + 1 + visitation.sum() * advantages.abs().max()
    logits = unroll(loss, init, meta_sgd(1.0 / curvature_bound), D3_GRADIENT_STEPS)
    shape = logits.shape
    flat_loss = lambda flat: loss(flat.reshape(shape))  # noqa: E731
    flat = logits.reshape(-1)
    for _ in range(D3_NEWTON_STEPS):
        gradient = torch.func.grad(flat_loss)(flat)
        curvatures, directions = torch.linalg.eigh(torch.func.hessian(flat_loss)(flat))
        step = directions @ ((directions.T @ gradient) / curvatures.abs().clamp(min=NEWTON_MIN_CURVATURE))
        flat = flat - step
    return flat.reshape(shape)


def _solve_adaptation(
    init: Tensor, behaviour_logits: Tensor, advantages: Tensor, visitation: Tensor, lam: float, distance: str
) -> Tensor:
    if distance == "D1":
        return forward_kl_adaptation(behaviour_logits, advantages, lam)
    if distance == "D2":
        return reverse_kl_adaptation(behaviour_logits, advantages, lam)
    return parameter_distance_adaptation(init, behaviour_logits, advantages, visitation, lam)


_implicit_adaptation = implicit_root(adaptation_residual, solve="dense", damping=IMPLICIT_DAMPING)(_solve_adaptation)


def adapt_logits(behaviour_logits: Tensor, statistics: TaskStatistics, lam: float, distance: str) -> Tensor:
    """BO-MRL's within-task algorithm: ``argmax_theta J^(pi_theta) - lambda D`` from ``pi_phi``'s statistics.

    ``behaviour_logits [S_obs, A]``; returns ``theta* [S_obs, A]``, differentiable in ``phi`` and
    the statistics by the implicit function theorem on `adaptation_residual`. vmap-able over tasks."""
    check_adaptation_options(lam, distance)
    return _implicit_adaptation(
        behaviour_logits, behaviour_logits, statistics.advantages, statistics.visitation, lam, distance
    )


def policy_gradient_adaptation(logits: Tensor, statistics: TaskStatistics, lr: float, steps: int) -> Tensor:
    """The MAML-style baseline: ``steps`` gradient-ascent steps of the unregularised lower bound
    (the first is the policy gradient at ``phi``) with step size ``lr``, by `unroll`."""
    gain = functools.partial(lower_bound_gain, advantages=statistics.advantages, visitation=statistics.visitation)
    return unroll(lambda theta: -gain(theta), logits, torchopt.sgd(lr), steps)


def _with_tensors(mdp: TabularMDP, transitions: Tensor, rewards: Tensor, initial_distribution: Tensor) -> TabularMDP:
    return TabularMDP(transitions, rewards, initial_distribution, mdp.gamma, mdp.horizon, mdp.num_observable_states)


def task_return(mdp: TabularMDP, logits: Tensor) -> Tensor:
    """Exact ``J_task(softmax(logits))``, stacked tasks ``[N]`` for stacked ``mdp`` and ``logits [N, S_obs, A]``."""
    return evaluate_policy(mdp, softmax_policy(logits)).expected_return


def exact_meta_objective(meta_logits: Tensor, mdps: TabularMDP, lam: float, distance: str) -> Tensor:
    """``mean_tasks J_task(pi_{Alg(phi)})`` with exact statistics; ``mdps`` stacked ``[N, ...]`` (`stack_mdps`)."""

    def per_task(transitions: Tensor, rewards: Tensor, initial_distribution: Tensor) -> Tensor:
        mdp = _with_tensors(mdps, transitions, rewards, initial_distribution)
        adapted = adapt_logits(meta_logits, exact_statistics(mdp, meta_logits), lam, distance)
        return task_return(mdp, adapted)

    return vmap(per_task)(mdps.transitions, mdps.rewards, mdps.initial_distribution).mean()


def sampled_meta_objective(
    meta_logits: Tensor, mdps: TabularMDP, statistics: TaskStatistics, lam: float, distance: str
) -> Tensor:
    """``mean_tasks J_task(pi_{Alg(phi)})`` with statistics collected by ``pi_phi`` (stacked, constant in ``phi``)."""
    adapt = vmap(adapt_logits, in_dims=(None, 0, None, None))
    adapted = adapt(meta_logits, statistics, lam, distance)
    return task_return(mdps, adapted).mean()


Adaptation = Callable[[Tensor, TaskStatistics], Tensor]
"""``(logits [N, S_obs, A], statistics stacked over N tasks) -> adapted logits [N, S_obs, A]``."""
Collection = Callable[[Tensor, int], tuple[TaskStatistics, int]]
"""``(logits [N, S_obs, A], round) -> (statistics stacked over N tasks, environment steps)``."""


def meta_test(mdps: TabularMDP, start_logits: Tensor, adapt: Adaptation, collect: Collection, rounds: int) -> Tensor:
    """Repeated rounds of (collect with the current policy, adapt), from ``start_logits [N, S_obs, A]``.

    Returns the exact return of every task after ``0..rounds`` rounds, ``[rounds + 1, N]``."""
    logits = start_logits
    returns = [task_return(mdps, logits)]
    for round_index in range(rounds):
        statistics, _ = collect(logits, round_index)
        logits = adapt(logits, statistics)
        returns.append(task_return(mdps, logits))
    return torch.stack(returns)


def one_round_gap_bound(
    meta_logits: Tensor, mdps: TabularMDP, lam: float, distance: str, rounds: int = BOUND_ROUNDS
) -> dict[str, float]:
    """The paper's upper bound on the expected optimality gap after one round of Alg, as the authors' code
    evaluates it (``BOMRL_discrete_my/bound_computation.py`` and ``graph.py``):

        E_tau[J_tau(pi*_tau) - J_tau(Alg(pi_phi, lambda, tau))] <= lambda (1 + gamma) / (1 - gamma) E_tau K_tau,
        K_tau = sum_s nu_phi(s) KL(pi*_tau(.|s) || pi_phi(.|s))   (D1),   KL(pi_phi || pi*_tau)   (D2),

    ``nu_phi = d_phi / sum d_phi`` the meta-policy's normalised discounted visitation, probabilities
    clipped at 1e-4 inside the KL (their ``KL``), and ``pi*_tau`` an optimal policy approximated, as
    theirs, by ``rounds`` rounds of exact adaptation from ``pi_phi``. ``meta_logits [S_obs, A]``,
    ``mdps`` stacked ``[N, ...]``. Returns ``bound_gap`` (the right-hand side), ``bound_kl`` (``E K``),
    ``bound_optimal_return`` (the mean return of the ``pi*_tau`` used) and ``bound_1`` (mean optimum minus
    ``bound_gap``, a lower bound on the mean return after one round)."""
    if distance not in ("D1", "D2"):
        raise ValueError(f"the bound is evaluated for D1 and D2; got `distance` {distance!r}")
    num_tasks = mdps.transitions.shape[0]
    start = meta_logits.expand(num_tasks, -1, -1)
    adapt = vmap(functools.partial(adapt_logits, lam=lam, distance=distance))
    logits = start
    collect = exact_collection(mdps)
    for round_index in range(rounds):
        logits = adapt(logits, collect(logits, round_index)[0])
    optimal = softmax_policy(logits).clamp(min=1e-4)
    meta = softmax_policy(start).clamp(min=1e-4)
    first, second = (optimal, meta) if distance == "D1" else (meta, optimal)
    divergence = (first * (first.log() - second.log())).sum(dim=-1)
    visitation = exact_collection(mdps)(start, 0)[0].visitation
    weights = visitation / visitation.sum(dim=-1, keepdim=True)
    kl = (weights * divergence).sum(dim=-1).mean()
    gap = lam * (1 + mdps.gamma) / (1 - mdps.gamma) * kl
    optimum = value_iteration(mdps).expected_return.mean()
    return {
        "bound_gap": float(gap),
        "bound_kl": float(kl),
        "bound_1": float(optimum - gap),
        "bound_optimal_return": float(task_return(mdps, logits).mean()),
    }


def exact_collection(mdps: TabularMDP) -> Collection:
    """Statistics from the tasks' tensors (no environment steps)."""

    def collect(logits: Tensor, round_index: int) -> tuple[TaskStatistics, int]:
        per_task = lambda p, r, i, theta: exact_statistics(_with_tensors(mdps, p, r, i), theta)  # noqa: E731
        return vmap(per_task)(mdps.transitions, mdps.rewards, mdps.initial_distribution, logits), 0

    return collect


def episode_collection(mdps: TabularMDP, episodes: int, seed: int, estimator: str = "monte_carlo") -> Collection:
    """Statistics of ``episodes`` episodes per task drawn from the stacked ``mdps``' tensors
    (`sample_statistics` with ``estimator``), all tasks at once; round ``r`` seeded by ``derive_seed(seed, r)``."""

    def collect(logits: Tensor, round_index: int) -> tuple[TaskStatistics, int]:
        generator = torch.Generator().manual_seed(derive_seed(seed, round_index))
        return sample_statistics(mdps, logits, episodes, generator, estimator)

    return collect


def gym_episode_collection(tasks: list[FrozenLakeTask], episodes: int, seed: int) -> Collection:
    """Monte-Carlo statistics of ``episodes`` episodes per task in its Gymnasium env (`collect_statistics`),
    task ``i`` of round ``r`` seeded by ``derive_seed(seed, r, i)``; the same estimator, slower."""

    def collect(logits: Tensor, round_index: int) -> tuple[TaskStatistics, int]:
        results = [
            collect_statistics(task, task_logits, episodes, seed=derive_seed(seed, round_index, index))
            for index, (task, task_logits) in enumerate(zip(tasks, logits, strict=True))
        ]
        statistics = TaskStatistics(*(torch.stack(parts) for parts in zip(*(r[0] for r in results), strict=True)))
        return statistics, sum(r[1] for r in results)

    return collect


@dataclasses.dataclass
class BOMRLConfig(RunConfig):
    """BO-MRL on a Frozen Lake family (softmax policy over logits, exact outer objective)."""

    env: str = "frozenlake-hole"
    """``frozenlake-hole`` or ``frozenlake-nohole``."""
    iterations: int = 150
    """Meta-iterations (the paper: 150)."""
    distance: str = "D1"
    """The adaptation's distance: D1 = KL(pi_phi || pi), D2 = KL(pi || pi_phi), D3 = ||theta - phi||^2."""
    lam: float = 0.1
    """The distance weight lambda > 0 of the adaptation inside meta-training (for D1/D2 a per-state
    temperature on the advantages)."""
    eval_lam: float = 0.0
    """lambda of BO-MRL's adaptation at meta-test; 0: the same as ``lam``. (The authors' code meta-trains with 5.0
    and meta-tests with 0.1 for D1, 0.2 for D2.)"""
    tasks_per_batch: int = 5
    """Training maps drawn (with replacement) per meta-iteration (the paper: 5)."""
    episodes: int = 500
    """Episodes collected once per task with the current policy (the paper: 500)."""
    exact: bool = False
    """Use the exact advantages and visitation from the task's tensors instead of episodes."""
    sampler: str = "tensors"
    """Where episodes come from: ``tensors`` (drawn from the MDP's tensors, batched) or ``gym`` (the
    Gymnasium env, one task at a time); the same distribution."""
    estimator: str = "monte_carlo"
    """How episodes become statistics: ``monte_carlo`` (every-visit returns, the paper's Monte-Carlo ``Q``)
    or ``model`` (the empirical model of the visited pairs evaluated exactly; ``sampler="tensors"`` only)."""
    num_validation: int = 0
    """The last ``num_validation`` training maps are left out of meta-training and form the
    ``validation`` split, for choosing hyperparameters without the held-out maps."""
    transposed_maps: bool = False
    """Also meta-train on each meta-training map mirrored along its diagonal (`transposed_map`, a symmetry
    of the family's map distribution; not in the paper): up to twice the maps, none of them a validation
    or held-out map."""
    meta_lr: float = 0.03
    """Adam learning rate on the meta-logits (the paper: 0.03)."""
    adaptation_rounds: int = 4
    """Default number of (collect, adapt) rounds at meta-test."""
    pg_lr: float = 50.0
    """Step size of the policy-gradient baseline's adaptation (50: the best of 5, 20, 50 on the training maps)."""
    pg_steps: int = 1
    """Gradient steps per round of the policy-gradient baseline."""

    def validate(self) -> None:
        super().validate()
        check_adaptation_options(self.lam, self.distance)
        if self.estimator not in ESTIMATORS:
            raise ValueError(f"unknown `estimator` {self.estimator!r}; choose one of {list(ESTIMATORS)}")
        if self.estimator == "model" and self.sampler == "gym":
            raise ValueError("`estimator` 'model' needs `sampler` 'tensors'")
        if not self.eval_lam >= 0:
            raise ValueError(f"`eval_lam` must be > 0, or 0 for `lam`; got {self.eval_lam}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown `sampler` {self.sampler!r}; choose one of {list(SAMPLERS)}")
        if not 0 <= self.num_validation:
            raise ValueError(f"`num_validation` must be >= 0; got {self.num_validation}")
        for name in ("tasks_per_batch", "episodes", "pg_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}")
        if self.adaptation_rounds < 0:
            raise ValueError(f"`adaptation_rounds` must be >= 0; got {self.adaptation_rounds}")
        for name in ("meta_lr", "pg_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"`{name}` must be > 0; got {getattr(self, name)}")


def augmented_with_transposes(tasks: list[FrozenLakeTask], family: Any) -> list[FrozenLakeTask]:
    """``tasks`` followed by the transpose of each (`transposed_map`) that is not already among them and is
    not one of ``family``'s maps (so no validation or held-out map enters meta-training)."""
    family_maps = {task.desc for task in [*family.train_tasks(), *family.test_tasks()]}
    seen = {task.desc for task in tasks}
    extra = []
    for task in tasks:
        desc = transposed_map(task.desc)
        if desc not in seen and desc not in family_maps:
            seen.add(desc)
            extra.append(FrozenLakeTask(desc, task.kind))
    return [*tasks, *extra]


@register("bomrl")
class BOMRLLearner(Learner):
    """Meta-trains the logits ``phi`` with Adam on the mean adapted return of a batch of training maps.

    Each step samples ``tasks_per_batch`` maps from ``derive_seed(seed, iteration)``, collects
    their statistics once with ``pi_phi`` (episodes seeded from ``(seed, iteration)``, or exact),
    and takes one Adam step along the hypergradient. ``return`` is the batch's mean exact discounted
    return of ``pi_phi``, ``adapted_return`` that after one adaptation. Everything runs on the CPU in
    float64 (the tensors are 17 x 4), whatever ``device`` names: ``self.device`` is the CPU, so a checkpoint
    is restored there."""

    Config = BOMRLConfig
    envs = ("frozenlake-hole", "frozenlake-nohole")
    config: BOMRLConfig

    def __init__(self, config: BOMRLConfig, device: torch.device) -> None:
        super().__init__(config, torch.device("cpu"))
        self.family = make_family(config.env)
        train = self.family.train_tasks()
        if not config.num_validation < len(train):
            raise ValueError(f"`num_validation` must be < the {len(train)} training maps; got {config.num_validation}")
        self.meta_train_tasks = train[: len(train) - config.num_validation]
        self.validation_tasks = train[len(train) - config.num_validation :]
        if config.transposed_maps:
            self.meta_train_tasks = augmented_with_transposes(self.meta_train_tasks, self.family)
        mdp = train[0].mdp
        self.logits = torch.zeros(mdp.num_observable_states, mdp.rewards.shape[-1], dtype=torch.float64)
        self.optimizer = torchopt.adam(config.meta_lr)
        self.optimizer_state = self.optimizer.init(self.logits)

    def step(self) -> dict[str, float]:
        config = self.config
        generator = np.random.default_rng(derive_seed(config.seed, self.iteration))
        tasks = [
            self.meta_train_tasks[i]
            for i in generator.integers(len(self.meta_train_tasks), size=config.tasks_per_batch)
        ]
        mdps = stack_mdps([task.mdp for task in tasks])
        if config.exact:
            objective = functools.partial(exact_meta_objective, mdps=mdps, lam=config.lam, distance=config.distance)
        else:
            collect = self._collection(tasks, mdps, config.episodes, derive_seed(config.seed, self.iteration, 1))
            statistics, steps = collect(self.logits.expand(len(tasks), -1, -1), 0)
            self.env_steps += steps
            objective = functools.partial(
                sampled_meta_objective, mdps=mdps, statistics=statistics, lam=config.lam, distance=config.distance
            )
        gradient, adapted_return = torch.func.grad_and_value(objective)(self.logits)
        before = task_return(mdps, self.logits.expand(len(tasks), -1, -1)).mean()
        updates, self.optimizer_state = self.optimizer.update(-gradient, self.optimizer_state, inplace=False)
        self.logits = torchopt.apply_updates(self.logits, updates, inplace=False)
        return {
            "return": float(before),
            "adapted_return": float(adapted_return),
            "hypergradient_norm": float(gradient.norm()),
        }

    def _collection(
        self, tasks: list[FrozenLakeTask], mdps: TabularMDP, episodes: int, seed: int, estimator: str | None = None
    ) -> Collection:
        if self.config.sampler == "gym":
            return gym_episode_collection(tasks, episodes, seed)
        return episode_collection(mdps, episodes, seed, estimator or self.config.estimator)

    def split_tasks(self, split: str) -> list[FrozenLakeTask]:
        """``test``: the held-out maps; ``train``: all training maps (the paper's protocol);
        ``validation``: the last ``num_validation`` training maps, left out of meta-training."""
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {list(SPLITS)}; got {split!r}")
        if split == "validation" and not self.validation_tasks:
            raise ValueError("`split` 'validation' needs `num_validation` > 0 at training")
        return {
            "test": self.family.test_tasks(),
            "train": self.family.train_tasks(),
            "validation": self.validation_tasks,
        }[split]

    def evaluate(
        self,
        rounds: int | None = None,
        split: str = "test",
        exact: bool | None = None,
        episodes: int | None = None,
        lam: float | None = None,
        pg_lr: float | None = None,
        baselines: bool = True,
        bound: bool = True,
        estimator: str | None = None,
    ) -> dict[str, float]:
        """Meta-test on ``split`` (`split_tasks`) for ``rounds`` rounds of (collect, adapt).

        Returns the mean exact return after ``k = 0..rounds`` rounds of BO-MRL (``bomrl_k``, adaptation with
        ``lam``, default ``eval_lam`` or ``lam``), of the policy-gradient baseline with step ``pg_lr`` from
        the meta-policy (``pg_meta_k``) and from the uniform policy, zero logits (``pg_uniform_k``; both
        left out when ``baselines`` is false), their standard errors over maps (``..._se_k``), and the mean
        optimum by value iteration (``optimum``); for D1/D2 and ``bound``, `one_round_gap_bound`'s
        ``bound_*`` entries. Data: episodes (``exact=False``, statistics by ``estimator``, default the
        config's) or exact."""
        config = self.config
        rounds = config.adaptation_rounds if rounds is None else rounds
        exact = config.exact if exact is None else exact
        episodes = config.episodes if episodes is None else episodes
        lam = (config.eval_lam or config.lam) if lam is None else lam
        pg_lr = config.pg_lr if pg_lr is None else pg_lr
        check_adaptation_options(lam, config.distance)
        if estimator is not None and estimator not in ESTIMATORS:
            raise ValueError(f"unknown `estimator` {estimator!r}; choose one of {list(ESTIMATORS)}")
        if rounds < 0:
            raise ValueError(f"`rounds` must be >= 0; got {rounds}")
        tasks = self.split_tasks(split)
        mdps = stack_mdps([task.mdp for task in tasks])
        meta_logits = self.logits.expand(len(tasks), -1, -1)
        bomrl = vmap(functools.partial(adapt_logits, lam=lam, distance=config.distance))
        pg = vmap(functools.partial(policy_gradient_adaptation, lr=pg_lr, steps=config.pg_steps))
        methods: dict[str, tuple[Tensor, Adaptation]] = {"bomrl": (meta_logits, bomrl)}
        if baselines:
            methods["pg_meta"] = (meta_logits, pg)
            methods["pg_uniform"] = (torch.zeros_like(meta_logits), pg)
        result: dict[str, float] = {"optimum": float(value_iteration(mdps).expected_return.mean()), "lam": lam}
        if bound and config.distance in ("D1", "D2"):
            result.update(one_round_gap_bound(self.logits, mdps, lam, config.distance))
        for method_index, (name, (start, adapt)) in enumerate(methods.items()):
            seed = derive_seed(config.seed, self.iteration, 2, method_index)
            collect = exact_collection(mdps) if exact else self._collection(tasks, mdps, episodes, seed, estimator)
            returns = meta_test(mdps, start, adapt, collect, rounds)
            for k, per_task in enumerate(returns):
                result[f"{name}_{k}"] = float(per_task.mean())
                result[f"{name}_se_{k}"] = float(per_task.std() / len(tasks) ** 0.5)
        return result

    def learner_state(self) -> dict[str, Any]:
        return {"logits": self.logits.clone(), "optimizer_state": self.optimizer_state}

    def load_learner_state(self, state: dict[str, Any]) -> None:
        self.load_evaluation_state(state)
        self.optimizer_state = state["optimizer_state"]

    def evaluation_state(self) -> dict[str, Any]:
        """The meta-policy's logits ``[S, A]``: all that `evaluate` reads."""
        return {"logits": self.logits.clone()}

    def load_evaluation_state(self, state: dict[str, Any]) -> None:
        self.logits = state["logits"].to(torch.float64)
