"""Write your own meta-RL method from the core: Meta-SGD with a TRPO outer step.

The method, on 2-D navigation (reach a goal g ~ U[-0.5, 0.5]^2 from the origin in 100 steps):

    inner:  theta'_i = theta - alpha (.) grad_theta L_REINFORCE(theta; D_i)       (Li et al. 2017, eq. 1)
    outer:  maximise  E_i [ surrogate(theta'_i; D'_i) ]  over (theta, log alpha)  by a TRPO step

where D_i are episodes of the meta-policy on task i and D'_i episodes of the adapted
policy. Besides the policy, the per-parameter inner learning rates alpha are meta-learned.
It is four calls into bilevel: `unroll` (the inner step, batched over tasks with `vmap`),
`trpo_step` (the outer step), and the substrate's batched navigation env and returns.

Run: .venv/bin/python examples/custom_method.py [--iterations 20] [--seed 0]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.func import functional_call, vmap

from bilevel import tree, trpo_step, unroll
from bilevel.envs.navigation import BatchedNavigation2D
from bilevel.inner import meta_sgd
from bilevel.nets import GaussianMLPPolicy
from bilevel.nets.distributions import DiagGaussian
from bilevel.rl import discounted_returns, fit_linear_baseline, linear_baseline_values, standardize

HORIZON, EPISODES, GAMMA = 100, 20, 0.99
policy = GaussianMLPPolicy(obs_dim=2, act_dim=2, hidden=(64, 64))


def dist(params, obs):
    return functional_call(policy, params, (obs,))


def rollout(params, goals, generator, batched_params):
    """Episodes of ``params`` (one tree, or one per task when ``batched_params``) on every
    goal: a dict of ``[tasks, H, E, ...]`` tensors."""
    env = BatchedNavigation2D(num_envs_per_task=EPISODES, horizon=HORIZON)
    obs = env.reset(goals)
    mean_and_std = vmap(lambda p, o: (dist(p, o).mean, dist(p, o).stddev), in_dims=(0 if batched_params else None, 0))
    steps = {"obs": [], "actions": [], "rewards": []}
    with torch.no_grad():
        for _ in range(HORIZON):
            mean, std = mean_and_std(params, obs)
            actions = mean + std * torch.randn(mean.shape, generator=generator)
            next_obs, rewards, _, _ = env.step(actions)
            for key, value in zip(steps, (obs, actions, rewards), strict=True):
                steps[key].append(value)
            obs = next_obs
    batch = {k: torch.stack(v, dim=1) for k, v in steps.items()}
    time_index = torch.arange(HORIZON, dtype=torch.float32)[None, :, None].expand_as(batch["rewards"])
    no_flags = torch.zeros_like(batch["rewards"], dtype=torch.bool)
    returns = vmap(discounted_returns, in_dims=(0, 0, 0, 0, None))(
        batch["rewards"], no_flags, no_flags, torch.zeros_like(batch["rewards"]), GAMMA)
    weights = vmap(fit_linear_baseline)(batch["obs"], returns, time_index)
    values = vmap(linear_baseline_values)(weights, batch["obs"], time_index)
    batch["advantages"] = vmap(standardize)(returns - values)
    batch["mean_return"] = batch["rewards"].sum(1).mean()
    return batch


def adapt(meta, batch):
    """One Meta-SGD step on one task's REINFORCE loss: ``theta - alpha (.) grad L``."""

    def reinforce(params):
        return -(dist(params, batch["obs"]).log_prob(batch["actions"]) * batch["advantages"]).mean()

    learning_rates = tree.map(torch.exp, meta["log_lr"])
    return unroll(reinforce, meta["policy"], meta_sgd(learning_rates), steps=1)


def task_terms(meta, train, valid, old_dist_params):
    """The importance-weighted surrogate loss and the KL to the collecting policy, per task."""
    new = dist(adapt(meta, train), valid["obs"])
    old = DiagGaussian(*old_dist_params)
    ratio = torch.exp(new.log_prob(valid["actions"]) - old.log_prob(valid["actions"]))
    kl = torch.distributions.kl_divergence(old, new).mean()
    return -(ratio * valid["advantages"]).mean(), kl


def meta_iteration(meta, goals, generator):
    train = rollout(meta["policy"], goals, generator, batched_params=False)
    per_task = {k: v for k, v in train.items() if k != "mean_return"}
    adapted = vmap(adapt, in_dims=(None, 0))(meta, per_task)
    valid = rollout(adapted, goals, generator, batched_params=True)
    valid_per_task = {k: v for k, v in valid.items() if k != "mean_return"}
    with torch.no_grad():
        old_dist_params = vmap(lambda p, o: (dist(p, o).mean, dist(p, o).log_std))(adapted, valid_per_task["obs"])

    def terms(m):
        return vmap(task_terms, in_dims=(None, 0, 0, 0))(m, per_task, valid_per_task, old_dist_params)

    new_meta, info = trpo_step(lambda m: terms(m)[0].mean(), lambda m: terms(m)[1].mean(), meta, max_kl=0.01)
    return new_meta, info, float(train["mean_return"]), float(valid["mean_return"])


def adaptation_gain(meta, goals, generator):
    before = rollout(meta["policy"], goals, generator, batched_params=False)
    adapted = vmap(adapt, in_dims=(None, 0))(meta, {k: v for k, v in before.items() if k != "mean_return"})
    after = rollout(adapted, goals, generator, batched_params=True)
    return float(before["mean_return"]), float(after["mean_return"])


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
