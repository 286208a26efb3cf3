"""Do Ray actors pay for themselves as collectors? HalfCheetah-v5 steps per second.

Three ways to collect the same number of transitions with the same Gaussian MLP policy:
- `SyncVectorEnv` of 16 envs in this process (`bilevel.rl.collect`);
- `AsyncVectorEnv` of 16 envs, one subprocess each (Gymnasium's multi-core default);
- `BatchedHalfCheetah` of 16 envs in this process (one `mujoco.rollout` call per step);
- `bilevel.rl.distributed.RayCollector`: Ray actors, one per core, each holding a vector env of
  16 / cores envs and a copy of the policy, collecting in parallel; the batches come back
  through Ray's object store.

On one machine the question is whether Ray's scheduling and serialisation cost less than
what a second core gains; across machines Ray is the only one of the three that scales, and
this measures its per-batch cost.

Run: ``.venv/bin/python benchmarks/parallel_collection.py [--steps 200]``
"""

from __future__ import annotations

import argparse
import functools
import os
import time

import gymnasium as gym
import torch

from bilevel.envs.batched_mujoco import BatchedHalfCheetah
from bilevel.nets import GaussianMLPPolicy
from bilevel.rl import collect, make_vector_env
from bilevel.rl.distributed import RayCollector, sampling_policy_fn

NUM_ENVS = 16


def _envs(num_envs: int, kind: str):
    if kind == "batched":
        return BatchedHalfCheetah(num_envs)
    return make_vector_env(lambda: gym.make("HalfCheetah-v5"), num_envs, asynchronous=kind == "async")


def vector_rate(steps: int, kind: str) -> float:
    """Env steps per second of one process collecting from ``kind`` envs: ``sync``, ``async``
    (one subprocess per env) or ``batched`` (`BatchedHalfCheetah`)."""
    torch.set_num_threads(1)
    envs = _envs(NUM_ENVS, kind)
    policy_fn = sampling_policy_fn(GaussianMLPPolicy(17, 6), torch.Generator().manual_seed(0))
    collect(envs, policy_fn, 5, seed=0)
    start = time.perf_counter()
    collect(envs, policy_fn, steps, seed=0)
    rate = steps * NUM_ENVS / (time.perf_counter() - start)
    envs.close()
    return rate


def ray_rate(steps: int, workers: int, kind: str = "sync") -> tuple[float, float]:
    """(env steps per second, seconds to start Ray and the actors) of a `RayCollector` whose
    ``workers`` actors each hold ``NUM_ENVS / workers`` envs of ``kind``."""
    import ray

    begin = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    collector = RayCollector(functools.partial(_envs, NUM_ENVS // workers, kind),
                             functools.partial(GaussianMLPPolicy, 17, 6), workers)
    params = GaussianMLPPolicy(17, 6).state_dict()
    collector.collect(params, 5, seed=0)
    startup = time.perf_counter() - begin
    start = time.perf_counter()
    batch = collector.collect(params, steps, seed=0)
    rate = batch.num_steps * batch.batch_size / (time.perf_counter() - start)
    collector.close()
    ray.shutdown()
    return rate, startup


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="vector steps (each NUM_ENVS env steps)")
    args = parser.parse_args()
    workers = os.cpu_count() or 1
    sync = vector_rate(args.steps, "sync")
    asynchronous = vector_rate(args.steps, "async")
    batched = vector_rate(args.steps, "batched")
    ray_steps, ray_startup = ray_rate(args.steps, workers)
    ray_batched, ray_batched_startup = ray_rate(args.steps, workers, "batched")
    print(f"HalfCheetah-v5, {NUM_ENVS} envs, {args.steps} vector steps, {workers} cores")
    print("| collector | env steps/s | against Sync |")
    print("|---|---:|---:|")
    print(f"| SyncVectorEnv, 1 process | {sync:,.0f} | 1.00 |")
    print(f"| AsyncVectorEnv, {NUM_ENVS} subprocesses | {asynchronous:,.0f} | {asynchronous / sync:.2f} |")
    print(f"| Ray, {workers} actors x {NUM_ENVS // workers} envs (start {ray_startup:.1f} s, not counted) | "
          f"{ray_steps:,.0f} | {ray_steps / sync:.2f} |")
    print(f"| BatchedHalfCheetah, 1 process | {batched:,.0f} | {batched / sync:.2f} |")
    print(f"| Ray, {workers} actors x BatchedHalfCheetah({NUM_ENVS // workers}) (start {ray_batched_startup:.1f} s) | "
          f"{ray_batched:,.0f} | {ray_batched / sync:.2f} |")
    print(f"command: .venv/bin/python benchmarks/parallel_collection.py --steps {args.steps}")


if __name__ == "__main__":
    main()
