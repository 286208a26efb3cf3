"""Is an off-policy actor saturated? For each run folder with a checkpoint (not an archived record: the
replay buffer is needed), on 2000 states drawn from its replay buffer (generator seed 0): the fraction of
action components with |a| > 0.999, the standard deviation over states of each action component, and the
mean norm of the actor features (the last hidden layer, the input of the tanh head).

    python docs/reproductions/meta-attention/saturation.py runs/matt-bipedal/td3-mc-s? runs/matt-bipedal/td3-s?
"""

import sys

import torch

from bilevel.runs.loop import load_learner


def main(run_dirs: list[str]) -> None:
    torch.set_num_threads(1)
    print("| run | env steps | share of components at +-1 | std over states per component | mean feature norm |")
    print("|---|---|---|---|---|")
    for run in run_dirs:
        _, learner = load_learner(run, "cpu")
        try:
            obs = learner.buffer.sample(2000, generator=torch.Generator().manual_seed(0)).obs
            params = learner.actor_params()
            with torch.no_grad():
                actions = learner.mean_action(learner.actor_output(params, obs))
                features = learner.actor_features(params, obs)
        finally:
            learner.close()
        spread = " / ".join(f"{s:.2f}" for s in actions.std(0).tolist())
        print(f"| {run} | {learner.env_steps} | {(actions.abs() > 0.999).float().mean():.3f} | {spread} "
              f"| {features.norm(dim=-1).mean():.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
