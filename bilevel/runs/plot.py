"""Learning curves of one or more runs, with 95% bands over seeds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from bilevel.runs.folder import RunFolder, metric_series

__all__ = ["group_by_config", "plot_curves", "seed_band"]


IGNORED_IN_LABELS = ("seed", "device", "checkpoint_every", "iterations")


def group_by_config(folders: list[RunFolder]) -> dict[str, list[RunFolder]]:
    """Runs grouped by algorithm and config, seeds and devices aside. The label names the
    algorithm and the config values that differ between that algorithm's groups (a field
    another algorithm lacks does not count as a difference)."""
    configs = []
    for folder in folders:
        algorithm, config = folder.read_config()
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


def seed_band(curves: list[tuple[list[float], list[float]]], points: int = 100):
    """Mean and 95% normal-approximation band (1.96 standard errors) of curves
    interpolated onto a shared x grid over the range all of them cover."""
    curves = [(np.asarray(x), np.asarray(y)) for x, y in curves if len(x) > 0]
    if not curves:
        raise ValueError("no run has the requested metrics")
    lo, hi = max(x[0] for x, _ in curves), min(x[-1] for x, _ in curves)
    grid = np.linspace(lo, hi, points) if hi > lo else np.array([lo])
    values = np.stack([np.interp(grid, x, y) for x, y in curves])
    mean = values.mean(0)
    half_width = 1.96 * values.std(0, ddof=1) / math.sqrt(len(curves)) if len(curves) > 1 else np.zeros_like(mean)
    return grid, mean, mean - half_width, mean + half_width


def plot_curves(run_dirs: list[str | Path], out: str | Path, *, x: str = "env_steps", y: str = "return") -> Path:
    """Draw ``y`` against ``x`` for every config group of ``run_dirs`` into ``out`` (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plotting needs matplotlib: pip install 'bilevel[plot]'") from None
    folders = [RunFolder(d) for d in run_dirs]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, group in group_by_config(folders).items():
        grid, mean, low, high = seed_band([metric_series(f.read_metrics(), x, y) for f in group])
        ax.plot(grid, mean, label=f"{label} ({len(group)} seeds)")
        ax.fill_between(grid, low, high, alpha=0.25)
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2, frameon=False)
    ax.grid(alpha=0.3)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return out
