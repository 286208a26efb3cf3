"""The phases of one MB-MPO iteration (`bilevel.algorithms.mbmpo`), timed inside a real ``MBMPO.step``.

Phases (exclusive seconds: a phase's time excludes the phases nested in it, so they sum to the total):

- ``real.random``: the first iteration's uniform-random episodes; ``real.collect``: the adapted
  policies' real episodes (Gymnasium MuJoCo envs, the policy's forward per step);
- ``fit.train`` / ``fit.holdout``: the ensemble's Adam epochs / its holdout scoring after each epoch
  (``fit.other``: splitting, normalisers, the rest of ``fit_models``);
- ``imagine``: model rollouts (pre- and post-adaptation), ``model_data``: advantages;
- ``adapt``: the vmapped inner step; ``behaviour``: the adapted policies' log-probabilities;
- ``trpo.gradient``: the meta-gradient; ``trpo.linearise``: the KL gradient's graph; ``trpo.fvp``: the
  Fisher-vector products (conjugate gradient and the step's curvature); ``trpo.cg``: the solver's own
  arithmetic; ``trpo.line_search``: the candidates' loss and KL; ``trpo.other``: the rest;
- ``metrics``: ``||da/ds||^2`` and jerk on the real episodes; ``other``: everything else.

Settings default to the minimum-attention reproduction (``docs/reproductions/min-attention/run.sh``):
HalfCheetah, 5000 random steps, 15 meta-steps, 20 imagined trajectories, 4 episodes per model, one
thread. ``--resume RUN`` times the iteration after a run's last checkpoint instead (its data size, so a late
iteration's model fit). ``--repeats`` reruns the same iteration from the same state.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python benchmarks/mbmpo_iteration.py [--alpha 0.05] [--resume RUN]
[--fisher-product exact|gauss-newton] [--device cuda]``; to compare two versions of the package, or the two
Fisher products (timed as ``trpo.linearise`` / ``trpo.fvp`` either way), run it with ``PYTHONPATH`` pointing at
each, or with each ``--fisher-product``, alternately.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import torch

import bilevel.trpo
from bilevel.algorithms import mbmpo
from bilevel.nets import ensemble
from bilevel.runs.loop import _build, load_learner, make_config

REPRODUCTION = {
    "env": "halfcheetah",
    "initial_random_steps": 5000,
    "episodes_per_model": 4,
    "meta_steps": 15,
    "imagined_trajectories": 20,
    "threads": 1,
    "device": "cpu",
}


class PhaseTimer:
    """Exclusive time per phase label, wall-clock and this process's CPU time (the latter is what to compare on
    a machine shared with other jobs): entering a nested phase pauses the enclosing one. With a CUDA
    ``device`` every phase boundary synchronises it, so that queued kernels are charged to the phase that
    launched them."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.synchronize = (lambda: torch.cuda.synchronize(device)) if device is not None and device.type == "cuda" \
            else (lambda: None)
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)
        self.stack: list[tuple[str, float, float]] = []

    def _charge(self, label: str, wall_start: float, cpu_start: float) -> tuple[float, float]:
        self.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        self.wall[label] += wall - wall_start
        self.cpu[label] += cpu - cpu_start
        return wall, cpu

    @contextlib.contextmanager
    def phase(self, label: str) -> Iterator[None]:
        wall, cpu = time.perf_counter(), time.process_time()
        if self.stack:
            wall, cpu = self._charge(*self.stack[-1])
        self.stack.append((label, wall, cpu))
        try:
            yield
        finally:
            wall, cpu = self._charge(*self.stack.pop())
            if self.stack:
                self.stack[-1] = (self.stack[-1][0], wall, cpu)

    def current(self) -> str | None:
        return self.stack[-1][0] if self.stack else None

    def wrap(self, label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def timed(*args: Any, **kwargs: Any) -> Any:
            with self.phase(label):
                return fn(*args, **kwargs)

        return timed


def instrument(timer: PhaseTimer) -> contextlib.ExitStack:
    """Wrap the iteration's functions in ``timer``'s phases (undone when the returned stack closes)."""
    stack = contextlib.ExitStack()

    def patch(owner: Any, name: str, replacement: Any) -> None:
        original = getattr(owner, name)
        setattr(owner, name, replacement(original))
        stack.callback(setattr, owner, name, original)

    patch(mbmpo.MBMPO, "_random_episodes", lambda f: timer.wrap("real.random", f))

    def timed_collection(original: Callable[..., Any]) -> Callable[..., Any]:
        def collect(*args: Any, **kwargs: Any) -> Any:
            if timer.current() == "real.random":
                return original(*args, **kwargs)
            with timer.phase("real.collect"):
                return original(*args, **kwargs)

        return collect

    patch(mbmpo, "collect_real", timed_collection)
    patch(mbmpo.MBMPO, "fit_models", lambda f: timer.wrap("fit.other", f))
    patch(ensemble.ProbabilisticEnsemble, "_train_epoch", lambda f: timer.wrap("fit.train", f))
    patch(ensemble.ProbabilisticEnsemble, "_mse", lambda f: timer.wrap("fit.holdout", f))
    patch(mbmpo, "imagine_models", lambda f: timer.wrap("imagine", f))
    patch(mbmpo, "model_data", lambda f: timer.wrap("model_data", f))
    patch(mbmpo, "adapt_models", lambda f: timer.wrap("adapt", f))
    patch(mbmpo, "behaviour_of", lambda f: timer.wrap("behaviour", f))
    patch(mbmpo.MBMPO, "smoothness", lambda f: timer.wrap("metrics", f))
    patch(bilevel.trpo, "conjugate_gradient", lambda f: timer.wrap("trpo.cg", f))

    def timed_operator(original: Callable[..., Any]) -> Callable[..., Any]:
        def operator(*args: Any, **kwargs: Any) -> Callable[..., Any]:
            with timer.phase("trpo.linearise"):
                product = original(*args, **kwargs)
            return timer.wrap("trpo.fvp", product)

        return operator

    patch(bilevel.trpo, "hessian_vector_operator", timed_operator)
    if hasattr(bilevel.trpo, "gauss_newton_vector_operator"):
        patch(bilevel.trpo, "gauss_newton_vector_operator", timed_operator)

    def timed_trpo(original: Callable[..., Any]) -> Callable[..., Any]:
        def step(loss_fn: Callable[..., Any], kl_fn: Callable[..., Any], params: Any, **kwargs: Any) -> Any:
            calls = {"loss": 0}

            def loss(p: Any) -> Any:
                calls["loss"] += 1
                label = "trpo.gradient" if calls["loss"] == 1 else "trpo.line_search"
                with timer.phase(label):
                    return loss_fn(p)

            def kl(p: Any) -> Any:
                if timer.current() != "trpo.other":
                    return kl_fn(p)
                with timer.phase("trpo.line_search"):
                    return kl_fn(p)

            if kwargs.get("loss_and_kl_fn") is not None:
                kwargs["loss_and_kl_fn"] = timer.wrap("trpo.line_search", kwargs["loss_and_kl_fn"])
            with timer.phase("trpo.other"):
                return original(loss, kl, params, **kwargs)

        return step

    patch(mbmpo, "trpo_step", timed_trpo)
    return stack


def build(args: argparse.Namespace) -> mbmpo.MBMPO:
    if args.resume:
        _, learner = load_learner(args.resume, device=args.device)
        return learner
    values = {**REPRODUCTION, "seed": args.seed, "attention_weight": args.alpha, "iterations": 1, "device": args.device}
    if args.fisher_product is not None:
        values["fisher_product"] = args.fisher_product
    return _build("mbmpo", make_config("mbmpo", values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alpha", type=float, default=0.0, help="attention_weight of a fresh run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fisher-product", default=None, help="fisher_product of a fresh run (default: the config's)")
    parser.add_argument("--resume", default=None, help="time the iteration after this run's last checkpoint")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda or cuda:N (the learner's device; the MuJoCo steps stay on the CPU)")
    parser.add_argument("--json", default=None, help="also write the phases and metrics here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    learner = build(args)
    state = copy.deepcopy(learner.state_dict())
    results = []
    for _ in range(args.repeats):
        learner.load_state_dict(copy.deepcopy(state))
        timer = PhaseTimer(learner.device)
        with instrument(timer), timer.phase("other"):
            start, cpu_start = time.perf_counter(), time.process_time()
            metrics = learner.step()
            if learner.device.type == "cuda":
                torch.cuda.synchronize(learner.device)
            total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
        results.append(
            {
                "wall": total,
                "cpu": cpu_total,
                "wall_phases": dict(timer.wall),
                "cpu_phases": dict(timer.cpu),
                "metrics": metrics,
            }
        )
        print(
            f"iteration {learner.iteration}: {total:.1f} s wall, {cpu_total:.1f} s CPU  (return "
            f"{metrics['return']:.3f}, model_epochs {metrics['model_epochs']:.0f}, "
            f"surrogate_loss {metrics['surrogate_loss']:.6g})"
        )
        print(f"  {'phase':18s} {'CPU s':>8s} {'%':>6s} {'wall s':>8s}")
        for label, seconds in sorted(timer.cpu.items(), key=lambda item: -item[1]):
            print(f"  {label:18s} {seconds:8.2f} {100 * seconds / cpu_total:6.1f} {timer.wall[label]:8.2f}")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main()
