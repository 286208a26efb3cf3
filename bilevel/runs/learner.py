"""The interface an algorithm implements to run from the `bilevel` command.

An algorithm is a `Learner` subclass with a config dataclass (a `RunConfig` subclass
with a docstring on every field) and three things: `step` (one iteration, returning
its metrics), `state_dict`/`load_state_dict` (everything needed to continue exactly),
and `evaluate`. The runner (`bilevel.runs.loop`) owns the run folder, seeding,
checkpoints, metrics files and the progress bar; a learner never touches files.

Exact resumption: a learner draws all of its randomness from generators it owns
and saves (``state_dict``), or from seeds derived from ``(config.seed, iteration)``
with `derive_seed`, and resets its environments at iteration boundaries (or saves
their state). Then ``run 2k iterations`` and ``run k, stop, resume, run k`` give
the same parameters on CPU.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

__all__ = ["ALGORITHMS", "Learner", "RunConfig", "derive_seed", "get_algorithm", "register", "resolve_device"]


@dataclasses.dataclass
class RunConfig:
    """Fields every run has; an algorithm's config subclasses this."""

    env: str = ""
    """The environment or task family (``bilevel list`` shows the names)."""
    seed: int = 0
    """Seeds torch, NumPy, Python and the environments."""
    iterations: int = 100
    """The training budget in iterations of `Learner.step`."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``."""
    checkpoint_every: int = 10
    """Iterations between checkpoints (the last iteration always checkpoints)."""
    threads: int = 1
    """torch intra-op CPU threads while training or evaluating (0: torch's default, one per core). One
    suits the small networks of these methods: on a shared machine more threads only contend."""

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field with a bad value. A NaN in any float field is bad
        (every comparison with it is False, so a range check alone lets it through)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, float) and math.isnan(value):
                raise ValueError(f"`{field.name}` must be a number; got nan")
        if self.iterations < 1:
            raise ValueError(f"`iterations` must be >= 1; got {self.iterations}")
        if self.checkpoint_every < 1:
            raise ValueError(f"`checkpoint_every` must be >= 1; got {self.checkpoint_every}")
        if self.seed < 0:
            raise ValueError(f"`seed` must be >= 0; got {self.seed}")
        if self.threads < 0:
            raise ValueError(f"`threads` must be >= 0; got {self.threads}")


class Learner(abc.ABC):
    """One algorithm's training state and its iteration.

    ``iteration`` counts completed calls of `step`; ``env_steps`` the real
    environment transitions used so far (reported on every metrics row)."""

    Config: ClassVar[type[RunConfig]] = RunConfig
    envs: ClassVar[tuple[str, ...]] = ()
    """The env names this learner accepts (shown by ``bilevel list``)."""

    def __init__(self, config: RunConfig, device: torch.device) -> None:
        config.validate()
        self.config = config
        self.device = device
        self.iteration = 0
        self.env_steps = 0

    @abc.abstractmethod
    def step(self) -> dict[str, float]:
        """Run one iteration and return its metrics (floats; ``return`` by convention
        the mean undiscounted episode return of the iteration's evaluation or data)."""

    @abc.abstractmethod
    def evaluate(self, **options: Any) -> dict[str, float]:
        """Evaluate the current parameters; ``options`` come from ``bilevel eval``."""

    @abc.abstractmethod
    def learner_state(self) -> dict[str, Any]:
        """Parameters, optimiser states, generators, buffers: all tensors or plain data."""

    @abc.abstractmethod
    def load_learner_state(self, state: dict[str, Any]) -> None:
        """Restore what `learner_state` returned."""

    def evaluation_state(self) -> dict[str, Any] | None:
        """The part of `learner_state` that `evaluate` reads (a meta-policy and its observation normaliser,
        say), small enough to keep in a run's record so that ``bilevel eval`` works on the record after the
        checkpoint is gone. None (the default): `evaluate` needs the whole state."""
        return None

    def load_evaluation_state(self, state: dict[str, Any]) -> None:
        """Restore what `evaluation_state` returned; the rest of the learner stays as built."""
        raise NotImplementedError(f"{type(self).__name__} keeps no evaluation state")

    def state_dict(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "env_steps": self.env_steps, "learner": self.learner_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration = state["iteration"]
        self.env_steps = state["env_steps"]
        self.load_learner_state(state["learner"])

    def close(self) -> None:  # noqa: B027
        """Release environments and workers."""

    def analysis_arrays(self) -> dict[str, Any]:
        """Tensors from the latest evaluation that the algorithm's own figures (`plot_runs`) need,
        e.g. MATT's actor and attention features; the runner saves them with every checkpoint into
        ``RUN/analysis/iteration-NNNNNN.pt`` together with ``iteration`` and ``env_steps``. None by default."""
        return {}

    @staticmethod
    def plot_runs(run_dirs: list[Path], out_dir: Path, *, x_max: float | None = None) -> list[Path]:
        """The algorithm's own figures of ``run_dirs`` (all trained by this algorithm) into
        ``out_dir``, beyond the learning curves every run gets; ``bilevel plot`` calls it. Figures drawn
        from the metrics use only the rows with ``env_steps <= x_max`` where it is given.
        Returns the files written (none by default)."""
        return []


ALGORITHMS: dict[str, type[Learner]] = {}


def register(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator: make a `Learner` available as ``bilevel train NAME``."""

    def decorator(cls: type[Learner]) -> type[Learner]:
        if name in ALGORITHMS and ALGORITHMS[name] is not cls:
            raise ValueError(f"algorithm name {name!r} is already registered to {ALGORITHMS[name].__name__}")
        ALGORITHMS[name] = cls
        return cls

    return decorator


def get_algorithm(name: str) -> type[Learner]:
    import bilevel.algorithms  # noqa: F401  (registers the built-in algorithms)

    if name not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {name!r}; choose one of {sorted(ALGORITHMS)}")
    return ALGORITHMS[name]


def derive_seed(*keys: int) -> int:
    """A 63-bit seed determined by ``keys`` (e.g. ``(config.seed, iteration, purpose)``)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a named device must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"`device` {name!r} is not a device name ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"`device` {name!r} is not available: torch sees no CUDA device")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"`device` {name!r} is not available: {torch.cuda.device_count()} CUDA devices")
    elif device.type != "cpu":
        raise ValueError(f"`device` must be auto, cpu or cuda[:N]; got {name!r}")
    return device
