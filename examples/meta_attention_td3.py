"""Meta attention over TD3: TD3 against TD3-MATT-DT on one Gymnasium Box env.

Trains both learners with the same seed and budget, printing after every iteration the
deterministic evaluation return, MATT's meta loss (eq. 10), and the analysis of section 4.3:
the mean ``Q1(s, attention action) - Q1(s, vanilla action)`` over the evaluation states and the
fraction of states where dance twice executes the attention action.

    python examples/meta_attention_td3.py [--env Pendulum-v1] [--iterations 20] [--seed 0]

The same runs from the command line, with checkpoints and metrics files:

    bilevel train td3-matt-dt --env Pendulum-v1 --iterations 20 --learning-starts 1000 --batch-size 128 \\
        --actor-lr 1e-3 --critic-lr 1e-3
"""

from __future__ import annotations

import argparse
import time

import torch

from bilevel.runs import get_algorithm, make_config, seed_everything


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--iterations", type=int, default=20, help="iterations of 1000 env steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)

    for algorithm in ("td3", "td3-matt-dt"):
        config = make_config(algorithm, {"env": args.env, "seed": args.seed, "iterations": args.iterations,
                                         "learning_starts": 1000, "batch_size": 128, "actor_lr": 1e-3,
                                         "critic_lr": 1e-3, "eval_episodes": 10, "device": "cpu"})
        seed_everything(args.seed)
        learner = get_algorithm(algorithm)(config, torch.device("cpu"))
        start = time.perf_counter()
        print(f"== {algorithm} on {args.env}, seed {args.seed}")
        while learner.iteration < config.iterations:
            row = learner.step()
            learner.iteration += 1
            analysis = ""
            if "q_attention_minus_vanilla" in row:
                meta_loss = f"{row['meta_loss']:+.2e}" if "meta_loss" in row else "(no update yet)"
                analysis = (f"  meta loss {meta_loss}  Q(att) - Q(van) {row['q_attention_minus_vanilla']:+.3f}"
                            f"  attention preferred {row['attention_preferred']:.0%}")
            print(f"{learner.env_steps:>7} steps  return {row['return']:8.1f}{analysis}"
                  f"  ({time.perf_counter() - start:.0f} s)")
        learner.close()


if __name__ == "__main__":
    main()
