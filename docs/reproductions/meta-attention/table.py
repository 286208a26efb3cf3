"""Tables and one combined CSV of the MATT runs in a folder (issue 6).

    python docs/reproductions/meta-attention/table.py runs/matt-lunar OUT.csv [THRESHOLD [MAX_ENV_STEPS]]

Prints one row per run (final return, mean of the last 5 evaluations, best, the first env steps at
which the return reached THRESHOLD (default -250), the last Q(att) - Q(van), wall seconds), then
one row per learner: the mean and standard error over its seeds (runs named LEARNER-sSEED) of the
per-seed values. Writes every run's per-iteration metrics into the CSV. MAX_ENV_STEPS keeps the
evaluations up to that many env steps, so a stage's table stands when some runs have gone further.
"""

import csv
import glob
import statistics
import sys
from collections import defaultdict

KEEP = ["iteration", "env_steps", "return", "return_std", "train_return", "critic_loss", "actor_loss", "meta_loss",
        "q_attention_minus_vanilla", "attention_preferred", "attention_scale_mean", "alpha", "meta_grad_norm",
        "meta_net_norm", "seconds"]


def mean_and_error(values: list[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) / len(values) ** 0.5:.1f}"


def main(folder: str, out: str, threshold: float, max_env_steps: float = float("inf")) -> None:
    rows_out, table, by_learner = [], [], defaultdict(list)
    for path in sorted(glob.glob(f"{folder}/*/metrics.csv")):
        run = path.split("/")[-2]
        with open(path) as handle:
            rows = [r for r in csv.DictReader(handle) if int(r["env_steps"]) <= max_env_steps]
        if not rows:
            continue
        rows_out += [{"run": run, **{k: r.get(k, "") for k in KEEP}} for r in rows]
        returns = [float(r["return"]) for r in rows]
        hit = next((r["env_steps"] for r in rows if float(r["return"]) >= threshold), "-")
        gap = rows[-1].get("q_attention_minus_vanilla") or "-"
        gap = f"{float(gap):+.3f}" if gap != "-" else gap
        last5 = statistics.mean(returns[-5:])
        table.append((run, rows[-1]["env_steps"], round(returns[-1]), round(last5), round(max(returns)), hit, gap,
                      round(sum(float(r["seconds"]) for r in rows))))
        by_learner[run.rsplit("-s", 1)[0]].append((int(rows[-1]["env_steps"]), last5, returns[-1], max(returns)))
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", *KEEP])
        writer.writeheader()
        writer.writerows(rows_out)
    print(f"| run | env steps | final return | mean of last 5 evaluations | best return "
          f"| first env steps with return >= {threshold:g} | final Q(att) - Q(van) | wall s |")
    print("|---|---|---|---|---|---|---|---|")
    for row in table:
        print("| " + " | ".join(map(str, row)) + " |")
    print("\n| learner | seeds | env steps | mean of last 5 evaluations | final return | best return |")
    print("|---|---|---|---|---|---|")
    for learner, seeds in by_learner.items():
        steps = sorted({s[0] for s in seeds})
        print(f"| {learner} | {len(seeds)} | {'/'.join(map(str, steps))} | "
              + " | ".join(mean_and_error([s[i] for s in seeds]) for i in (1, 2, 3)) + " |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else -250.0,
         float(sys.argv[4]) if len(sys.argv) > 4 else float("inf"))
