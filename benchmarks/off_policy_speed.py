"""Training speed of our TD3 and SAC against Stable-Baselines3's, and MATT's cost over its base.

Every learner trains on Pendulum-v1 with the same networks (actor obs -> 256 -> 128 -> act, twin critics
(obs + act) -> 256 -> 128 -> 1, ReLU), batch 128, one gradient update per env step, learning rate 1e-3,
TD3's policy delay 2 and SAC's automatic entropy tuning, all in one process with one torch thread.
After ``--learning-starts`` random steps and one warm-up chunk, the learners take turns: each runs
``--chunk`` env steps (with their updates), ``--repeats`` times, so that a change in the load of a
shared machine hits all of them alike. Reported: env steps (= updates) per second from the median
chunk, by CPU time of the process (``time.process_time``, the fairer clock on a shared machine) and by
wall time, and the ratios. Then the time of one gradient update alone (``gradient_update``, a
replay batch already in memory) for DDPG, TD3, SAC and their MATT variants, taking turns run by run:
MATT's overhead per update, with the FLOPs of one update (``FlopCounterMode``; TD3 over a cycle of two
updates, one of them with the delayed actor step). TD3-MATT and SAC-MATT also run with each
``--meta-intervals`` k (``meta_interval = k``: the look-ahead on every k-th actor update only, an option
that changes the algorithm, not the default), their FLOPs averaged over a cycle of k actor updates.

Run: ``.venv/bin/python benchmarks/off_policy_speed.py [--chunk 1000] [--repeats 3] [--meta-intervals 4 16]``
(needs ``pip install 'bilevel[bench]'`` for stable-baselines3). ``--updates-only`` times the updates alone (no
env steps, no Stable-Baselines3); ``--device cuda`` puts our learners' and Stable-Baselines3's networks on a GPU
(wall time is then the clock: each timed run ends with ``torch.cuda.synchronize``).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

ENV = "Pendulum-v1"
HIDDEN = (256, 128)
BATCH = 128
LR = 1e-3


def learner_name(algorithm: str, meta_interval: int = 1) -> str:
    """``algorithm``, with `` k=K`` where the look-ahead runs on every K-th actor update only."""
    return algorithm if meta_interval == 1 else f"{algorithm} k={meta_interval}"


def build(name: str, learning_starts: int, steps_per_iteration: int, device: str = "cpu") -> object:
    """Our learner ``name`` (`learner_name`) with the benchmark's settings."""
    from bilevel.runs.loop import _build, make_config

    algorithm, _, interval = name.partition(" k=")
    values = {"env": ENV, "hidden": HIDDEN, "batch_size": BATCH, "actor_lr": LR, "critic_lr": LR,
              "learning_starts": learning_starts, "steps_per_iteration": steps_per_iteration, "eval_episodes": 0,
              "device": device, "buffer_size": 100_000}
    if interval:
        values["meta_interval"] = int(interval)
    return _build(algorithm, make_config(algorithm, values))


def ours(name: str, learning_starts: int, chunk: int, device: str = "cpu") -> Callable[[], None]:
    """A function that trains our learner ``name`` (`learner_name`) for ``chunk`` env steps per call (after
    a first call that fills the buffer with ``learning_starts`` random steps)."""
    learner = build(name, learning_starts, chunk, device)
    while learner.env_steps < learning_starts:
        learner.step()
    return learner.step


def stable_baselines(algorithm: str, learning_starts: int, chunk: int, device: str = "cpu") -> Callable[[], None]:
    """The same for Stable-Baselines3's TD3 or SAC with our settings."""
    from stable_baselines3 import SAC, TD3
    from stable_baselines3.common.noise import NormalActionNoise

    common = {"learning_rate": LR, "buffer_size": 100_000, "learning_starts": learning_starts, "batch_size": BATCH,
              "tau": 0.005, "gamma": 0.99, "train_freq": 1, "gradient_steps": 1, "device": device, "seed": 0,
              "policy_kwargs": {"net_arch": list(HIDDEN)}}
    if algorithm == "td3":
        model = TD3("MlpPolicy", ENV, action_noise=NormalActionNoise(np.zeros(1), 0.1 * np.ones(1)), policy_delay=2,
                    target_policy_noise=0.2, target_noise_clip=0.5, **common)
    else:
        model = SAC("MlpPolicy", ENV, ent_coef="auto", target_update_interval=1, **common)
    model.learn(learning_starts)
    return lambda: model.learn(chunk, reset_num_timesteps=False)


def timed(run: Callable[[], object]) -> tuple[float, float]:
    """(CPU seconds, wall seconds) of one call, the GPU's queued work included."""
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return time.process_time() - cpu, time.perf_counter() - wall


def update_learner(name: str, learning_starts: int, device: str = "cpu") -> Callable[[], object]:
    """Our learner ``name``'s ``gradient_update`` after ``learning_starts`` random steps and 10 updates."""
    learner = build(name, learning_starts, learning_starts, device)
    learner.step()
    for _ in range(10):
        learner.gradient_update()
    return learner.gradient_update


def cycle(name: str) -> int:
    """Updates in which learner ``name`` repeats itself: TD3's policy delay 2 times the meta interval."""
    return (2 if name.startswith("td3") else 1) * int(name.partition(" k=")[2] or 1)


