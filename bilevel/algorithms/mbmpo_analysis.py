"""Minimum-attention MB-MPO after training: the out-of-distribution meta-test's summaries and the figures.

`bilevel eval RUN --perturb P ...` writes a run's meta-test (`MBMPO.evaluate`) to ``eval*.json``; this module
reads those files back: the real-data step chosen in distribution (`chosen_adaptation_lr`), the adaptation
curves per perturbation (`evaluation_curves`), the real steps to a fraction of the in-distribution return
(`samples_to_fraction`, `ood_summary`), and the figures ``bilevel plot`` draws for mbmpo runs (`plot_mbmpo`:
the alpha sweep, the adaptation curves and the mean ``|d mu / d s|`` heatmaps).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import vmap

from bilevel.algorithms.mbmpo import MBMPO, collect_real, normalise
from bilevel.nets import mean_action_fn

__all__ = [
    "SELECTION_SEED",
    "chosen_adaptation_lr",
    "evaluation_curves",
    "evaluations",
    "mean_abs_jacobian",
    "ood_markdown",
    "ood_summary",
    "plot_mbmpo",
    "samples_to_fraction",
]


def mean_abs_jacobian(learner: MBMPO, episodes: int = 4, seed: int = 0) -> Tensor:
    """``mean_s |d mu(s) / d s|``, ``[A, D]`` (s normalised), of the meta-policy's mean action ``mu`` over the
    states it visits: ``episodes`` mean-action episodes on the training dynamics, env seed ``seed``. Needs only
    the evaluation state, so it draws from a record as from a run."""
    c = learner.config
    visited = collect_real(c.env, c.horizon, learner.policy_fn(learner.meta_params, None), episodes, seed).episodes
    norm_obs = normalise(visited.obs[visited.valid].to(learner.device), learner.obs_mean, learner.obs_std)
    mean_fn = mean_action_fn(learner.policy)
    with torch.no_grad():
        jacobians = vmap(torch.func.jacrev(lambda s: mean_fn(learner.meta_params, s)))(norm_obs)
    return jacobians.abs().mean(0)


def samples_to_fraction(samples: list[float], returns: list[float], reference: float,
                        fraction: float = 0.9) -> float:
    """The fewest real adaptation steps ``samples[k]`` after which ``returns[k] >= reference - (1 - fraction)
    |reference|`` (``fraction`` of a positive ``reference``); ``inf`` when no round reaches it."""
    if len(samples) != len(returns):
        raise ValueError(f"`samples` and `returns` differ in length: {len(samples)} and {len(returns)}")
    if not 0 < fraction <= 1:
        raise ValueError(f"`fraction` must lie in (0, 1]; got {fraction}")
    threshold = reference - (1 - fraction) * abs(reference)
    return next((float(n) for n, r in zip(samples, returns, strict=True) if r >= threshold), math.inf)


SELECTION_SEED = 1
"""The evaluation seed of the in-distribution runs that choose the real-data step (`chosen_adaptation_lr`);
the out-of-distribution meta-test uses seed 0."""


def evaluations(run_dir: str | Path) -> list[dict[str, Any]]:
    """The results of an mbmpo run folder's ``eval*.json`` files (written by ``bilevel eval RUN ...``; copies
    with the same contents count once)."""
    return [json.loads(text) for text in sorted({path.read_text() for path in Path(run_dir).glob("eval*.json")})]


def _rounds(result: dict[str, Any]) -> list[int]:
    return sorted(int(k.split("_")[1]) for k in result if k.startswith("return_"))


def chosen_adaptation_lr(results: list[dict[str, Any]], seed: int = SELECTION_SEED) -> float | None:
    """The real-data step chosen in distribution: among the evaluations on the training dynamics with
    evaluation seed ``seed`` and an explicit ``adaptation_lr`` (``docs/reproductions/min-attention/select-lr.sh``),
    the step whose mean return after the adapted rounds (``return_1 .. return_K``) is highest; None with
    fewer than two candidate steps."""
    criterion = {}
    for result in results:
        options = result["options"]
        if options.get("perturb") is None and options.get("seed", 0) == seed and options.get("adaptation_lr"):
            criterion[float(options["adaptation_lr"])] = np.mean([result[f"return_{k}"] for k in _rounds(result)[1:]])
    return max(criterion, key=criterion.__getitem__) if len(criterion) > 1 else None


def evaluation_curves(run_dir: str | Path, adaptation_lr: float | str | None = "chosen",
                      seed: int = 0) -> dict[str, tuple[list[float], list[float]]]:
    """``{perturbation: (samples_k, return_k)}`` of an mbmpo run folder's evaluations with evaluation seed
    ``seed`` and real-data step ``adaptation_lr``: None for the training inner step (no ``--adaptation-lr``),
    a number, or ``"chosen"`` for `chosen_adaptation_lr` of the folder (the training step when none was
    chosen). ``none`` is the training dynamics."""
    results = evaluations(run_dir)
    if adaptation_lr == "chosen":
        adaptation_lr = chosen_adaptation_lr(results)
    curves = {}
    for result in results:
        options = result["options"]
        step = options.get("adaptation_lr")
        if options.get("seed", 0) != seed or (None if step is None else float(step)) != adaptation_lr:
            continue
        rounds = _rounds(result)
        perturbation = str(options.get("perturb") or "none")
        curves[perturbation] = ([result[f"samples_{k}"] for k in rounds], [result[f"return_{k}"] for k in rounds])
    return curves


def ood_summary(run_dirs: list[str | Path], fraction: float = 0.9) -> list[dict[str, Any]]:
    """Per (alpha, perturbation), each run with its chosen real-data step (`chosen_adaptation_lr`, else the
    training step; ``adaptation_lr`` names them): the mean over the runs (seeds) of the return before
    adaptation (``return_0``) and after the last round (``return_last``), and of the real steps each run needed
    to reach ``fraction``
    of its own in-distribution return (``return_0`` of its ``none`` evaluation; `samples_to_fraction`), with
    the number of runs that never reached it (``not_reached``, excluded from ``samples_to_fraction``, which is
    ``inf`` when no run reached it). Runs without a ``none`` evaluation are skipped."""
    from bilevel.runs.folder import RunFolder

    cells: dict[tuple[float, str], list[tuple[float, float, float, float | None]]] = {}
    for run_dir in run_dirs:
        _, config = RunFolder(run_dir).read_config()
        step = chosen_adaptation_lr(evaluations(run_dir))
        curves = evaluation_curves(run_dir, step)
        if "none" not in curves:
            continue
        reference = curves["none"][1][0]
        for perturbation, (samples, returns) in curves.items():
            cells.setdefault((float(config["attention_weight"]), perturbation), []).append(
                (returns[0], returns[-1], samples_to_fraction(samples, returns, reference, fraction), step))
    rows = []
    for (alpha, perturbation), values in sorted(cells.items()):
        reached = [n for _, _, n, _ in values if math.isfinite(n)]
        steps = sorted({"training" if v[3] is None else f"{v[3]:g}" for v in values})
        rows.append({"alpha": alpha, "perturbation": perturbation, "runs": len(values),
                     "adaptation_lr": ", ".join(steps),
                     "return_0": float(np.mean([v[0] for v in values])),
                     "return_last": float(np.mean([v[1] for v in values])),
                     "samples_to_fraction": float(np.mean(reached)) if reached else math.inf,
                     "not_reached": len(values) - len(reached)})
    return rows


def ood_markdown(rows: list[dict[str, Any]], fraction: float = 0.9) -> str:
    """`ood_summary` rows as a Markdown table."""
    lines = [f"| alpha | perturbation | runs | real-data step | return before adaptation | return after the last "
             f"round | real steps to {fraction:.0%} of the in-distribution return |",
             "|---:|---|---:|---|---:|---:|---|"]
    for row in rows:
        steps = "not reached" if math.isinf(row["samples_to_fraction"]) else f"{row['samples_to_fraction']:,.0f}"
        if row["not_reached"] and not math.isinf(row["samples_to_fraction"]):
            steps += f" ({row['not_reached']} of {row['runs']} runs not reached)"
        lines.append(f"| {row['alpha']:g} | {row['perturbation']} | {row['runs']} | {row['adaptation_lr']} | "
                     f"{row['return_0']:.1f} | "
                     f"{row['return_last']:.1f} | {steps} |")
    return "\n".join(lines) + "\n"


def plot_mbmpo(run_dirs: list[str | Path], out_dir: str | Path, *, x_max: float | None = None,
               last: int = 3) -> list[Path]:
    """The minimum-attention figures of ``run_dirs`` (mbmpo runs, any alphas and seeds) into ``out_dir``:

    - ``alpha_sweep.png``: return, ``jacobian_sq``, ``jerk_sq`` and ``energy`` against alpha, each run's mean
      over its last ``last`` iterations with ``env_steps <= x_max`` (all, without ``x_max``), then mean and
      standard deviation over seeds;
    - ``adaptation.png``: return against adaptation samples from each run's ``eval*.json`` (written by
      ``bilevel eval RUN --perturb P --out eval-P.json``, one file per evaluation; files
      with the same contents count once), evaluation seed 0 with the run's chosen real-data step
      (`evaluation_curves`), one panel per perturbation, one line per alpha (mean over seeds);
    - ``ood.md``: `ood_summary` as a table (runs with a ``none`` evaluation);
    - ``jacobian_heatmap.png``: `mean_abs_jacobian` (action x state) of the meta-policy for the smallest and
      the largest alpha among the runs with a checkpoint or an evaluation state (records archived since
      2026-12-03 hold one), the first such run of each.
    """
    from bilevel.runs.folder import RunFolder, final_mean
    from bilevel.runs.loop import load_learner
    from bilevel.runs.plot import pyplot, save_figure, seeds_label

    plt = pyplot()
    folders = [RunFolder(d) for d in run_dirs]
    by_alpha: dict[float, list[RunFolder]] = {}
    for folder in folders:
        algorithm, config = folder.read_config()
        if algorithm != "mbmpo":
            raise ValueError(f"{str(folder.path)!r} is a {algorithm!r} run, not mbmpo")
        by_alpha.setdefault(float(config["attention_weight"]), []).append(folder)
    alphas = sorted(by_alpha)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    keys = ("return", "jacobian_sq", "jerk_sq", "energy")
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.5))
    for ax, key in zip(axes, keys, strict=True):
        finals = [[final_mean(f.read_metrics(), key, last, x_max=x_max) for f in by_alpha[a]] for a in alphas]
        if any(value is None for values in finals for value in values):
            within = "" if x_max is None else f" with env_steps <= {x_max:g}"
            raise ValueError(f"a run has no {key!r} row{within}")
        ax.errorbar(range(len(alphas)), [np.mean(v) for v in finals], yerr=[np.std(v) for v in finals],
                    marker="o", capsize=3)
        ax.set_xticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("alpha")
        ax.set_title(key)
        ax.grid(alpha=0.3)
    written.append(save_figure(fig, out_dir / "alpha_sweep.png"))

    curves: dict[str, dict[float, list[tuple[list[float], list[float]]]]] = {}
    for alpha in alphas:
        for folder in by_alpha[alpha]:
            for perturbation, curve in evaluation_curves(folder.path).items():
                curves.setdefault(perturbation, {}).setdefault(alpha, []).append(curve)
    if curves:
        rows = ood_summary([folder.path for folder in folders])
        if rows:
            written.append(out_dir / "ood.md")
            written[-1].write_text(ood_markdown(rows))
        fig, axes = plt.subplots(1, len(curves), figsize=(4.5 * len(curves), 3.5), squeeze=False)
        for ax, (perturbation, per_alpha) in zip(axes[0], sorted(curves.items()), strict=True):
            for alpha, runs in sorted(per_alpha.items()):
                length = min(len(x) for x, _ in runs)
                ax.plot(runs[0][0][:length], np.mean([y[:length] for _, y in runs], axis=0), marker="o",
                        label=seeds_label(f"alpha={alpha:g}", len(runs)))
            ax.set_title(perturbation)
            ax.set_xlabel("real adaptation steps")
            ax.set_ylabel("return")
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
        written.append(save_figure(fig, out_dir / "adaptation.png"))

    with_policy = {a: [f for f in by_alpha[a] if f.checkpoint_path.exists() or f.evaluation_state_path.exists()]
                   for a in alphas}
    alphas_with_policy = [a for a in alphas if with_policy[a]]
    if not alphas_with_policy:
        return written
    shown = sorted({alphas_with_policy[0], alphas_with_policy[-1]})
    maps = []
    for alpha in shown:
        _, learner = load_learner(with_policy[alpha][0].path, device="cpu", evaluation_only=True)
        maps.append(mean_abs_jacobian(learner).numpy())
        learner.close()
    fig, axes = plt.subplots(1, len(maps), figsize=(5 * len(maps), 3.2), squeeze=False, layout="constrained")
    vmax = max(m.max() for m in maps)
    for ax, alpha, jacobian in zip(axes[0], shown, maps, strict=True):
        image = ax.imshow(jacobian, vmin=0, vmax=vmax, cmap="viridis", aspect="auto")
        ax.set_title(f"mean |da/ds|, alpha={alpha:g}")
        ax.set_xlabel("state dim (normalised)")
        ax.set_ylabel("action dim")
    fig.colorbar(image, ax=axes[0].tolist())
    written.append(save_figure(fig, out_dir / "jacobian_heatmap.png", tight_layout=False))
    return written
