"""Write your own meta-RL method from the core: Meta-SGD with a TRPO outer step.

The method, on 2-D navigation (reach a goal g ~ U[-0.5, 0.5]^2 from the origin in 100 steps):

    inner:  theta'_i = theta - alpha (.) grad_theta L_REINFORCE(theta; D_i)       (Li et al. 2017, eq. 1)
    outer:  maximise  E_i [ surrogate(theta'_i; D'_i) ]  over (theta, log alpha)  by a TRPO step

where D_i are episodes of the meta-policy on task i and D'_i episodes of the adapted
policy. Besides the policy, the per-parameter inner learning rates alpha are meta-learned.
The bilevel part is two calls: `unroll` (the inner step, batched over tasks with `vmap`) and
`trpo_step` (the outer step). Episodes, advantages and the losses come from the substrate:
`sample_navigation` steps every task's episodes as one torch batch, `task_data` computes
per-task advantages (GAE over a linear baseline, standardised), and `bilevel.rl` has the
REINFORCE and importance-weighted surrogates.

Run: .venv/bin/python examples/custom_method.py [--iterations 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import vmap

from bilevel import tree, trpo_step, unroll
from bilevel.inner import meta_sgd
from bilevel.nets import GaussianMLPPolicy, gaussian_kl
from bilevel.rl import importance_weighted_loss, masked_mean, reinforce_loss
from bilevel.rl.meta_batches import action_distribution, behaviour_of, sample_navigation, task_data

HORIZON, EPISODES, GAMMA, GAE_LAMBDA = 100, 20, 0.99, 1.0
policy = GaussianMLPPolicy(obs_dim=2, act_dim=2, hidden=(64, 64))


def dist(params, obs):
    return action_distribution(policy, params, obs)


def rollout(params, goals, generator, per_task):
    """``EPISODES`` episodes of ``params`` (one tree, or one per task when ``per_task``) on every goal
    ``[N, 2]``: the episodes ``[N, T, B, ...]`` and their `TaskData` with advantages."""
    episodes = sample_navigation(policy, params, goals, EPISODES, HORIZON, generator, per_task=per_task)
    return episodes, task_data(episodes, GAMMA, GAE_LAMBDA)


def adapt(meta, batch):
    """One Meta-SGD step on one task's REINFORCE loss: ``theta - alpha (.) grad L``."""

    def reinforce(params):
        return reinforce_loss(dist(params, batch.obs).log_prob(batch.actions), batch.advantages, batch.valid)

    learning_rates = tree.map(torch.exp, meta["log_lr"])
    return unroll(reinforce, meta["policy"], meta_sgd(learning_rates), steps=1)


def task_terms(meta, train, valid, behaviour):
    """The importance-weighted surrogate loss and the KL to the collecting policy, per task."""
    new = dist(adapt(meta, train), valid.obs)
    loss = importance_weighted_loss(new.log_prob(valid.actions), behaviour.log_probs, valid.advantages, valid.valid)
    kl = masked_mean(gaussian_kl(behaviour.mean, behaviour.log_std, new.mean, new.log_std), valid.valid)
    return loss, kl


def meta_iteration(meta, goals, generator):
    train_episodes, train = rollout(meta["policy"], goals, generator, per_task=False)
    adapted = tree.detach(vmap(adapt, in_dims=(None, 0))(meta, train))
    valid_episodes, valid = rollout(adapted, goals, generator, per_task=True)
    behaviour = behaviour_of(policy, adapted, valid)

    def terms(m):
        return vmap(task_terms, in_dims=(None, 0, 0, 0))(m, train, valid, behaviour)

    new_meta, info = trpo_step(lambda m: terms(m)[0].mean(), lambda m: terms(m)[1].mean(), meta, max_kl=0.01)
    before, after = (float(e.episode_returns().mean()) for e in (train_episodes, valid_episodes))
    return new_meta, info, before, after


def adaptation_gain(meta, goals, generator):
    before_episodes, before = rollout(meta["policy"], goals, generator, per_task=False)
    adapted = vmap(adapt, in_dims=(None, 0))(meta, before)
    after_episodes, _ = rollout(adapted, goals, generator, per_task=True)
    return float(before_episodes.episode_returns().mean()), float(after_episodes.episode_returns().mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    initial = tree.params_of(GaussianMLPPolicy(2, 2, hidden=(64, 64)), detach=True)
    meta = {"policy": tree.detach(initial), "log_lr": tree.map(lambda p: torch.full_like(p, -2.3), initial)}
    test_goals = torch.rand(40, 2, generator=torch.Generator().manual_seed(10_000)) - 0.5

    start = time.perf_counter()
    for iteration in range(1, args.iterations + 1):
        goals = torch.rand(args.tasks, 2, generator=generator) - 0.5
        meta, info, pre, post = meta_iteration(meta, goals, generator)
        if iteration % 5 == 0 or iteration == 1:
            print(f"iter {iteration:3d}  return before adaptation {pre:7.2f}  after {post:7.2f}  "
                  f"KL {info.kl:.4f}  accepted {info.accepted}  ({time.perf_counter() - start:.0f} s)")

    eval_generator = torch.Generator().manual_seed(args.seed + 1)
    scratch = {"policy": tree.detach(initial), "log_lr": tree.map(lambda p: torch.full_like(p, -2.3), initial)}
    rows = {"meta-learned (theta, alpha)": adaptation_gain(meta, test_goals, eval_generator),
            "initial theta, alpha = 0.1": adaptation_gain(scratch, test_goals, eval_generator)}
    learned_lr = torch.exp(tree.ravel(meta["log_lr"])[0])
    print(f"\nheld-out goals (40), mean return over {EPISODES} episodes of {HORIZON} steps:")
    print(f"{'policy':<30} {'before':>8} {'after 1 step':>13}")
    for name, (before, after) in rows.items():
        print(f"{name:<30} {before:8.2f} {after:13.2f}")
    print(f"learned inner learning rates: median {learned_lr.median():.3f}, "
          f"range [{learned_lr.min():.3f}, {learned_lr.max():.3f}] (started at 0.100)")


if __name__ == "__main__":
    main()
