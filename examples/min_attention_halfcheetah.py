"""Minimum-attention MB-MPO on HalfCheetah-v5 (horizon 200): alpha = 0 (plain MB-MPO) against alpha > 0.

For each alpha the script trains `bilevel.algorithms.mbmpo.MBMPO` into ``RUNS/alpha-A-sS`` (resumable:
run it again with more ``--iterations`` to continue), meta-tests it out of distribution on each
perturbation (mass +50%, crippled back thigh, 10 degree slope; ``eval-PERTURB.json`` in the run folder),
and draws the alpha sweep, the adaptation curves and the |da/ds| heatmaps with `plot_mbmpo`.

The default budget is small enough for a 2-core CPU (about 1k real steps per iteration, 5 meta-steps
on 10 imagined trajectories of 50 steps per model); ``--paper`` uses the config defaults, MB-MPO's
budget (4k real steps per iteration, 30 meta-steps, 50 x 200 imagined steps per model). The long runs of
``docs/reproductions/min-attention.md`` are ``docs/reproductions/min-attention/run.sh`` (quoted there).

The same from the command line:

    bilevel train mbmpo --env halfcheetah --attention-weight 1.0 --iterations 20 --run-dir runs/a1
    bilevel eval runs/a1 --perturb crippled-joint --adaptation-steps 3

Run: .venv/bin/python examples/min_attention_halfcheetah.py [--alphas 0 0.05] [--seeds 0] [--iterations 15]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from bilevel.algorithms.mbmpo import OOD_PERTURBATIONS
from bilevel.algorithms.mbmpo_analysis import plot_mbmpo
from bilevel.runs import RunFolder, train
from bilevel.runs.loop import evaluate_run, make_config

SMALL_BUDGET = {"initial_random_steps": 1000, "episodes_per_model": 1, "meta_steps": 5, "imagined_trajectories": 10,
                "imagined_horizon": 50, "model_max_epochs": 10}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.05])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--iterations", type=int, default=15)
    parser.add_argument("--paper", action="store_true", help="MB-MPO's budget instead of the small one")
    parser.add_argument("--runs", type=Path, default=Path("runs/min-attention-example"))
    args = parser.parse_args()
    torch.set_num_threads(1)

    run_dirs = []
    for alpha in args.alphas:
        for seed in args.seeds:
            run_dir = args.runs / f"alpha-{alpha:g}-s{seed}"
            values = {"env": "halfcheetah", "seed": seed, "iterations": args.iterations, "device": "cpu",
                      "attention_weight": alpha, "checkpoint_every": 1, **({} if args.paper else SMALL_BUDGET)}
            resume = RunFolder(run_dir).checkpoint_path.exists()
            learner = train("mbmpo", make_config("mbmpo", values), run_dir, resume=resume)
            print(f"alpha={alpha:g} seed={seed}: {learner.iteration} iterations, {learner.env_steps} real steps, "
                  f"return {RunFolder(run_dir).read_metrics()[-1]['return']:.1f} (horizon 200)")
            for perturbation in OOD_PERTURBATIONS:
                result = evaluate_run(run_dir, {"perturb": perturbation, "adaptation_steps": 3})
                shutil.copy(run_dir / "eval.json", run_dir / f"eval-{perturbation}.json")
                curve = [round(result[f"return_{k}"], 1) for k in range(4)]
                print(f"  {perturbation}: return after 0..3 adaptation steps {curve}")
            run_dirs.append(run_dir)
    for path in plot_mbmpo(run_dirs, args.runs / "plots"):
        print(path)
    print(json.dumps({str(d): RunFolder(d).read_metrics()[-1] for d in run_dirs}, indent=1))


if __name__ == "__main__":
    main()
