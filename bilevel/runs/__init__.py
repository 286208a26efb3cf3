"""Runs: the learner interface, the run folder, the training loop and plots."""

from bilevel.runs.folder import RunFolder, atomic_save
from bilevel.runs.learner import ALGORITHMS, Learner, RunConfig, derive_seed, get_algorithm, register, resolve_device
from bilevel.runs.loop import evaluate_run, load_learner, make_config, seed_everything, train

__all__ = [
    "ALGORITHMS",
    "Learner",
    "RunConfig",
    "RunFolder",
    "atomic_save",
    "derive_seed",
    "evaluate_run",
    "get_algorithm",
    "load_learner",
    "make_config",
    "register",
    "resolve_device",
    "seed_everything",
    "train",
]
