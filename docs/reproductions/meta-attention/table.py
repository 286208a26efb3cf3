"""Tables and one combined CSV of the MATT runs in a folder (issue 6).

    python docs/reproductions/meta-attention/table.py runs/matt-lunar OUT.csv [THRESHOLD [MAX_ENV_STEPS [AFTER [GOOD]]]]

Prints one row per run (final return, mean of the last 5 evaluations, best, the first env steps at
which the return reached THRESHOLD (default -250), the last Q(att) - Q(van), wall seconds), then
one row per learner: the mean and standard error over its seeds (runs named LEARNER-sSEED) of the
per-seed values. Writes every run's per-iteration metrics into the CSV. MAX_ENV_STEPS keeps the
evaluations up to that many env steps, so a stage's table stands when some runs have gone further.
AFTER gives the stage tables of the BipedalWalker section instead: per run the mean of the evaluations
after AFTER env steps and how many of them reached GOOD (default 200) in place of the Q gap, and per
learner that mean too. A table gives Welch's t and the Mann-Whitney U, each with its two-sided p, of each learner
against its base learner (td3-matt against td3: the name's first part) on those means, where both have two
seeds or more. With AFTER, a last table gives per seed the first env steps from which five consecutive evaluations
average GOOD or more (the landing held; "never" within the budget), their median, and the Mann-Whitney U on them
against the base learner (a seed that never holds it counting as later than every one that does).
A FOLDER with a glob pattern names the run folders themselves (`'docs/reproductions/records/matt-bipedal/*-s[0-2]'`:
seeds 0-2 only, the BipedalWalker stages as first reported). Several patterns joined by commas may name runs of
several folders; a learner is then named with its folder (`td3-matt (matt-lunar-live)`), and compared with the base
learner of its own folder, or else with the one base learner of that name.
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


def main(folder: str, out: str, threshold: float, max_env_steps: float = float("inf"),
         after: float | None = None, good: float = 200.0) -> None:
    rows_out, table, by_learner, held_from = [], [], defaultdict(list), defaultdict(list)
    patterns = [pattern if glob.has_magic(pattern) else f"{pattern}/*" for pattern in folder.split(",")]
    paths = sorted({path for pattern in patterns for path in glob.glob(f"{pattern}/metrics.csv")})
    several_folders = len({path.split("/")[-3] for path in paths}) > 1
    for path in paths:
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
        wall = round(sum(float(r["seconds"]) for r in rows))
        key = (run.rsplit("-s", 1)[0], path.split("/")[-3] if several_folders else "")
        if after is None:
            table.append((run, rows[-1]["env_steps"], round(returns[-1]), round(last5), round(max(returns)), hit, gap,
                          wall))
            by_learner[key].append((int(rows[-1]["env_steps"]), last5, returns[-1], max(returns)))
            continue
        window = [value for r, value in zip(rows, returns, strict=True) if int(r["env_steps"]) > after]
        if not window:
            raise ValueError(f"{run!r} has no evaluation after AFTER={after:g} env steps")
        window_mean = statistics.mean(window)
        held_from[key].append(first_held(rows, returns, good))
        table.append((run, rows[-1]["env_steps"], round(returns[-1]), round(last5), round(window_mean),
                      round(max(returns)), hit, sum(value >= good for value in window), wall))
        by_learner[key].append((int(rows[-1]["env_steps"]), last5, window_mean, returns[-1], max(returns)))
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["run", *KEEP])
        writer.writeheader()
        writer.writerows(rows_out)
    if after is None:
        run_columns = ["final return", "mean of last 5 evaluations", "best return",
                       f"first env steps with return >= {threshold:g}", "final Q(att) - Q(van)", "wall s"]
        learner_columns = ["mean of last 5 evaluations", "final return", "best return"]
    else:
        since = (f"{after / 1000 + 1:g}k-{max_env_steps / 1000:g}k" if max_env_steps < float("inf")
                 else f"after {after:g}")
        run_columns = ["final return", "mean of last 5 evaluations", f"mean {since}", "best return",
                       f"first env steps with return >= {threshold:g}",
                       f"evaluations >= {good:g} after {after / 1000:g}k", "wall s"]
        learner_columns = ["mean of last 5 evaluations", f"mean {since}", "final return", "best return"]
    print("| run | env steps | " + " | ".join(run_columns) + " |")
    print("|---" * (len(run_columns) + 2) + "|")
    for row in table:
        print("| " + " | ".join(map(str, row)) + " |")
    print("\n| learner | seeds | env steps | " + " | ".join(learner_columns) + " |")
    print("|---" * (len(learner_columns) + 3) + "|")
    for learner, seeds in by_learner.items():
        steps = sorted({s[0] for s in seeds})
        print(f"| {label(learner)} | {len(seeds)} | {'/'.join(map(str, steps))} | "
              + " | ".join(mean_and_error([s[i] for s in seeds]) for i in range(1, len(learner_columns) + 1)) + " |")
    compared = learner_columns[:2] if after is not None else learner_columns[:1]
    against_base = [(learner, base) for learner in by_learner if (base := base_learner(learner, by_learner))
                    and len(by_learner[base]) > 1 and len(by_learner[learner]) > 1]
    if against_base:
        print("\n| learner | against | " + " | ".join(f"Welch t (two-sided p), {c}" for c in compared) + " | "
              + " | ".join(f"Mann-Whitney U of n m (two-sided p), {c}" for c in compared) + " |")
        print("|---" * (2 * len(compared) + 2) + "|")
    for learner, base in against_base:
        columns = range(1, len(compared) + 1)
        cells = [welch(by_learner[learner], by_learner[base], i) for i in columns]
        cells += [rank_sum(by_learner[learner], by_learner[base], i) for i in columns]
        print(f"| {label(learner)} | {label(base)} | " + " | ".join(cells) + " |")
    if after is not None:
        print_held_from(held_from, good)


def first_held(rows: list[dict], returns: list[float], good: float, window: int = 5) -> float:
    """The env steps at the last of the first ``window`` consecutive evaluations whose mean is at least ``good``;
    infinity where there are none."""
    for start in range(len(returns) - window + 1):
        if statistics.mean(returns[start:start + window]) >= good:
            return float(rows[start + window - 1]["env_steps"])
    return float("inf")


def print_held_from(held_from: dict, good: float) -> None:
    """Per learner, the env steps from which each seed holds the landing, their median, and the Mann-Whitney U of
    how much earlier than the base learner's they are (pairs won out of ``n m``, with the two-sided p)."""
    from scipy.stats import mannwhitneyu

    print(f"\n| learner | seeds | held >= {good:g} from, per seed | median | Mann-Whitney U of n m (two-sided p), "
          "earlier than the base learner |")
    print("|---" * 5 + "|")
    for learner, steps in held_from.items():
        base = base_learner(learner, held_from)
        test = "-"
        if base and len(held_from[base]) > 1 and len(steps) > 1:
            result = mannwhitneyu([-s for s in steps], [-s for s in held_from[base]], alternative="two-sided")
            test = f"{result.statistic:g} of {len(steps) * len(held_from[base])} ({result.pvalue:.3f})"
        cells = " / ".join(steps_text(s) for s in steps)
        print(f"| {label(learner)} | {len(steps)} | {cells} | {steps_text(statistics.median(steps))} | {test} |")


