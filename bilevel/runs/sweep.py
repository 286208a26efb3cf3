"""Sweeps: the product of algorithms x envs x overrides x seeds, each an ordinary run, on Ray.

A spec is a TOML file::

    name = "lambda-sweep"
    seeds = [0, 1, 2]

    [resources]            # per trial; Ray schedules by these
    num_cpus = 1
    num_gpus = 0
    max_retries = 3        # a trial whose worker dies or raises is retried from its checkpoint

    [[group]]
    algorithm = "bomrl"
    env = "frozenlake-hole"          # a name or a list
    [group.overrides]                # scalars apply to all; lists form a grid (a list of
                                     # lists for a sequence field such as hidden)
    iterations = 50
    lam = [0.5, 1.0]

The sweep folder holds ``sweep.json`` (the spec and its trials), one run folder per trial,
``summary.csv`` and ``summary.md``. A trial is finished when its checkpoint has reached its
budget; ``bilevel sweep --resume SWEEP`` runs only the unfinished ones, each from its last
checkpoint, and never touches a finished run.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bilevel.runs.folder import RunFolder, atomic_write_text, final_mean, load_saved
from bilevel.runs.learner import Learner, get_algorithm
from bilevel.runs.loop import make_config, train

__all__ = ["Trial", "expand_spec", "load_spec", "run_sweep", "summarize", "trial_finished"]

RESOURCE_KEYS = {"num_cpus", "num_gpus", "max_retries"}
SPEC_KEYS = {"name", "seeds", "resources", "group"}
GROUP_KEYS = {"algorithm", "env", "overrides"}


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of a sweep: an algorithm, its full config values, and its folder name."""

    algorithm: str
    values: dict[str, Any]
    name: str


def load_spec(path: str | Path) -> dict[str, Any]:
    """Read a TOML spec."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:
        import tomli as tomllib
    path = Path(path)
    if not path.exists():
        raise ValueError(f"sweep spec {str(path)!r} does not exist")
    with path.open("rb") as handle:
        return tomllib.load(handle)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def _is_grid(algorithm: str, key: str, value: Any) -> bool:
    """A list is a grid axis, except for a sequence-valued field (``hidden = [64, 64]``),
    whose grid is a list of lists."""
    if not isinstance(value, list):
        return False
    fields = {f.name: f for f in dataclasses.fields(get_algorithm(algorithm).Config)}
    if key in fields and isinstance(fields[key].default, (tuple, list)):
        return bool(value) and isinstance(value[0], list)
    return True


def _trial_name(algorithm: str, values: dict[str, Any], grid_keys: list[str]) -> str:
    parts = [algorithm, str(values["env"])] + [f"{k}={values[k]}" for k in grid_keys] + [f"s{values['seed']}"]
    return "-".join(parts).replace("/", "_").replace(" ", "")


def expand_spec(spec: dict[str, Any]) -> list[Trial]:
    """Every trial of ``spec``, each config built and validated: an unknown algorithm,
    env or override key, a bad value or an empty seed list raises ``ValueError``
    naming it before anything runs."""
    unknown = sorted(set(spec) - SPEC_KEYS)
    if unknown:
        raise ValueError(f"unknown sweep spec key(s) {unknown}; known: {sorted(SPEC_KEYS)}")
    seeds = _as_list(spec.get("seeds", [0]))
    if not seeds:
        raise ValueError("`seeds` must list at least one seed; got []")
    unknown = sorted(set(spec.get("resources", {})) - RESOURCE_KEYS)
    if unknown:
        raise ValueError(f"unknown `resources` key(s) {unknown}; known: {sorted(RESOURCE_KEYS)}")
    groups = spec.get("group", [])
    if not groups:
        raise ValueError("the spec has no [[group]]: name at least one algorithm")
    trials: list[Trial] = []
    for group in groups:
        unknown = sorted(set(group) - GROUP_KEYS)
        if unknown:
            raise ValueError(f"unknown [[group]] key(s) {unknown}; known: {sorted(GROUP_KEYS)}")
        if "algorithm" not in group:
            raise ValueError("every [[group]] needs an `algorithm`")
        overrides = dict(group.get("overrides", {}))
        misplaced = sorted({"seed", "env"} & set(overrides))
        if misplaced:
            raise ValueError(f"[[group]] `overrides` may not set {misplaced}: give seeds as the spec's `seeds` "
                             "and envs as the group's `env`")
        for key in ("algorithm", "env"):
            if key in group and not _as_list(group[key]):
                raise ValueError(f"[[group]] `{key}` must list at least one value; got []")
        for algorithm, env, seed in itertools.product(
            _as_list(group["algorithm"]), _as_list(group.get("env", "")), seeds
        ):
            grid_keys = sorted(k for k, v in overrides.items() if _is_grid(algorithm, k, v))
            empty = [k for k in grid_keys if not overrides[k]]
            if empty:
                raise ValueError(f"the grid axis `{empty[0]}` of {algorithm!r} lists no value; got []")
            for grid_values in itertools.product(*(overrides[k] for k in grid_keys)):
                values = {**overrides, **dict(zip(grid_keys, grid_values, strict=True)), "env": env, "seed": seed}
                config = make_config(algorithm, values)
                full = dataclasses.asdict(config)
                trials.append(Trial(algorithm, full, _trial_name(algorithm, full, grid_keys)))
    names = [t.name for t in trials]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"the spec names the same trial twice: {duplicates}")
    return trials


def trial_finished(run_dir: Path, iterations: int) -> bool:
    """Whether ``run_dir``'s checkpoint has reached ``iterations``."""
    checkpoint = RunFolder(run_dir).checkpoint_path
    if not checkpoint.exists():
        return False
    state = load_saved(checkpoint, "cpu")["state"]
    return state["iteration"] >= iterations


