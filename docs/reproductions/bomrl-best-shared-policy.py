"""The best return one tabular policy, shared by all of a Frozen Lake family's training maps, reaches:
the ceiling of any meta-policy before adaptation on the paper's protocol.

Maximises the mean exact discounted return over the maps, ``mean_i J_i(softmax(phi))``, by Adam on the
logits ``phi [16, 4]`` from zero logits and from ``--starts - 1`` random ones (the objective is not
concave, so the largest of the local maxima found is a lower bound on the ceiling, not a proof of it).

Run: .venv/bin/python docs/reproductions/bomrl-best-shared-policy.py frozenlake-nohole [--starts 4]
"""

from __future__ import annotations

import argparse

import torch

from bilevel.algorithms.bomrl import task_return
from bilevel.envs import make_family, stack_mdps


def best_shared_return(env: str, starts: int, steps: int = 3000, lr: float = 0.1) -> list[float]:
    """The mean return over ``env``'s training maps at the end of Adam from each start."""
    mdps = stack_mdps([task.mdp for task in make_family(env).train_tasks()])
    num_maps = mdps.transitions.shape[0]
    returns = []
    for start in range(starts):
        scale = 0.0 if start == 0 else 1.0
        generator = torch.Generator().manual_seed(start)
        logits = (scale * torch.randn(16, 4, generator=generator, dtype=torch.float64)).requires_grad_()
        optimizer = torch.optim.Adam([logits], lr=lr)
        for _ in range(steps):
            mean_return = task_return(mdps, logits.expand(num_maps, -1, -1)).mean()
            optimizer.zero_grad()
            (-mean_return).backward()
            optimizer.step()
        returns.append(float(task_return(mdps, logits.detach().expand(num_maps, -1, -1)).mean()))
    return returns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("env", choices=["frozenlake-hole", "frozenlake-nohole"])
    parser.add_argument("--starts", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    returns = best_shared_return(args.env, args.starts)
    print(f"{args.env}: mean return over the training maps from each start: "
          f"{', '.join(f'{r:.4f}' for r in returns)}; best {max(returns):.4f}")


if __name__ == "__main__":
    main()
