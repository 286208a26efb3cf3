"""Implicit against unrolled hypergradients as the inner steps grow: time and memory.

Problem: L2-regularised logistic regression with one learned log-penalty per feature
(2000 samples, 200 features); the inner solver is K steps of gradient descent and the
outer loss the validation cross-entropy. The unrolled hypergradient differentiates through
the K steps (`unroll`); the implicit one runs the same K steps without a graph and solves
one linear system by CG (`implicit_root`). Each configuration runs in its own process, and
its memory is the growth of the peak resident set over a one-step warm-up of the same
method. It runs on the CPU only.

Run: ``.venv/bin/python benchmarks/implicit_vs_unrolled.py [--steps 10 100 1000]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
import torchopt

from bilevel import implicit_root, unroll

SAMPLES, FEATURES, LR = 2000, 200, 0.5


def make_problem():
    g = torch.Generator().manual_seed(0)
    true_w = torch.randn(FEATURES, generator=g)
    X, X_val = torch.randn(SAMPLES, FEATURES, generator=g), torch.randn(SAMPLES, FEATURES, generator=g)
    y = (torch.rand(SAMPLES, generator=g) < torch.sigmoid(X @ true_w)).float()
    y_val = (torch.rand(SAMPLES, generator=g) < torch.sigmoid(X_val @ true_w)).float()
    return X, y, X_val, y_val


def inner_objective(params, X, y, log_penalty):
    logits = X @ params["w"]
    data = torch.nn.functional.binary_cross_entropy_with_logits(logits, y)
    return data + 0.5 * (torch.exp(log_penalty) * params["w"] ** 2).sum()


def hypergradient(method: str, steps: int) -> torch.Tensor:
    X, y, X_val, y_val = make_problem()
    log_penalty = torch.full((FEATURES,), -3.0, requires_grad=True)
    init = {"w": torch.zeros(FEATURES)}

    def gradient_descent(init, X, y, log_penalty):
        return unroll(lambda p: inner_objective(p, X, y, log_penalty), init, torchopt.sgd(LR), steps)

    if method == "implicit":
        solver = implicit_root(torch.func.grad(inner_objective), solve="cg", max_iter=100, tol=1e-6)(
            gradient_descent)
    else:
        solver = gradient_descent

    w = solver(init, X, y, log_penalty)["w"]
    torch.nn.functional.binary_cross_entropy_with_logits(X_val @ w, y_val).backward()
    return log_penalty.grad


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_single(method: str, steps: int) -> None:
    hypergradient(method, 1)
    baseline = peak_rss_mib()
    start = time.perf_counter()
    grad = hypergradient(method, steps)
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "memory_mib": peak_rss_mib() - baseline, "grad": grad.tolist()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--single", nargs=2, metavar=("METHOD", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        run_single(args.single[0], int(args.single[1]))
        return
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}; each cell a fresh process")
    print("| inner steps | method | time s | peak memory growth MiB | rel. diff to unrolled |")
    print("|---:|---|---:|---:|---:|")
    for steps in args.steps:
        rows = {}
        for method in ("unrolled", "implicit"):
            out = subprocess.run([sys.executable, __file__, "--single", method, str(steps)],
                                 capture_output=True, text=True, check=True).stdout
            rows[method] = json.loads(out.strip().splitlines()[-1])
        reference = torch.tensor(rows["unrolled"]["grad"])
        for method, row in rows.items():
            diff = float((torch.tensor(row["grad"]) - reference).norm() / reference.norm())
            print(f"| {steps} | {method} | {row['seconds']:.3f} | {row['memory_mib']:.1f} | {diff:.1e} |")
    print(f"command: .venv/bin/python benchmarks/implicit_vs_unrolled.py --steps {' '.join(map(str, args.steps))}")


if __name__ == "__main__":
    main()
