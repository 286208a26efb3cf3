"""Running a `Learner`: seeding, the iteration loop, checkpoints, resume and evaluation."""

from __future__ import annotations

import contextlib
import dataclasses
import random
import time
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bilevel.runs.folder import MetricsWriter, RunFolder, atomic_save, load_saved
from bilevel.runs.learner import Learner, RunConfig, get_algorithm, resolve_device

__all__ = ["ANALYSIS_DIR", "evaluate_run", "load_learner", "make_config", "seed_everything", "torch_threads", "train",
           "write_evaluation_state"]

ANALYSIS_DIR = "analysis"
"""The run subfolder holding `Learner.analysis_arrays` saved at checkpoints, one
``iteration-NNNNNN.pt`` file per checkpoint."""


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``torch.set_num_threads(threads)`` (0: leave torch's setting), then restore it."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (legacy global, which third-party code draws from) and
    torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restore `_rng_state`; its byte tensors may arrive on the learner's device (``torch.load``'s
    ``map_location``), and the generators take CPU ones."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([device_state.cpu() for device_state in state["cuda"]])


def _fits(value: Any, hint: Any) -> bool:
    """Whether ``value`` is of the config field type ``hint`` (bool, int, float, str, a tuple, a union of them);
    other hints accept anything. An int fits a float field; a bool fits only a bool field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, arm) for arm in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if origin is tuple or hint is tuple:
        return isinstance(value, (tuple, list))
    return True


def _check_types(config_class: type[RunConfig], values: dict[str, Any]) -> None:
    hints = typing.get_type_hints(config_class)
    for key, value in values.items():
        if not _fits(value, hints[key]):
            raise ValueError(f"`{key}` must be {getattr(hints[key], '__name__', hints[key])}; got {value!r}")


def make_config(algorithm: str, values: dict[str, Any]) -> RunConfig:
    """Build ``algorithm``'s config from ``values``; an unknown key or a bad value raises
    ``ValueError`` naming it."""
    config_class = get_algorithm(algorithm).Config
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config key(s) {unknown} for {algorithm!r}; known: {sorted(known)}")
    _check_types(config_class, values)
    config = config_class(**values)
    config.validate()
    envs = get_algorithm(algorithm).envs
    if envs and config.env not in envs:
        raise ValueError(f"unknown env {config.env!r} for {algorithm!r}; choose one of {list(envs)}")
    return config


def _tensorboard(folder: RunFolder, purge_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder.path), purge_step=purge_step)


def write_evaluation_state(folder: RunFolder, learner: Learner) -> bool:
    """Save ``learner``'s `Learner.evaluation_state` (with its iteration and env steps) to the run's
    ``evaluation_state.pt``; False, and nothing written, for a learner that keeps none."""
    state = learner.evaluation_state()
    if state is None:
        return False
    atomic_save({"iteration": learner.iteration, "env_steps": learner.env_steps, "learner": state},
                folder.evaluation_state_path)
    return True


def _checkpoint(folder: RunFolder, learner: Learner) -> None:
    atomic_save({"state": learner.state_dict(), "rng": _rng_state()}, folder.checkpoint_path)
    write_evaluation_state(folder, learner)
    arrays = learner.analysis_arrays()
    if arrays:
        path = folder.path / ANALYSIS_DIR / f"iteration-{learner.iteration:06d}.pt"
        atomic_save({"iteration": learner.iteration, "env_steps": learner.env_steps, **arrays}, path)


def _build(algorithm: str, config: RunConfig) -> Learner:
    device = resolve_device(config.device)
    seed_everything(config.seed)
    return get_algorithm(algorithm)(config, device)


def train(
    algorithm: str,
    config: RunConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool | None = None,
    after_iteration: Callable[[Learner], None] | None = None,
) -> Learner:
    """Train ``algorithm`` into ``run_dir`` until ``config.iterations``.

    With ``resume=True`` the run continues from its last checkpoint (its saved config
    with ``config.iterations`` as the new budget, which a larger budget rewrites into config.json so that
    a later resume without ``--iterations`` continues to it) and drops metric rows written after
    that checkpoint. Without it, an existing run folder is an error unless
    ``overwrite=True``, which empties it (never a folder whose config.json is not a run's),
    after the device is known to exist. The folder is locked while training: a second process
    training into it is refused. ``progress=None`` shows the bar only on a terminal.
    ``after_iteration(learner)`` runs after each iteration's metrics and checkpoint.
    torch uses ``config.threads`` CPU threads meanwhile (a resumed run may change it)."""
    folder = RunFolder(run_dir)
    resolve_device(config.device)
    if resume:
        saved_algorithm, saved_values = folder.read_config()
        if saved_algorithm != algorithm:
            raise ValueError(f"run {str(folder.path)!r} trained {saved_algorithm!r}, not {algorithm!r}")
        if not folder.checkpoint_path.exists():
            raise ValueError(f"run {str(folder.path)!r} has no checkpoint to resume from")
        config = make_config(algorithm, {**saved_values, "iterations": config.iterations,
                                          "threads": config.threads})
    with folder.lock():
        if resume and config.iterations > saved_values.get("iterations", 0):
            folder.write_config(algorithm, {**saved_values, "iterations": config.iterations})
        if not resume and folder.exists():
            if not overwrite:
                raise ValueError(f"run folder {str(folder.path)!r} exists; pass --resume to continue it or "
                                 "--overwrite")
            folder.clear()
        with torch_threads(config.threads):
            return _train(algorithm, config, folder, resume, progress, after_iteration)


def _train(algorithm: str, config: RunConfig, folder: RunFolder, resume: bool, progress: bool | None,
           after_iteration: Callable[[Learner], None] | None) -> Learner:
    from tqdm.auto import tqdm

    learner = _build(algorithm, config)
    metrics = MetricsWriter(folder.metrics_path)
    if resume:
        checkpoint = load_saved(folder.checkpoint_path, learner.device)
        learner.load_state_dict(checkpoint["state"])
        _set_rng_state(checkpoint["rng"])
        metrics.truncate(learner.iteration)
    else:
        folder.write_config(algorithm, dataclasses.asdict(config))

    board = _tensorboard(folder, purge_step=learner.iteration + 1 if resume else None)
    bar = tqdm(total=config.iterations, initial=learner.iteration, disable=None if progress is None else not progress,
               desc=f"{algorithm} {config.env}", unit="it")
    try:
        while learner.iteration < config.iterations:
            start, steps_before = time.perf_counter(), learner.env_steps
            row = learner.step()
            learner.iteration += 1
            seconds = time.perf_counter() - start
            row = {"iteration": learner.iteration, "env_steps": learner.env_steps, **row,
                   "seconds": seconds, "env_steps_per_second": (learner.env_steps - steps_before) / seconds}
            metrics.append(row)
            if board is not None:
                for key, value in row.items():
                    board.add_scalar(key, value, learner.iteration)
            if learner.iteration % config.checkpoint_every == 0 or learner.iteration == config.iterations:
                _checkpoint(folder, learner)
            bar.set_postfix({k: f"{row[k]:.3g}" for k in ("return", "env_steps_per_second") if k in row})
            bar.update(1)
            if after_iteration is not None:
                after_iteration(learner)
    finally:
        bar.close()
        if board is not None:
            board.close()
        learner.close()
    return learner


def load_learner(run_dir: str | Path, device: str | None = None, *,
                 evaluation_only: bool = False) -> tuple[str, Learner]:
    """The learner of a run, restored from its last checkpoint. With ``evaluation_only``, a folder without
    a checkpoint (an archived record) that holds an ``evaluation_state.pt`` restores from that instead:
    enough for `Learner.evaluate`, not for training."""
    folder = RunFolder(run_dir)
    algorithm, values = folder.read_config()
    if device is not None:
        values = {**values, "device": device}
    from_evaluation_state = (evaluation_only and not folder.checkpoint_path.exists()
                             and folder.evaluation_state_path.exists())
    if not folder.checkpoint_path.exists() and not from_evaluation_state:
        raise ValueError(f"run {str(folder.path)!r} has no checkpoint"
                         + (" and no evaluation_state.pt" if evaluation_only else ""))
    learner = _build(algorithm, make_config(algorithm, values))
    if from_evaluation_state:
        saved = load_saved(folder.evaluation_state_path, learner.device)
        learner.iteration, learner.env_steps = saved["iteration"], saved["env_steps"]
        learner.load_evaluation_state(saved["learner"])
        return algorithm, learner
    checkpoint = load_saved(folder.checkpoint_path, learner.device)
    learner.load_state_dict(checkpoint["state"])
    return algorithm, learner


def evaluate_run(run_dir: str | Path, options: dict[str, Any], *, device: str | None = None,
                 out_name: str = "eval.json") -> dict[str, float]:
    """Evaluate a run's last checkpoint (or a record's evaluation state) with ``options`` and write
    ``RUN/out_name`` (a plain ``*.json`` file name, so that evaluations run side by side on one run folder
    each keep their own file)."""
    if Path(out_name).name != out_name or not out_name.endswith(".json") or out_name.startswith("."):
        raise ValueError(f"out_name must be a plain file name ending in .json, got {out_name!r}")
    threads = RunFolder(run_dir).read_config()[1].get("threads", RunConfig.threads)
    with torch_threads(threads):
        _, learner = load_learner(run_dir, device, evaluation_only=True)
        try:
            result = learner.evaluate(**options)
        finally:
            learner.close()
    RunFolder(run_dir).write_json(out_name, {"options": options, "iteration": learner.iteration, **result})
    return result