def _run_trial(trial: Trial, run_dir: str, fault: tuple[int, int] | None) -> dict[str, Any]:
    """Train one trial to its budget, from its checkpoint if it has one (a retry)."""
    run_path = Path(run_dir)
    resume = RunFolder(run_path).checkpoint_path.exists()
    after_iteration: Callable[[Learner], None] | None = None
    if fault is not None:
        kill_iteration, _ = fault
        marker = run_path / ".fault-injected"

        def after_iteration(learner: Learner) -> None:
            if learner.iteration == kill_iteration and not marker.exists():
                marker.touch()
                os._exit(1)

    config = make_config(trial.algorithm, trial.values)
    # A retry of a trial that died before its first checkpoint starts it again from scratch.
    learner = train(trial.algorithm, config, run_path, resume=resume, overwrite=not resume, progress=False,
                    after_iteration=after_iteration)
    return {"trial": trial.name, "iteration": learner.iteration, "env_steps": learner.env_steps}


def check_reachable(address: str, timeout: float = 5.0) -> None:
    """Raise ``ValueError`` naming ``address`` unless a TCP connection to its ``host:port`` opens
    within ``timeout`` seconds. Ray itself retries an unreachable address for minutes before it
    gives up; ``auto`` and addresses without a port are left to Ray."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as error:
        raise ValueError(f"could not reach a Ray cluster at {address!r}: {error}") from None


def init_ray(address: str | None = None, **options: Any) -> None:
    """Start a local Ray on this machine (``address`` None: every core, no dashboard) or join
    the cluster at ``address``; an unreachable address raises ``ValueError`` naming it."""
    import ray

    if address is not None:
        check_reachable(address)
    init_options: dict[str, Any] = {"log_to_driver": False, **options}
    if address is None:
        init_options.update(include_dashboard=False, _node_ip_address="127.0.0.1")
    elif address.split(":")[0] in ("127.0.0.1", "localhost"):
        init_options["_node_ip_address"] = "127.0.0.1"
    try:
        ray.init(address=address, **init_options)
    except ConnectionError as error:
        raise ValueError(f"could not reach a Ray cluster at {address!r}: {error}") from None


def run_sweep(
    spec: dict[str, Any],
    sweep_dir: str | Path,
    *,
    address: str | None = None,
    resume: bool = False,
    fault: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Run every unfinished trial of ``spec`` as a Ray task and write the summary.

    ``address`` (or ``RAY_ADDRESS``) joins an existing cluster; without it a local Ray
    uses every core. ``fault=(iteration, trial_index)`` kills that trial's worker once,
    after that iteration's checkpoint: the retry path, exercised by the tests."""
    try:
        import ray
    except ImportError:
        raise ValueError("sweeps run on Ray: pip install 'bilevel[ray]'") from None
    trials = expand_spec(spec)
    address = address or os.environ.get("RAY_ADDRESS")
    if address is not None:
        check_reachable(address)
    sweep_path = Path(sweep_dir)
    record = {"spec": spec, "trials": [dataclasses.asdict(t) for t in trials]}
    if (sweep_path / "sweep.json").exists() and not resume:
        raise ValueError(f"sweep folder {str(sweep_path)!r} exists; pass --resume to continue it")
    atomic_write_text(sweep_path / "sweep.json", json.dumps(record, indent=2) + "\n")

    pending = [(i, t) for i, t in enumerate(trials) if not trial_finished(sweep_path / t.name, t.values["iterations"])]
    resources = {"num_cpus": 1, "num_gpus": 0, "max_retries": 3, **spec.get("resources", {})}
    init_ray(address)
    try:
        remote = ray.remote(_run_trial).options(
            num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"],
            max_retries=resources["max_retries"], retry_exceptions=True,
        )
        refs = [remote.remote(t, str(sweep_path / t.name), fault if fault and fault[1] == i else None)
                for i, t in pending]
        results = ray.get(refs)
    finally:
        ray.shutdown()
    summary = summarize(sweep_path)
    return {"ran": [r["trial"] for r in results], "skipped": len(trials) - len(pending), "summary": summary}


