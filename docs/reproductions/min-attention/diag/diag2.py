# ruff: noqa: E402, E501
"""Imagined vs real for a trained run: closed-loop return/velocity in the models vs the real env."""
import sys

import torch

torch.set_num_threads(1)
from bilevel.algorithms.mbmpo import REWARD_FNS, collect_real, imagine_models
from bilevel.runs.loop import load_learner

_, L = load_learner(sys.argv[1], device="cpu")
H = int(sys.argv[2]) if len(sys.argv) > 2 else 200
gen = torch.Generator().manual_seed(0)
real = collect_real(L.config.env, H, L.policy_fn(L.meta_params, gen), 5, 999).episodes
print(f"iter {L.iteration} steps {L.env_steps}: real return {float(real.episode_returns.mean()):.1f} mean vel {float(real.obs[..., 8].mean()):.3f} ctrl/step {float(0.1*real.actions.clamp(-1,1).pow(2).sum(-1).mean()):.3f}")
starts = real.obs[0].expand(L.config.num_elites, -1, -1)
im = imagine_models(L.ensemble, L.policy, L.meta_params, starts, H, REWARD_FNS[L.config.env], None, L.obs_mean, L.obs_std,
                    gen, per_model=False, action_bounds=L.action_bounds)
print(f"imagined return per elite {im.rewards.sum(0).mean(-1).numpy().round(1)} mean vel {im.obs[..., 8].mean((0,2)).numpy().round(3)}")
# one-step error of the models on the real on-policy transitions
with torch.no_grad():
    o, a, n = real.obs.reshape(-1, 17), real.actions.clamp(-1, 1).reshape(-1, 6), real.next_obs.reshape(-1, 17)
    mean, _ = L.ensemble.forward(o, a, L.ensemble.elite_idx)
    pred = o + mean[..., :17]
    print("on-policy one-step mse", (pred - n).pow(2).mean((-1, -2)).numpy().round(3), "vel rmse", (pred[..., 8] - n[:, 8]).pow(2).mean(-1).sqrt().numpy().round(3))
    # open-loop with real actions from real starts
    M = L.config.num_elites
    s = real.obs[0].expand(M, -1, -1).clone()
    for k in range(H):
        s = L.ensemble.predict_members(s, real.actions[k].clamp(-1, 1).expand(M, -1, -1), deterministic=True).next_obs
        if k + 1 in (5, 20, 50, 100, 200):
            print(f"open-loop {k+1}: |vel err| {(s[..., 8] - real.next_obs[k][:, 8]).abs().mean(-1).numpy().round(2)} rmse all {(s - real.next_obs[k]).pow(2).mean((-1,-2)).sqrt().numpy().round(2)}")