def mflop_per_update(update: Callable[[], object], updates: int) -> float:
    """Million floating-point operations of one update, counted by ``FlopCounterMode`` over ``updates``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        for _ in range(updates):
            update()
    return counter.get_total_flops() / updates / 1e6


def per_update_ms(algorithms: tuple[str, ...], learning_starts: int, updates: int,
                  repeats: int, device: str = "cpu") -> dict[str, tuple[float, float]]:
    """Median (CPU ms, wall ms) of one ``gradient_update`` of each of our ``algorithms`` over ``repeats``
    runs of ``updates`` updates, the algorithms taking turns run by run."""
    learners = {algorithm: update_learner(algorithm, learning_starts, device) for algorithm in algorithms}
    samples: dict[str, list[tuple[float, float]]] = {algorithm: [] for algorithm in algorithms}
    for _ in range(repeats):
        for algorithm, update in learners.items():
            samples[algorithm].append(timed(lambda update=update: [update() for _ in range(updates)]))
    return {algorithm: (1e3 * statistics.median(s[0] for s in runs) / updates,
                        1e3 * statistics.median(s[1] for s in runs) / updates) for algorithm, runs in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=1000, help="env steps per timed chunk")
    parser.add_argument("--repeats", type=int, default=3, help="timed chunks per learner")
    parser.add_argument("--learning-starts", type=int, default=1000)
    parser.add_argument("--updates", type=int, default=200, help="updates per timed run of gradient_update")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--meta-intervals", type=int, nargs="*", default=[4, 16],
                        help="also time TD3-MATT and SAC-MATT with the look-ahead on every k-th actor update")
    parser.add_argument("--device", default="cpu", help="our learners' device (cpu, cuda or cuda:N)")
    parser.add_argument("--updates-only", action="store_true",
                        help="time the gradient updates alone: no env-step chunks, no Stable-Baselines3")
    args = parser.parse_args()
    intervals = [k for k in args.meta_intervals if k > 1]
    torch.set_num_threads(args.threads)
    if not args.updates_only:
        compare_with_stable_baselines(args, intervals)
    print(f"\ntorch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, {ENV}, "
          f"batch {BATCH}, hidden {HIDDEN}, {args.updates} updates x {args.repeats}")
    print("\n| learner | ms CPU / update | ms wall / update | MFLOP / update | CPU time x base | wall time x base | "
          "FLOP x base |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    algorithms = ("ddpg", "ddpg-matt", "td3", "td3-matt",
                  *(learner_name("td3-matt", k) for k in intervals), "sac", "sac-matt",
                  *(learner_name("sac-matt", k) for k in intervals))
    update_ms = per_update_ms(algorithms, args.learning_starts, args.updates, args.repeats, args.device)
    flops = {algorithm: mflop_per_update(update_learner(algorithm, args.learning_starts, args.device),
                                         cycle(algorithm)) for algorithm in algorithms}
    for algorithm in algorithms:
        base = algorithm.split("-")[0]
        cpu, wall = update_ms[algorithm]
        print(f"| {algorithm} | {cpu:.2f} | {wall:.2f} | {flops[algorithm]:.0f} | {cpu / update_ms[base][0]:.2f} | "
              f"{wall / update_ms[base][1]:.2f} | {flops[algorithm] / flops[base]:.2f} |")


def compare_with_stable_baselines(args: argparse.Namespace, intervals: list[int]) -> None:
    """Env steps (with their updates) per second of our learners against Stable-Baselines3's, both with their
    networks on ``args.device``."""
    import stable_baselines3

    print(f"torch {torch.__version__}, stable-baselines3 {stable_baselines3.__version__}, device {args.device}, "
          f"threads {torch.get_num_threads()}, {ENV}, batch {BATCH}, hidden {HIDDEN}, chunk {args.chunk} x "
          f"{args.repeats}")
    start, chunk, device = args.learning_starts, args.chunk, args.device
    learners = {
        "ours td3": ours("td3", start, chunk, device),
        "sb3 td3": stable_baselines("td3", start, chunk, device),
        "ours sac": ours("sac", start, chunk, device),
        "sb3 sac": stable_baselines("sac", start, chunk, device),
        "ours td3-matt": ours("td3-matt", start, chunk, device),
        "ours sac-matt": ours("sac-matt", start, chunk, device),
    }
    for k in intervals:
        for algorithm in ("td3-matt", "sac-matt"):
            name = learner_name(algorithm, k)
            learners[f"ours {name}"] = ours(name, start, chunk, device)
    for run in learners.values():
        run()
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in learners}
    for _ in range(args.repeats):
        for name, run in learners.items():
            samples[name].append(timed(run))
    rate = {name: (args.chunk / statistics.median(s[0] for s in chunks),
                   args.chunk / statistics.median(s[1] for s in chunks)) for name, chunks in samples.items()}
    print("\n| learner | env steps (= updates) / CPU s | / wall s |")
    print("|---|---|---|")
    for name, (cpu, wall) in rate.items():
        print(f"| {name} | {cpu:.0f} | {wall:.0f} |")
    print("\n| ratio | by CPU time | by wall time |")
    print("|---|---|---|")
    for a, b in (("ours td3", "sb3 td3"), ("ours sac", "sb3 sac")):
        print(f"| {a} / {b} speed | {rate[a][0] / rate[b][0]:.2f} | {rate[a][1] / rate[b][1]:.2f} |")
    for name in rate:
        if "matt" in name:
            for base in (name.split("-")[0], f"sb3 {name.split('-')[0].removeprefix('ours ')}"):
                print(f"| {name} / {base} time per env step | {rate[base][0] / rate[name][0]:.2f} | "
                      f"{rate[base][1] / rate[name][1]:.2f} |")


if __name__ == "__main__":
    main()