def expand_sweeps(paths: list[str | Path]) -> list[Path]:
    """Run folders, with every sweep folder (one holding ``sweep.json``) replaced by its
    trials' run folders that have metrics."""
    runs: list[Path] = []
    for path in map(Path, paths):
        record = path / "sweep.json"
        if record.exists():
            runs += [path / t["name"] for t in json.loads(record.read_text())["trials"]
                     if (path / t["name"] / "metrics.csv").exists()]
        else:
            runs.append(path)
    return runs


def summary_rows(run_dirs: list[str | Path], metric: str = "return", last: int = 5, *,
                 x: str = "env_steps", x_max: float | None = None) -> list[dict[str, Any]]:
    """Final ``metric`` (the mean of each run's last ``last`` rows) per configuration of
    ``run_dirs``, with the mean and standard error over seeds. With ``x_max``, only the rows with
    ``row[x] <= x_max`` count (runs that went on past the budget being compared)."""
    from bilevel.runs.plot import group_by_config

    folders = [RunFolder(path) for path in run_dirs if (Path(path) / "config.json").exists()]
    rows = []
    for label, group in group_by_config(folders).items():
        finals = []
        for folder in group:
            final = final_mean(folder.read_metrics(), metric, last, x=x, x_max=x_max)
            if final is not None:
                finals.append(final)
        if not finals:
            continue
        mean = sum(finals) / len(finals)
        stderr = (math.sqrt(sum((f - mean) ** 2 for f in finals) / (len(finals) - 1) / len(finals))
                  if len(finals) > 1 else float("nan"))
        rows.append({"config": label, "seeds": len(finals), "mean": mean, "stderr": stderr})
    return rows


def summary_markdown(rows_by_metric: dict[str, list[dict[str, Any]]], last: int = 5, *,
                     x: str = "env_steps", x_max: float | None = None) -> str:
    """`summary_rows` of one or more metrics (``{metric: rows}``) as one Markdown table: a row per
    configuration, the mean and standard error over seeds of each metric (seeds: the most of any metric)."""
    cut = "" if x_max is None else f" with {x} <= {x_max:g}"
    by_config: dict[str, dict[str, dict[str, Any]]] = {}
    for metric, rows in rows_by_metric.items():
        for row in rows:
            by_config.setdefault(row["config"], {})[metric] = row

    def cells(row: dict[str, Any] | None) -> str:
        if row is None:
            return " | "
        stderr = format(row["stderr"], ".2g") if math.isfinite(row["stderr"]) else "n/a (one seed)"
        return f"{row['mean']:.4g} | {stderr}"

    header = " | ".join(f"final {metric} (mean of last {last} rows{cut}) | standard error" for metric in rows_by_metric)
    md = [f"| config | seeds | {header} |", "|---|---:|" + "---:|---:|" * len(rows_by_metric)]
    md += [f"| {config} | {max(row['seeds'] for row in rows.values())} | "
           + " | ".join(cells(rows.get(metric)) for metric in rows_by_metric) + " |"
           for config, rows in by_config.items()]
    return "\n".join(md) + "\n"


def summarize(sweep_dir: str | Path, metric: str = "return", last: int = 5) -> list[dict[str, Any]]:
    """`summary_rows` of a sweep's trials, written to ``summary.csv`` and ``summary.md``."""
    sweep_path = Path(sweep_dir)
    trials = [Trial(**t) for t in json.loads((sweep_path / "sweep.json").read_text())["trials"]]
    rows = summary_rows([sweep_path / t.name for t in trials], metric, last)
    csv_lines = ["config,seeds,mean,stderr"] + [f'"{r["config"]}",{r["seeds"]},{r["mean"]!r},{r["stderr"]!r}'
                                                for r in rows]
    atomic_write_text(sweep_path / "summary.csv", "\n".join(csv_lines) + "\n")
    atomic_write_text(sweep_path / "summary.md", summary_markdown({metric: rows}, last))
    return rows
