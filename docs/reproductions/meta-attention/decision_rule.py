"""Does dance twice matter at evaluation? Evaluates each MATT run's last evaluation state (a run folder or an
archived record) twice on the same episodes, once choosing by Q between the vanilla and the attention action
(dance twice) and once with the vanilla action only, and prints the mean and standard deviation over episodes.

    python docs/reproductions/meta-attention/decision_rule.py docs/reproductions/records/matt-bipedal/td3-matt-dt-s? \
        [--episodes 20] [--seed 12345]
"""

import argparse
import dataclasses

import torch

from bilevel.runs.loop import load_learner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--episodes", type=int, default=20)
    parser.add_argument("--seed", type=int, default=12345)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"| run | env steps | dance twice ({args.episodes} episodes) | vanilla action only |")
    print("|---|---|---|---|")
    for run in args.runs:
        _, learner = load_learner(run, "cpu", evaluation_only=True)
        if not hasattr(learner.config, "dance_twice"):
            raise ValueError(f"{run!r} is not a MATT run: its learner has no dance_twice option")
        cells = []
        try:
            for dance_twice in (True, False):
                learner.config = dataclasses.replace(learner.config, dance_twice=dance_twice)
                result = learner.evaluate(episodes=args.episodes, seed=args.seed)
                cells.append(f"{result['return']:.1f} ± {result['return_std']:.1f}")
        finally:
            learner.close()
        print(f"| {run} | {learner.env_steps} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
