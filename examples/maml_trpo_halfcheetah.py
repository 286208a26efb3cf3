"""MAML-TRPO on HalfCheetah velocity (Finn et al. 2017, Sec. 5.3): meta-train, then adapt to held-out velocities.

Each task asks the cheetah to run at a target velocity v* ~ U[0, 2] with reward
-|v - v*| - 0.05 ||a||^2 over 200 steps. The defaults are a smoke-sized budget (minutes on
two CPU cores); pytorch-maml-rl's budget is

    --iterations 500 --meta-batch-size 40 --episodes-per-task 20 --horizon 200

(3.2 million environment steps per 10 iterations, the training and the validation batches
both counted). The run folder holds the config, the
metrics (CSV, TensorBoard), the checkpoint and ``eval.json``; ``--resume`` continues it.

Run: .venv/bin/python examples/maml_trpo_halfcheetah.py [--iterations 5] [--run-dir runs/maml-trpo-cheetah]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from bilevel.runs import evaluate_run, make_config, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--meta-batch-size", type=int, default=8)
    parser.add_argument("--episodes-per-task", type=int, default=5)
    parser.add_argument("--horizon", type=int, default=200)
    parser.add_argument("--eval-tasks", type=int, default=8)
    parser.add_argument("--asynchronous", action="store_true", help="step each task's envs in worker processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/maml-trpo-halfcheetah-vel"))
    parser.add_argument("--resume", action="store_true", help="continue the run in --run-dir")
    args = parser.parse_args()

    config = make_config("maml-trpo", {
        "env": "halfcheetah-vel", "iterations": args.iterations, "meta_batch_size": args.meta_batch_size,
        "episodes_per_task": args.episodes_per_task, "horizon": args.horizon, "asynchronous": args.asynchronous,
        "seed": args.seed, "device": args.device, "checkpoint_every": 5,
    })
    learner = train("maml-trpo", config, args.run_dir, resume=args.resume, overwrite=not args.resume)
    print(f"{learner.iteration} meta-iterations, {learner.env_steps} environment steps")

    result = evaluate_run(args.run_dir, {"tasks": args.eval_tasks, "episodes": args.episodes_per_task})
    print(f"held-out velocities ({args.eval_tasks} tasks), mean return over {args.horizon} steps:")
    print(f"{'':<16} {'before':>9} {'after 1 step':>13}")
    for mode in ("stochastic", "deterministic"):
        print(f"{mode:<16} {result[f'return_before_{mode}']:9.1f} {result[f'return_after_{mode}']:13.1f}")


if __name__ == "__main__":
    main()
