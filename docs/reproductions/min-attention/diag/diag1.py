# ruff: noqa: E402, E501, E702
"""Diagnostics: reward match, model fit, imagined return pre/post adaptation across meta-steps."""
import sys
import time

import torch

torch.set_num_threads(1)
from bilevel.algorithms.mbmpo import MBMPO, MBMPOConfig, collect_real
from bilevel.envs.rewards import half_cheetah_reward

inner_lr = float(sys.argv[1]) if len(sys.argv) > 1 else 0.001
init_log_std = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
c = MBMPOConfig(env="halfcheetah", seed=0, device="cpu", initial_random_steps=4000, imagined_trajectories=20,
                imagined_horizon=100, meta_steps=1, inner_lr=inner_lr, init_log_std=init_log_std,
                model_max_epochs=30, threads=1)
L = MBMPO(c, torch.device("cpu"))
t = time.time()
rb = L._random_episodes(); L._add_real(rb); print("random return", float(rb.episode_returns.mean()), "steps", int(rb.valid.sum()))
# reward check on real transitions
d = L.data
r_hat = half_cheetah_reward(d["obs"], d["actions"], d["next_obs"])
err = r_hat - d["rewards"]
print(f"reward check: rmse {err.pow(2).mean().sqrt():.4f} mean err {err.mean():.4f} real mean {d['rewards'].mean():.4f}")
m = L.fit_models(); print("fit", m, f"{time.time()-t:.0f}s")
# fresh test episodes with a different policy (random normal std 0.5)
gen = torch.Generator().manual_seed(5)
test = collect_real("halfcheetah", 200, lambda o: (torch.randn(o.shape[0], 6, generator=gen) * 0.5, None), 4, 123).episodes
obs, act, nxt = test.obs, test.actions, test.next_obs  # [T,B,D]
with torch.no_grad():
    mean, _ = L.ensemble.forward(obs.reshape(-1, 17), act.reshape(-1, 6), L.ensemble.elite_idx)
    pred = obs.reshape(-1, 17) + mean[..., :17]
    e1 = (pred - nxt.reshape(-1, 17)).pow(2).mean(-1).mean(-1)
    var = nxt.reshape(-1, 17).var(0).mean()
    print("one-step mse per elite (raw units)", e1.numpy().round(4), "next_obs var", float(var))
    vel_err = (pred[..., 8] - nxt.reshape(-1, 17)[..., 8]).pow(2).mean(-1).sqrt()
    print("one-step vel rmse", vel_err.numpy().round(3), "vel std", float(nxt[..., 8].std()))
    # open-loop multi-step with recorded actions, deterministic mean of elite 0..M
    M = L.ensemble.num_elites
    s = obs[0].expand(M, -1, -1).clone()
    for k in range(50):
        p = L.ensemble.predict_members(s, act[k].expand(M, -1, -1), deterministic=True)
        s = p.next_obs
        if k + 1 in (1, 5, 10, 20, 50):
            e = (s - nxt[k]).pow(2).mean(-1).mean(-1)
            ve = (s[..., 8] - nxt[k][..., 8]).abs().mean(-1)
            print(f"open-loop {k+1} steps mse {e.numpy().round(3)} |vel err| {ve.numpy().round(2)}")
    # imagined return of the same action sequences vs real
    s = obs[0].expand(M, -1, -1).clone(); R = torch.zeros(M, obs.shape[1])
    for k in range(200):
        p = L.ensemble.predict_members(s, act[k].expand(M, -1, -1), deterministic=True)
        R += half_cheetah_reward(s, act[k], p.next_obs); s = p.next_obs
    print("open-loop 200-step return imagined", R.mean(-1).numpy().round(1), "real", test.rewards.sum(0).numpy().round(1))

def imagined_return(params, per_model, g):
    starts = L._start_states(g)
    from bilevel.algorithms.mbmpo import imagine_models
    im = imagine_models(L.ensemble, L.policy, params, starts, 200, half_cheetah_reward, None, L.obs_mean, L.obs_std, g, per_model=per_model, action_bounds=L.action_bounds)
    return float(im.rewards.sum(0).mean()), float((im.actions.clamp(-1,1)**2).sum(-1).mean()*0.1)

g = torch.Generator().manual_seed(1)
for step in range(int(sys.argv[3]) if len(sys.argv) > 3 else 10):
    t = time.time()
    pre, adapted = L.adapted_for_models(g)
    rpre, cpre = imagined_return(L.meta_params, False, g)
    rpost, _ = imagined_return(adapted, True, g)
    row = L.meta_step(g)
    print(f"meta {step}: imag pre {rpre:.1f} (ctrl/step {cpre:.3f}) post-adapt {rpost:.1f} | trpo impr {row['trpo_improvement']:.4f} kl {row['trpo_kl']:.4f} acc {row['trpo_accepted']} bt {row['trpo_backtracks']} logstd {float(L.meta_params['log_std'].mean()):.3f} {time.time()-t:.0f}s", flush=True)
