"""Wall time of a sweep of 8 short runs: on a local Ray against one after another.

The runs are BO-MRL on exact Frozen Lake (seeds 0..7). Sequential: `bilevel.runs.train`
in this process, one run after the other, with one torch thread (as Ray gives each worker).
Ray: `bilevel.runs.sweep.run_sweep` with one CPU
a trial on every core. Ray's overhead per trial is estimated as
``(ray_wall - ray_start - sequential_wall / parallel) / (trials / parallel)``, the time each
trial costs beyond its share of the sequential work once Ray has started.

Run: ``.venv/bin/python benchmarks/sweep_overhead.py [--trials 8] [--iterations 20]``
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from bilevel.runs import make_config, train
from bilevel.runs.sweep import run_sweep

OVERRIDES = {"exact": True, "tasks_per_batch": 5, "checkpoint_every": 5, "device": "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=20)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bilevel-sweep-bench-"))
    overrides = {**OVERRIDES, "iterations": args.iterations}

    torch.set_num_threads(1)
    start = time.perf_counter()
    for seed in range(args.trials):
        config = make_config("bomrl", {"env": "frozenlake-hole", "seed": seed, **overrides})
        train("bomrl", config, work / "sequential" / f"s{seed}", progress=False)
    sequential = time.perf_counter() - start

    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    ray_start = time.perf_counter() - start
    ray.shutdown()

    spec = {"name": "bench", "seeds": list(range(args.trials)), "resources": {"num_cpus": 1},
            "group": [{"algorithm": "bomrl", "env": "frozenlake-hole", "overrides": overrides}]}
    start = time.perf_counter()
    run_sweep(spec, work / "ray")
    ray_wall = time.perf_counter() - start

    parallel = min(os.cpu_count() or 1, args.trials)
    overhead = (ray_wall - ray_start - sequential / parallel) / (args.trials / parallel)
    print(f"{args.trials} BO-MRL runs of {args.iterations} iterations, {os.cpu_count()} cores")
    print("| | wall s |")
    print("|---|---:|")
    print(f"| one after another | {sequential:.1f} |")
    print(f"| Ray sweep (local, 1 CPU a trial) | {ray_wall:.1f} |")
    print(f"| of which starting Ray | {ray_start:.1f} |")
    print(f"| speed-up | {sequential / ray_wall:.2f}x |")
    print(f"| Ray overhead per trial, estimated | {overhead:.2f} |")
    print(f"command: .venv/bin/python benchmarks/sweep_overhead.py --trials {args.trials} "
          f"--iterations {args.iterations}")


if __name__ == "__main__":
    main()
