"""The linear solve of neural BO-MRL's hypergradient on one HalfCheetah batch: residual against iterations.

One meta-iteration's data of the initial policy (``--tasks`` tasks x ``--episodes`` episodes), each task
adapted as in training (`adapt_tasks`), the right-hand side ``b = grad_theta J`` from fresh episodes of the
adapted policy (`policy_gradient`). Per task, with ``H`` the Hessian of `adaptation_loss` at ``theta*``:

- Lanczos (full reorthogonalisation, ``--lanczos`` steps from ``b``): the extreme Ritz values of ``H``,
  bounds inside its spectrum, and how many are negative (``H`` indefinite);
- the relative residual ``||b - (H + mu I) u_k|| / ||b||`` after ``k`` iterations of conjugate gradient
  (`bilevel.linalg.conjugate_gradient`), CG on the normal equations and MINRES (`bilevel.linalg.minres`),
  for dampings ``mu``; the relative error of the hypergradient ``u_k^T dF/dphi`` against MINRES
  run to ``--reference`` iterations on the same (damped) system, and its cosine with that reference
  hypergradient at ``--configured-damping`` (the training's 1e-2): how far a cheaper or more damped
  solve turns the direction the outer TRPO step takes.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bomrl_implicit_solve.py`` (a few minutes on one core).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time

import numpy as np
import torch

from bilevel import tree
from bilevel.algorithms.bomrl_neural import (
    BOMRLNeural,
    adapt_tasks,
    adaptation_batches,
    adaptation_loss,
    adaptation_residual,
    policy_gradient,
)
from bilevel.linalg import conjugate_gradient, minres
from bilevel.rl.meta_batches import task_data
from bilevel.runs.loop import make_config, seed_everything


def lanczos_ritz_values(matvec, start: torch.Tensor, steps: int) -> np.ndarray:
    """Ritz values of ``steps`` Lanczos steps from ``start`` with full reorthogonalisation (float64)."""
    basis = [start.double() / start.double().norm()]
    alphas, betas = [], []
    for k in range(steps):
        w = matvec(basis[-1].to(start.dtype)).double()
        alpha = float(w @ basis[-1])
        alphas.append(alpha)
        q = torch.stack(basis)
        w = w - q.T @ (q @ w)
        w = w - q.T @ (q @ w)
        beta = float(w.norm())
        if beta < 1e-10 or k == steps - 1:
            break
        betas.append(beta)
        basis.append(w / beta)
    tridiagonal = np.diag(alphas) + np.diag(betas[: len(alphas) - 1], 1) + np.diag(betas[: len(alphas) - 1], -1)
    return np.linalg.eigvalsh(tridiagonal)


def probe_task(phi, theta, batch, b_tree, adaptation, args) -> dict:
    """One task's spectrum bounds and residual curves (module docstring)."""
    b, unravel = tree.ravel(b_tree)
    grad_fn = torch.func.grad(functools.partial(adaptation_loss, meta_params=phi, batch=batch, adaptation=adaptation))
    _, hessian_vjp = torch.func.vjp(grad_fn, theta)
    _, meta_vjp = torch.func.vjp(lambda p: adaptation_residual(theta, p, batch, adaptation), phi)

    def hessian(v: torch.Tensor) -> torch.Tensor:
        return tree.ravel(hessian_vjp(unravel(v))[0])[0]

    def hypergradient(u: torch.Tensor) -> torch.Tensor:
        return tree.ravel(meta_vjp(unravel(u))[0])[0]

    started = time.perf_counter()
    ritz = lanczos_ritz_values(hessian, b, args.lanczos)
    record = {
        "b_norm": float(b.norm()), "ritz_min": float(ritz[0]), "ritz_max": float(ritz[-1]),
        "ritz_negative": int((ritz < 0).sum()), "ritz_count": len(ritz),
        "ritz_smallest_abs": float(np.abs(ritz).min()),
        "optimality_residual": float(tree.norm(grad_fn(theta))),
        "lanczos_seconds": time.perf_counter() - started,
    }
    def damped_operator(damping: float):
        return lambda v: hessian(v) + damping * v

    references = {}
    for damping in args.dampings:
        reference, _ = minres(damped_operator(damping), b, max_iter=args.reference, tol=0.0)
        references[damping] = hypergradient(reference)
        record[f"reference_mu{damping:g}_residual"] = float(
            (b - damped_operator(damping)(reference)).norm() / b.norm())
    configured = references.get(args.configured_damping)
    for damping in args.dampings:
        damped = damped_operator(damping)
        reference_h = references[damping]
        if configured is not None:
            record[f"reference_mu{damping:g}_cos"] = float(torch.nn.functional.cosine_similarity(
                reference_h, configured, dim=0))
        for iterations in args.iterations:
            for name in ("cg", "normal_cg", "minres"):
                if name == "cg":
                    u, _ = conjugate_gradient(damped, b, max_iter=iterations, tol=0.0)
                elif name == "normal_cg":
                    u, _ = conjugate_gradient(lambda v, damped=damped: damped(damped(v)), damped(b),
                                              max_iter=iterations, tol=0.0)
                else:
                    u, _ = minres(damped, b, max_iter=iterations, tol=0.0)
                h = hypergradient(u)
                residual = float((b - damped(u)).norm() / b.norm())
                error = float((h - reference_h).norm() / reference_h.norm())
                key = f"{name}_mu{damping:g}_k{iterations}"
                record[key] = residual
                record[f"{key}_herr"] = error if math.isfinite(error) else None
                if configured is not None:
                    record[f"{key}_cos"] = float(torch.nn.functional.cosine_similarity(h, configured, dim=0))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=5)
    parser.add_argument("--adapt-steps", type=int, default=100)
    parser.add_argument("--lanczos", type=int, default=60)
    parser.add_argument("--reference", type=int, default=400)
    parser.add_argument("--iterations", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--dampings", type=float, nargs="+", default=[0.0, 1e-2, 1e-1, 1.0])
    parser.add_argument("--configured-damping", type=float, default=1e-2,
                        help="the damping whose reference hypergradient the cosines compare with")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seed_everything(args.seed)
    config = make_config("bomrl-neural", {
        "env": "halfcheetah-dir", "meta_batch_size": args.tasks, "episodes_per_task": args.episodes,
        "lam": 0.5, "adapt_clip": 0.2, "adapt_steps": args.adapt_steps, "seed": args.seed, "device": "cpu",
    })
    learner = BOMRLNeural(config, torch.device("cpu"))
    tasks = learner.family.sample_tasks(args.tasks, np.random.default_rng(learner._seed("tasks")))
    generator = torch.Generator().manual_seed(learner._seed("actions"))
    phi = learner.meta_params
    adaptation = learner.adaptation()
    sample = functools.partial(learner.sampler, tasks, generator=generator, episodes=args.episodes)
    train = task_data(sample(params=phi, per_task=False, env_seed=learner._seed("train_envs")),
                      config.gamma, config.gae_lambda)
    batches = adaptation_batches(learner.policy, phi, train)
    adapted = adapt_tasks(phi, batches, adaptation)
    fresh = task_data(sample(params=adapted, per_task=True, env_seed=learner._seed("valid_envs")),
                      config.gamma, config.gae_lambda)
    cotangents = policy_gradient(learner.policy, adapted, fresh)

    for task in range(args.tasks):
        batch = type(batches)(*(field[task] for field in batches))
        theta = tree.map(lambda leaf, task=task: leaf[task], adapted)
        b_tree = tree.scale(tree.map(lambda leaf, task=task: leaf[task], cotangents), -1.0)
        record = probe_task(phi, theta, batch, b_tree, adaptation, args)
        print(json.dumps({"task": task, **record}), flush=True)

if __name__ == "__main__":
    main()
