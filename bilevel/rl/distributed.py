"""Collection on Ray actors: `bilevel.rl.collect` in several processes, or on a cluster.

Measured on 2 cores (``benchmarks/parallel_collection.py``, docs/benchmarks.md): two actors
collect 1.31x as fast as one process with Gymnasium envs and 1.44x with `BatchedHalfCheetah`,
after a start of about 4 s; across machines they are the way to scale collection. Each actor
holds its own vector env and a copy of the policy; a call sends the policy's parameters to
every actor, collects in all of them at once and joins the batches along the batch axis.
Needs ``pip install 'bilevel[ray]'``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from bilevel.rl.collect import PolicyFn, _concat_batch, collect
from bilevel.rl.trajectories import Trajectories

__all__ = ["RayCollector", "sampling_policy_fn"]


def sampling_policy_fn(policy: nn.Module, generator: torch.Generator) -> PolicyFn:
    """The `PolicyFn` of a module that returns an action distribution: ``a ~ policy(obs)``
    drawn with ``generator``, with its log-probability."""

    def policy_fn(obs: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            dist = policy(obs)
            actions = dist.sample(generator=generator)
            return actions, dist.log_prob(actions)

    return policy_fn


class _Worker:
    def __init__(self, make_envs: Callable[[], Any], make_policy: Callable[[], nn.Module], threads: int) -> None:
        torch.set_num_threads(threads)
        self.envs = make_envs()
        self.policy = make_policy()

    def num_envs(self) -> int:
        return self.envs.num_envs

    def collect(self, params: dict[str, Tensor], num_steps: int, seed: int) -> Trajectories:
        self.policy.load_state_dict(params)
        generator = torch.Generator().manual_seed(seed)
        return collect(self.envs, sampling_policy_fn(self.policy, generator), num_steps, seed=seed)


class RayCollector:
    """``num_workers`` Ray actors, each with ``make_envs()`` (a next-step-autoreset vector env)
    and ``make_policy()`` (a module returning an action distribution), one CPU and
    ``threads`` torch threads each.

    ``collect(params, num_steps, seed)`` returns one `Trajectories` with ``T = num_steps`` and
    ``B`` = the sum of the workers' envs, on ``device``; worker ``i`` resets its envs with
    ``seed + i * 10_000`` and samples actions with a generator seeded the same, so a call is
    reproducible. ``address`` joins a Ray cluster (default: ``RAY_ADDRESS``, else the Ray
    already started in this process, else a local one). ``close()`` ends the actors."""

    def __init__(
        self,
        make_envs: Callable[[], Any],
        make_policy: Callable[[], nn.Module],
        num_workers: int,
        *,
        address: str | None = None,
        threads: int = 1,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(num_workers, int) or num_workers < 1:
            raise ValueError(f"`num_workers` must be a positive integer; got {num_workers!r}")
        try:
            import ray
        except ImportError:
            raise ValueError("RayCollector needs Ray: pip install 'bilevel[ray]'") from None
        if not ray.is_initialized():
            from bilevel.runs.sweep import init_ray

            init_ray(address)
        worker_class = ray.remote(num_cpus=1)(_Worker)
        self._ray = ray
        self.workers = [worker_class.remote(make_envs, make_policy, threads) for _ in range(num_workers)]
        self.num_envs = sum(ray.get([w.num_envs.remote() for w in self.workers]))
        self.device = torch.device(device)

    def collect(self, params: dict[str, Tensor], num_steps: int, seed: int) -> Trajectories:
        state = {name: value.detach().cpu() for name, value in params.items()}
        shared = self._ray.put(state)
        batches = self._ray.get([w.collect.remote(shared, num_steps, seed + i * 10_000)
                                 for i, w in enumerate(self.workers)])
        return _concat_batch(batches).to(self.device)

    def close(self) -> None:
        for worker in self.workers:
            self._ray.kill(worker)
        self.workers = []
