"""Quickstart: BO-MRL on Frozen Lake ("hole" family).

Meta-trains a softmax meta-policy with BO-MRL (exact task statistics, D1 = KL(pi_phi || pi)),
then meta-tests it on the held-out maps: 4 rounds of (collect 500 episodes with the current
policy in the Gymnasium env, adapt), against policy-gradient adaptation from the meta-policy
and from the uniform policy, and the per-map optimum. Prints the table of mean discounted
returns and saves the plot.

    python examples/bomrl_frozen_lake.py [--iterations 150] [--distance D1] [--out bomrl_frozen_lake.png]
"""

from __future__ import annotations

import argparse
import time

import torch

from bilevel.algorithms.bomrl import BOMRLLearner
from bilevel.runs.loop import make_config, seed_everything

METHODS = {"bomrl": "BO-MRL", "pg_meta": "PG from meta-policy", "pg_uniform": "PG from uniform"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=150)
    parser.add_argument("--distance", default="D1", choices=["D1", "D2", "D3"])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--episodes", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bomrl_frozen_lake.png")
    args = parser.parse_args()

    seed_everything(args.seed)
    config = make_config("bomrl", {"env": "frozenlake-hole", "iterations": args.iterations, "seed": args.seed,
                                   "distance": args.distance, "exact": True, "episodes": args.episodes,
                                   "device": "cpu"})
    learner = BOMRLLearner(config, torch.device("cpu"))
    start = time.perf_counter()
    while learner.iteration < config.iterations:
        metrics = learner.step()
        learner.iteration += 1
        if learner.iteration % 25 == 0 or learner.iteration == config.iterations:
            print(f"iteration {learner.iteration:4d}  return {metrics['return']:.3f}  "
                  f"adapted {metrics['adapted_return']:.3f}  ({time.perf_counter() - start:.0f} s)")

    result = learner.evaluate(rounds=args.rounds, split="test", exact=False)
    print(f"\nHeld-out maps, mean discounted return after k rounds ({args.episodes} episodes per round), "
          f"optimum {result['optimum']:.3f}")
    print(f"{'method':<22}" + "".join(f"{'k=' + str(k):>16}" for k in range(args.rounds + 1)))
    for key, name in METHODS.items():
        cells = "".join(f"{result[f'{key}_{k}']:>9.3f} ± {result[f'{key}_se_{k}']:.3f}" for k in range(args.rounds + 1))
        print(f"{name:<22}{cells}")
    print(f"total {time.perf_counter() - start:.0f} s")
    plot(result, args.rounds, args.out)


def plot(result: dict[str, float], rounds: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 3.5))
    ks = list(range(rounds + 1))
    for key, name in METHODS.items():
        means = [result[f"{key}_{k}"] for k in ks]
        errors = [result[f"{key}_se_{k}"] for k in ks]
        axes.errorbar(ks, means, yerr=errors, marker="o", capsize=3, label=name)
    axes.axhline(result["optimum"], color="black", linestyle="--", label="optimum")
    axes.set(xlabel="adaptation rounds", ylabel="mean discounted return", title="Frozen Lake (hole), held-out maps")
    axes.set_xticks(ks)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
