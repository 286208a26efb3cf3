"""Learning curves of one or more runs, with 95% bands over seeds."""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from bilevel.runs.folder import RunFolder, metric_series
from bilevel.runs.learner import get_algorithm

__all__ = ["group_by_config", "plot_curves", "pyplot", "save_figure", "seed_band", "seeds_label"]


IGNORED_IN_LABELS = ("seed", "device", "checkpoint_every", "iterations")


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend; a clear error where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'bilevel[plot]'") from None
    return plt


def save_figure(
    fig: Any, out: str | Path, *, dpi: int = 120, tight_layout: bool = True, **savefig_options: Any
) -> Path:
    """Write ``fig`` to ``out`` (its folder made where missing), laid out tight unless ``tight_layout`` is
    false (a figure made with ``layout="constrained"``), and close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if tight_layout:
        fig.tight_layout()
    fig.savefig(out, dpi=dpi, **savefig_options)
    pyplot().close(fig)
    return out


def short_number(value: float) -> str:
    """``100000`` as ``100k``, ``2500000`` as ``2.5M``, ``750`` as ``750``."""
    for scale, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:g}{suffix}"
    return f"{value:g}"


def seeds_label(label: str, seeds: int, ends: list[float] | None = None) -> str:
    """A legend entry: ``label (1 seed)``, ``label (3 seeds)``; with ``ends``, the last x of each
    seed's curve, runs that stop at different x say so: ``label (3 seeds: 1 to 100k, 2 to 30k)``."""
    entry = f"{label} ({seeds} seed{'' if seeds == 1 else 's'}"
    distinct = sorted(set(ends or ()), reverse=True)
    if len(distinct) > 1:
        entry += ": " + ", ".join(f"{list(ends).count(end)} to {short_number(end)}" for end in distinct)
    return entry + ")"


def with_defaults(algorithm: str, config: dict) -> dict:
    """``config`` completed by the algorithm's current defaults for the fields it lacks (a run
    saved before a field existed trained with that field's default), or as it is for an
    algorithm that is not registered."""
    try:
        config_class = get_algorithm(algorithm).Config
    except ValueError:
        return config
    defaults = {f.name: f.default for f in dataclasses.fields(config_class) if f.default is not dataclasses.MISSING}
    return {**defaults, **config}


def group_by_config(folders: list[RunFolder]) -> dict[str, list[RunFolder]]:
    """Runs grouped by algorithm and config, seeds and devices aside. The label names the
    algorithm and the config values that differ between that algorithm's groups (a field
    another algorithm lacks does not count as a difference; a field a run's config lacks takes
    the algorithm's default)."""
    configs = []
    for folder in folders:
        algorithm, config = folder.read_config()
        config = with_defaults(algorithm, config)
        configs.append({"algorithm": algorithm, **{k: v for k, v in config.items() if k not in IGNORED_IN_LABELS}})
    varying: dict[str, list[str]] = {}
    for algorithm in {c["algorithm"] for c in configs}:
        same = [c for c in configs if c["algorithm"] == algorithm]
        keys = sorted({k for c in same for k in c} - {"algorithm"})
        varying[algorithm] = [k for k in keys if len({json.dumps(c.get(k)) for c in same}) > 1]
    groups: dict[str, list[RunFolder]] = defaultdict(list)
    for folder, config in zip(folders, configs, strict=True):
        label = " ".join([config["algorithm"], *(f"{k}={config.get(k)}" for k in varying[config["algorithm"]])])
        groups[label].append(folder)
    return dict(groups)


def student_t_quantile(probability: float, dof: np.ndarray) -> np.ndarray:
    """The ``probability`` quantile of Student's t with ``dof`` degrees of freedom (``scipy.stats.t``)."""
    try:
        from scipy import stats
    except ImportError:
        raise ValueError("seed bands need scipy: pip install 'bilevel[plot]'") from None
    return stats.t.ppf(probability, dof)


def seed_band(curves: list[tuple[list[float], list[float]]], points: int = 100):
    """Mean and 95% confidence band of the mean of curves interpolated onto a shared x grid over the
    union of their ranges: ``mean +- t_{0.975, n-1} * s / sqrt(n)`` with ``s`` the sample standard
    deviation of the ``n`` curves at a point and ``t`` Student's quantile (4.30 for three seeds, where
    the normal 1.96 would cover about 81%).

    At each grid point the mean and the band are over the curves whose range covers it, so a run that
    is still training (or stopped early) counts up to its last point and no further, and does not cut
    the others short; the band is zero where one curve remains. Returns ``(grid, mean, low, high,
    count)``, ``count`` the number of curves at each grid point."""
    curves = [(np.asarray(x, dtype=float), np.asarray(y, dtype=float)) for x, y in curves if len(x) > 0]
    if not curves:
        raise ValueError("no run has the requested metrics")
    lo, hi = min(x[0] for x, _ in curves), max(x[-1] for x, _ in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo])
    values = np.stack([np.interp(grid, x, y) for x, y in curves])
    covered = np.stack([(grid >= x[0]) & (grid <= x[-1]) for x, _ in curves])
    count = covered.sum(0)
    mean = np.where(covered, values, 0.0).sum(0) / count
    squares = np.where(covered, (values - mean) ** 2, 0.0).sum(0)
    several = count > 1
    std = np.sqrt(np.divide(squares, count - 1, out=np.zeros_like(mean), where=several))
    half_width = np.where(several, student_t_quantile(0.975, np.maximum(count - 1, 1)) * std / np.sqrt(count), 0.0)
    return grid, mean, mean - half_width, mean + half_width, count


def plot_curves(
    run_dirs: list[str | Path], out: str | Path, *, x: str = "env_steps", y: str = "return", x_max: float | None = None
) -> Path:
    """Draw ``y`` against ``x`` (up to ``x_max`` where given) for every config group of ``run_dirs`` into
    ``out`` (PNG)."""
    folders = [RunFolder(d) for d in run_dirs]
    if not folders:
        raise ValueError("no run folder to plot")
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for label, group in group_by_config(folders).items():
        curves = [metric_series(f.read_metrics(), x, y, x_max) for f in group]
        if not any(len(xs) for xs, _ in curves):
            limit = "" if x_max is None else f" with {x} <= {x_max:g}"
            raise ValueError(f"{label}: no run has a row with both {x!r} and {y!r}{limit}")
        grid, mean, low, high, _ = seed_band(curves)
        ends = [xs[-1] for xs, _ in curves if len(xs)]
        ax.plot(grid, mean, label=seeds_label(label, len(ends), ends))
        ax.fill_between(grid, low, high, alpha=0.25)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    return save_figure(fig, out, bbox_inches="tight")
