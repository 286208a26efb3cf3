# ruff: noqa: E402, E501
"""Model fit budget: holdout MSE and on-policy one-step error against max epochs."""
import sys
import time

import torch

torch.set_num_threads(1)
from bilevel.algorithms.mbmpo import collect_real
from bilevel.nets import ProbabilisticEnsemble
from bilevel.runs.loop import load_learner

_, L = load_learner(sys.argv[1], device="cpu")
gen = torch.Generator().manual_seed(0)
real = collect_real(L.config.env, 200, L.policy_fn(L.meta_params, gen), 5, 999).episodes
o, a, n = real.obs.reshape(-1, 17), real.actions.clamp(-1, 1).reshape(-1, 6), real.next_obs.reshape(-1, 17)
d = L.data
for epochs in map(int, sys.argv[2:]):
    torch.manual_seed(0)
    ens = ProbabilisticEnsemble(17, 6, 7, 5, hidden=(200,) * 4, predict_reward=False)
    t = time.time()
    res = ens.fit(d["obs"], d["actions"], d["next_obs"], d["rewards"], max_epochs=epochs, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        mean, _ = ens.forward(o, a, ens.elite_idx)
        pred = o + mean[..., :17]
    print(f"max_epochs {epochs}: ran {res.epochs} holdout {float(res.holdout_score[res.elite_idx].mean()):.4f} on-policy mse {float((pred-n).pow(2).mean()):.3f} vel rmse {float((pred[...,8]-n[:,8]).pow(2).mean().sqrt()):.3f} {time.time()-t:.0f}s", flush=True)
