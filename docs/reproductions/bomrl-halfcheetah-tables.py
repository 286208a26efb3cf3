"""Tables and the per-iteration CSV of a HalfCheetah comparison of MAML-TRPO and BO-MRL, from run folders.

    python docs/reproductions/bomrl-halfcheetah-tables.py ROOT CURVES_CSV [EVAL]

reads ROOT/{maml-trpo,bomrl-neural}-sS/metrics.csv (and ROOT/*/EVAL-seedK.json, EVAL default "eval-60"),
writes every run's per-iteration returns to the CSV and prints Markdown tables: 10-iteration windows of
the training batches' returns before and after adaptation (mean and standard error over seeds of each
seed's window mean), the per-seed gain, BO-MRL's diagnostics and the held-out evaluations.
"""

import csv
import json
import statistics
import sys
from pathlib import Path

METHODS = ("maml-trpo", "bomrl-neural")
BOMRL_DIAGNOSTICS = ("adaptation_gain", "adaptation_gain_min", "adaptation_distance", "adaptation_distance_max",
                     "adaptation_residual", "adaptation_residual_max", "implicit_cg_residual", "implicit_cg_converged",
                     "trpo_accepted", "trpo_kl", "seconds")
EVAL_KEYS = ("before_stochastic", "after_stochastic", "before_deterministic", "after_deterministic")


def rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def mean_se(values: list[float]) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) / len(values) ** 0.5:.1f}"


def main(root: Path, curves_csv: Path, eval_name: str) -> None:
    runs = {m: sorted(root.glob(f"{m}-s[0-9]")) for m in METHODS}
    with open(curves_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "seed", "iteration", "env_steps", "return_before", "return_after"])
        for method, method_runs in runs.items():
            for run in method_runs:
                for row in rows(run):
                    writer.writerow([method, run.name.rsplit("s", 1)[1], row["iteration"], row["env_steps"],
                                     f"{float(row['return_before']):.3f}", f"{float(row['return_after']):.3f}"])
    print("runs:", {m: [r.name for r in rs] for m, rs in runs.items()})
    steps_per_iteration = int(rows(next(r for rs in runs.values() for r in rs))[0]["env_steps"])
    header = " | ".join(f"{m} before | {m} after | {m} gain" for m in METHODS)
    print(f"\n| iterations | env steps | {header} |\n|---:|---:|" + "---:|" * 3 * len(METHODS))
    common = min(len(rows(r)) for rs in runs.values() for r in rs)
    for start in range(0, common - common % 10, 10):
        cells = []
        for method in METHODS:
            before, after = [], []
            for run in runs[method]:
                window = rows(run)[start:start + 10]
                before.append(statistics.mean(float(x["return_before"]) for x in window))
                after.append(statistics.mean(float(x["return_after"]) for x in window))
            cells += [mean_se(before), mean_se(after), mean_se([a - b for a, b in zip(after, before, strict=True)])]
        steps = (start + 10) * steps_per_iteration / 1e6
        print(f"| {start + 1}-{start + 10} | {steps:.1f} M | " + " | ".join(cells) + " |")

    print("\nmean adaptation gain over all iterations and the last 20, and seconds per iteration, per run")
    for method in METHODS:
        for run in runs[method]:
            x = rows(run)
            gain = [float(y["return_after"]) - float(y["return_before"]) for y in x]
            seconds = statistics.mean(float(y["seconds"]) for y in x)
            print(f"{run.name}: {statistics.mean(gain):+.2f} {statistics.mean(gain[-20:]):+.2f} {seconds:.1f} s")

    print("\nBO-MRL diagnostics (means over iterations)")
    for run in runs["bomrl-neural"]:
        x = rows(run)
        print(run.name, {k: round(statistics.mean(float(y[k]) for y in x), 4) for k in BOMRL_DIAGNOSTICS if k in x[0]})

    print(f"\n| method | seed | eval seed | {' | '.join(EVAL_KEYS)} |\n|---|---:|---:|" + "---:|" * len(EVAL_KEYS))
    for method in METHODS:
        per_run = []
        for run in runs[method]:
            evals = [json.loads(p.read_text()) for p in sorted(run.glob(f"{eval_name}-seed*.json"))]
            for k, e in enumerate(evals):
                values = " | ".join(f"{e['return_' + key]:.1f}" for key in EVAL_KEYS)
                print(f"| {method} | {run.name[-1]} | {k} | {values} |")
            if evals:
                per_run.append([statistics.mean(e["return_" + key] for e in evals) for key in EVAL_KEYS])
        if len(per_run) > 1:
            values = " | ".join(mean_se(list(column)) for column in zip(*per_run, strict=True))
            print(f"| {method} | mean ± s.e. over seeds | | {values} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else "eval-60")
