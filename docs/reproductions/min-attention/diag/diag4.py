# ruff: noqa: E402, E501, B023
"""Imagined rollouts of a run's meta-policy: sampled vs mean model steps, with and without a state box."""
import sys

import torch

torch.set_num_threads(1)
from bilevel.algorithms.mbmpo import collect_real, normalise, policy_distribution
from bilevel.envs.rewards import half_cheetah_reward
from bilevel.rl import imagine
from bilevel.runs.loop import load_learner

_, L = load_learner(sys.argv[1], device="cpu")
H = 200
gen = torch.Generator().manual_seed(0)
real = collect_real(L.config.env, H, L.policy_fn(L.meta_params, gen), 5, 999).episodes
print(f"iter {L.iteration}: real return {float(real.episode_returns.mean()):.1f} mean vel {float(real.obs[..., 8].mean()):.3f}")
M = L.config.num_elites
starts = L.data["start_obs"][torch.randint(len(L.data["start_obs"]), (20,), generator=gen)].expand(M, -1, -1)
lo, hi = L.data["obs"].min(0).values, L.data["obs"].max(0).values
def pol(obs):
    return policy_distribution(L.policy, L.meta_params, normalise(obs, L.obs_mean, L.obs_std))
def rew(o, a, n):
    return half_cheetah_reward(o, a.clamp(-1, 1), n)
for det in (False, True):
    for margin in (None, 0.1, 0.5):
        def dyn(obs, act, *, generator):
            p = L.ensemble.predict_members(obs, act.clamp(-1, 1), generator=generator, deterministic=det)
            if margin is None:
                return p
            span = hi - lo
            return p._replace(next_obs=torch.maximum(torch.minimum(p.next_obs, hi + margin * span), lo - margin * span))
        with torch.no_grad():
            im = imagine(dyn, pol, starts, H, rew, generator=torch.Generator().manual_seed(1))
        R = im.rewards.sum(0)
        print(f"deterministic={det} margin={margin}: imagined return per elite mean {R.mean(-1).numpy().round(1)} max {R.max(-1).values.numpy().round(0)} max|obs| {float(im.obs.abs().max()):.1f}")
