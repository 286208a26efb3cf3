# ruff: noqa: E402, E501, B023
"""Inner step size: KL(meta || adapted) and the imagined-return change of one inner step, with common random numbers."""
import sys

import torch

torch.set_num_threads(1)
from bilevel import tree
from bilevel.algorithms.mbmpo import (
    REWARD_FNS,
    adapt_models,
    imagine_models,
    model_data,
    policy_distribution,
)
from bilevel.nets import gaussian_kl
from bilevel.runs.loop import load_learner

_, L = load_learner(sys.argv[1], device="cpu")
c = L.config
M, N, H = c.num_elites, 20, 200
lo, hi = L.data["obs"].min(0).values, L.data["obs"].max(0).values
box = (lo - 0.5 * (hi - lo), hi + 0.5 * (hi - lo))
def run(params, per_model, seed):
    g = torch.Generator().manual_seed(seed)
    starts = L.data["start_obs"][torch.randint(len(L.data["start_obs"]), (N,), generator=g)].expand(M, -1, -1)
    return imagine_models(L.ensemble, L.policy, params, starts, H, REWARD_FNS[c.env], None, L.obs_mean, L.obs_std, g,
                          per_model=per_model, action_bounds=L.action_bounds, state_bounds=box, model_noise=False)
pre_im = run(L.meta_params, False, 1)
pre = model_data(pre_im, L.obs_mean, L.obs_std, c.gamma, c.gae_lambda)
base = [run(L.meta_params, False, s).rewards.sum(0).mean(-1) for s in (2, 3)]
print("meta-policy imagined return per model", torch.stack(base).mean(0).numpy().round(1))
for lr in map(float, sys.argv[2:]):
    inner = L.inner_loop()._replace(lr=lr)
    adapted = tree.detach(adapt_models(L.meta_params, pre, inner))
    with torch.no_grad():
        d0 = policy_distribution(L.policy, L.meta_params, pre.obs)
        kls = []
        for m in range(M):
            dm = policy_distribution(L.policy, tree.map(lambda x: x[m], adapted), pre.obs[m])
            kls.append(float(gaussian_kl(d0.mean[m], d0.log_std, dm.mean, dm.log_std).mean()))
    post = torch.stack([run(adapted, True, s).rewards.sum(0).mean(-1) for s in (2, 3)]).mean(0)
    print(f"inner_lr {lr}: KL(meta||adapted) per model {[round(k, 5) for k in kls]} imagined return change per model {(post - torch.stack(base).mean(0)).numpy().round(1)}", flush=True)