def steps_text(env_steps: float) -> str:
    return "never" if env_steps == float("inf") else f"{env_steps / 1000:g}k"


def label(learner: tuple[str, str]) -> str:
    """A learner's name, with its folder when the runs come from several."""
    name, folder = learner
    return f"{name} ({folder})" if folder else name


def base_learner(learner: tuple[str, str], by_learner: dict) -> tuple[str, str] | None:
    """The learner ``td3`` for ``td3-matt``: in the same folder, or else the only one of that name; None for a base
    learner itself or where there is none."""
    name, folder = learner
    base_name = name.split("-")[0]
    if base_name == name:
        return None
    if (base_name, folder) in by_learner:
        return base_name, folder
    candidates = [other for other in by_learner if other[0] == base_name]
    return candidates[0] if len(candidates) == 1 else None


def welch(seeds: list[tuple], base_seeds: list[tuple], column: int) -> str:
    """Welch's t of one learner's per-seed values against its base learner's, with the two-sided p."""
    from scipy.stats import ttest_ind

    test = ttest_ind([s[column] for s in seeds], [s[column] for s in base_seeds], equal_var=False)
    return f"{test.statistic:.2f} ({test.pvalue:.2f})"


def rank_sum(seeds: list[tuple], base_seeds: list[tuple], column: int) -> str:
    """The Mann-Whitney U of one learner's per-seed values against its base learner's (the number of
    (seed, base seed) pairs in which the learner's value is higher, ties counting one half) out of all
    ``n m`` pairs, with the two-sided p (exact where there are no ties). Unlike Welch's t, one outlying
    seed moves it by at most its own pairs."""
    from scipy.stats import mannwhitneyu

    values, base_values = [s[column] for s in seeds], [s[column] for s in base_seeds]
    test = mannwhitneyu(values, base_values, alternative="two-sided")
    return f"{test.statistic:g} of {len(values) * len(base_values)} ({test.pvalue:.3f})"


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]) if len(sys.argv) > 3 else -250.0,
         float(sys.argv[4]) if len(sys.argv) > 4 else float("inf"),
         float(sys.argv[5]) if len(sys.argv) > 5 else None, float(sys.argv[6]) if len(sys.argv) > 6 else 200.0)
