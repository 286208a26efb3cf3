"""Substrate throughput: collection against raw MuJoCo, imagined rollouts, ensemble training.

1. Collection: `bilevel.rl.collect` on a `SyncVectorEnv` of HalfCheetah-v5 and on a
   `BatchedHalfCheetah` (1, 16, 64 envs) with a Gaussian MLP policy, against raw
   `mujoco.mj_step` on the same model (frame_skip calls per env step). The ratio says how
   close collection comes to the simulator's limit. Both are timed in CPU time of this
   process (`time.process_time`, one thread), so other load on the machine does not skew them.
2. Imagination: `bilevel.rl.imagine` with a 7-member (5 elites) 4 x 200 ensemble from
   10,000 start states: imagined transitions per second.
3. Ensemble training: samples per second of one batched gradient step on all 7 members
   against a Python loop over 7 separate MLPs of the same size.

Run: ``.venv/bin/python benchmarks/substrate_throughput.py [--steps 4000] [--envs 1 16] [--device cpu]``
"""

from __future__ import annotations

import argparse
import time

import gymnasium as gym
import mujoco
import torch
from torch import nn

from bilevel.envs.batched_mujoco import BatchedHalfCheetah
from bilevel.nets import GaussianMLPPolicy, ProbabilisticEnsemble
from bilevel.nets.common import mlp
from bilevel.nets.ensemble import gaussian_nll
from bilevel.rl import collect, imagine, make_vector_env


def collection_rate(steps: int, num_envs: int, batched: bool = False) -> float:
    """Env steps per second that `collect` gathers from ``num_envs`` HalfCheetahs in one process
    on one core (torch limited to one thread for the duration): a `SyncVectorEnv` of
    Gymnasium envs, or with ``batched`` one `BatchedHalfCheetah` stepped by ``mujoco.rollout``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if batched:
        envs = BatchedHalfCheetah(num_envs)
    else:
        envs = make_vector_env(lambda: gym.make("HalfCheetah-v5"), num_envs)
    policy = GaussianMLPPolicy(17, 6)
    generator = torch.Generator().manual_seed(0)

    def policy_fn(obs):
        dist = policy(obs)
        actions = dist.sample(generator=generator)
        return actions, dist.log_prob(actions)

    collect(envs, policy_fn, 100, seed=0)
    start = time.process_time()
    collect(envs, policy_fn, max(steps // num_envs, 1), seed=0)
    rate = max(steps // num_envs, 1) * num_envs / (time.process_time() - start)
    envs.close()
    torch.set_num_threads(threads)
    return rate


def raw_simulator_rate(steps: int) -> float:
    """Env steps per second of bare ``mujoco.mj_step`` (``frame_skip`` calls an env step)."""
    env = gym.make("HalfCheetah-v5").unwrapped
    model, data, frame_skip = env.model, env.data, env.frame_skip
    mujoco.mj_resetData(model, data)
    start = time.process_time()
    for _ in range(steps):
        data.ctrl[:] = 0.1
        for _ in range(frame_skip):
            mujoco.mj_step(model, data)
    return steps / (time.process_time() - start)


def imagined_per_second(device: torch.device, starts: int = 10_000, horizon: int = 10) -> float:
    ensemble = ProbabilisticEnsemble(17, 6).to(device)
    policy = GaussianMLPPolicy(17, 6).to(device)
    generator = torch.Generator(device=device).manual_seed(0)
    start_states = torch.randn(ensemble.num_elites, starts, 17, device=device)

    def reward_fn(obs, act, next_obs):
        return next_obs[..., 8] - 0.1 * (act**2).sum(-1)

    with torch.no_grad():
        imagine(ensemble.predict_members, policy, start_states, 2, reward_fn, generator=generator)
        _sync(device)
        begin = time.perf_counter()
        imagine(ensemble.predict_members, policy, start_states, horizon, reward_fn, generator=generator)
        _sync(device)
    return horizon * ensemble.num_elites * starts / (time.perf_counter() - begin)


def training_samples_per_second(device: torch.device, batch: int = 256, repeats: int = 30) -> tuple[float, float]:
    """(batched ensemble, loop over separate members) training samples per second."""
    ensemble = ProbabilisticEnsemble(17, 6).to(device)
    x = torch.randn(ensemble.ensemble_size, batch, 23, device=device)
    y = torch.randn(ensemble.ensemble_size, batch, 18, device=device)
    optimiser = torch.optim.Adam(ensemble.parameters(), lr=1e-3)

    def batched_step():
        mean, logvar = ensemble.normalised_forward(x)
        loss = gaussian_nll(mean, logvar, y).sum()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    members = [mlp((23, 200, 200, 200, 200, 36), nn.SiLU).to(device) for _ in range(ensemble.ensemble_size)]
    member_optimisers = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in members]

    def loop_step():
        for i, (member, opt) in enumerate(zip(members, member_optimisers, strict=True)):
            mean, logvar = member(x[i]).chunk(2, dim=-1)
            loss = gaussian_nll(mean, logvar, y[i]).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()

    rates = []
    for step in (batched_step, loop_step):
        step()
        _sync(device)
        begin = time.perf_counter()
        for _ in range(repeats):
            step()
        _sync(device)
        rates.append(repeats * ensemble.ensemble_size * batch / (time.perf_counter() - begin))
    return rates[0], rates[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--envs", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    collected, collected_batched, raws = {}, {}, []
    for n in args.envs:
        raws.append(raw_simulator_rate(args.steps))
        collected[n] = collection_rate(args.steps, n)
        raws.append(raw_simulator_rate(args.steps))
        collected_batched[n] = collection_rate(args.steps, n, batched=True)
    raws.append(raw_simulator_rate(args.steps))
    raw = sorted(raws)[len(raws) // 2]
    imagined = imagined_per_second(device)
    batched, looped = training_samples_per_second(device)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {device}")
    print(f"raw mj_step rate measured between the collections: median {raw:,.0f}, "
          f"range {min(raws):,.0f}-{max(raws):,.0f}")
    print("| measurement | ours | reference | ratio |")
    print("|---|---:|---:|---:|")
    for num_envs, rate in collected.items():
        print(f"| HalfCheetah-v5 collection, env steps/s ({num_envs} envs) | {rate:,.0f} | raw mj_step {raw:,.0f} | "
              f"{rate / raw:.2f} |")
    for num_envs, rate in collected_batched.items():
        print(f"| HalfCheetah-v5 collection, env steps/s ({num_envs} envs, BatchedHalfCheetah) | {rate:,.0f} | "
              f"raw mj_step {raw:,.0f} | {rate / raw:.2f} |")
    print(f"| imagined transitions/s (5 elites x 10,000 starts, 4x200) | {imagined:,.0f} | | |")
    print(f"| ensemble training samples/s (7 members, batch 256) | batched {batched:,.0f} | loop {looped:,.0f} | "
          f"{batched / looped:.2f} |")
    print(f"command: .venv/bin/python benchmarks/substrate_throughput.py --steps {args.steps} "
          f"--envs {' '.join(map(str, args.envs))} --device {args.device}")


if __name__ == "__main__":
    main()
