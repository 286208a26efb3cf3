"""A run folder: what a user gets back from ``bilevel train``.

    RUN/
      config.json          the algorithm name and every config field
      metrics.csv          one row per iteration, flushed as it is written
      events.*             TensorBoard events (when tensorboard is installed)
      checkpoints/last.pt  the latest checkpoint, replaced atomically
      evaluation_state.pt  what ``bilevel eval`` needs of the latest checkpoint (`Learner.evaluation_state`),
                           written beside it by learners that define one
      eval.json            the latest ``bilevel eval`` result
      plots/               figures from ``bilevel plot``

A *record* of a run (``archive``) keeps its config.json, metrics.csv, evaluation JSONs and
evaluation state, not its checkpoints: small enough to commit beside a report, and still a run
folder for ``bilevel report``, ``bilevel plot`` and, where it has an evaluation state, ``bilevel eval``
(never for ``--resume``).

Every file that a crash could leave half-written is written to a temporary file in
the same folder and moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any

import torch

try:
    import fcntl
except ImportError:  # not on Windows: no lock there
    fcntl = None  # type: ignore[assignment]

__all__ = ["MetricsWriter", "RunFolder", "archive", "atomic_save", "atomic_write_text", "final_mean", "load_saved"]


def _atomic_write(path: Path, mode: str, write: Callable[[IO[Any]], object]) -> None:
    """``write`` into a temporary file in ``path``'s folder (opened with ``mode``), flushed and synced to
    disk, then moved onto ``path`` with ``os.replace``; on any failure the temporary file is removed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    """The process's umask (``mkstemp`` creates files 0600 whatever it is; a run's files should be as readable
    as any other file the user writes)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_saved(path: Path, map_location: Any = None) -> Any:
    """``torch.load`` of a file this package saved (a checkpoint, an evaluation state); a file that cannot be
    read (truncated, corrupted, not a torch file) is a ``ValueError`` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=False)
    except (RuntimeError, EOFError, OSError, pickle.UnpicklingError) as error:
        raise ValueError(f"cannot read {str(path)!r}: {error}") from None


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader sees the old file or the new one."""
    _atomic_write(path, "w", lambda handle: handle.write(text))


def atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace``."""
    _atomic_write(path, "wb", lambda handle: torch.save(obj, handle))


class MetricsWriter:
    """Append-only CSV of metric rows; new metric names widen the header (the file is
    rewritten once, atomically). ``truncate(iteration)`` drops rows after a checkpoint
    so that a resumed run does not repeat them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, str]] = []
        self.columns: list[str] = []
        if path.exists():
            with path.open(newline="") as handle:
                reader = csv.DictReader(handle)
                self.columns = list(reader.fieldnames or [])
                self.rows = list(reader)

    def _rewrite(self) -> None:
        lines = [",".join(self.columns)]
        lines += [",".join(str(row.get(c, "")) for c in self.columns) for row in self.rows]
        atomic_write_text(self.path, "\n".join(lines) + "\n")

    def truncate(self, iteration: int) -> None:
        self.rows = [row for row in self.rows if int(float(row["iteration"])) <= iteration]
        self._rewrite()

    def append(self, row: dict[str, float]) -> None:
        text_row = {k: _format(v) for k, v in row.items()}
        new_columns = [k for k in row if k not in self.columns]
        self.rows.append(text_row)
        if new_columns or not self.path.exists():
            self.columns += new_columns
            self._rewrite()
            return
        with self.path.open("a") as handle:
            handle.write(",".join(text_row.get(c, "") for c in self.columns) + "\n")
            handle.flush()
            os.fsync(handle.fileno())


def _format(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


class RunFolder:
    """Paths and files of one run."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def checkpoint_path(self) -> Path:
        return self.path / "checkpoints" / "last.pt"

    @property
    def evaluation_state_path(self) -> Path:
        return self.path / "evaluation_state.pt"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.csv"

    @property
    def plots(self) -> Path:
        return self.path / "plots"

    def exists(self) -> bool:
        return self.config_path.exists()

    def is_run(self) -> bool:
        """Whether ``config.json`` is a run's (an ``algorithm`` and a ``config``), not some other project's."""
        try:
            data = json.loads(self.config_path.read_text())
        except (OSError, ValueError):
            return False
        return (isinstance(data, dict) and isinstance(data.get("algorithm"), str)
                and isinstance(data.get("config"), dict))

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold an exclusive lock on the folder (``flock`` on ``.lock``, released by the OS if the process dies;
        the file is removed on the way out), so that two processes never train into one folder. A folder this
        call creates is removed again if the body raises before writing anything into it."""
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"run folder {str(self.path)!r} is a file")
        created = not self.path.exists()
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / ".lock"
        with lock_path.open("a") as handle:
            if fcntl is not None:
                try:
                    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    raise ValueError(f"run folder {str(self.path)!r} is in use by another process") from None
            failed = True
            try:
                yield
                failed = False
            finally:
                lock_path.unlink(missing_ok=True)
                if failed and created and not any(self.path.iterdir()):
                    self.path.rmdir()

    def clear(self) -> None:
        """Remove every entry of a run folder but its hidden ones (the lock, a sweep's fault marker), refusing a
        folder that is not a run's."""
        if not self.is_run():
            raise ValueError(f"{str(self.path)!r} has a config.json that is not a run's; not deleting it")
        for entry in self.path.iterdir():
            if entry.name.startswith("."):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    def write_config(self, algorithm: str, config: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, json.dumps({"algorithm": algorithm, "config": config}, indent=2) + "\n")

    def read_config(self) -> tuple[str, dict[str, Any]]:
        if not self.config_path.exists():
            raise ValueError(f"{str(self.path)!r} is not a run folder: it has no config.json")
        if not self.is_run():
            raise ValueError(f"{str(self.config_path)!r} is not a run's config: it needs JSON with an "
                             "`algorithm` and a `config`")
        data = json.loads(self.config_path.read_text())
        return data["algorithm"], data["config"]

    def read_metrics(self) -> list[dict[str, float]]:
        rows = MetricsWriter(self.metrics_path).rows
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in rows]

    def write_json(self, name: str, data: dict[str, Any]) -> None:
        atomic_write_text(self.path / name, json.dumps(data, indent=2) + "\n")


def metric_series(
    rows: Iterable[dict[str, float]], x: str, y: str, x_max: float | None = None
) -> tuple[list[float], list[float]]:
    """The (x, y) pairs of the rows that have both metrics (and ``x <= x_max`` where given)."""
    pairs = [(row[x], row[y]) for row in rows if x in row and y in row and (x_max is None or row[x] <= x_max)]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def final_mean(rows: Iterable[dict[str, float]], metric: str, last: int, *, x: str = "env_steps",
               x_max: float | None = None) -> float | None:
    """The mean of the last ``last`` values of ``metric`` (among the rows with ``x <= x_max``, where
    given): a run's final value at a budget. None when no such row has the metric."""
    values = [row[metric] for row in rows if metric in row and (x_max is None or row.get(x, math.inf) <= x_max)]
    return sum(values[-last:]) / len(values[-last:]) if values else None


def archive(run: str | Path, records: str | Path, *, allow_shorter: bool = False) -> Path:
    """Copy the record of ``run`` (config.json, metrics.csv, ``*.json`` evaluations, evaluation_state.pt)
    to ``records/<run's name>/``, each file atomically; the record's other files are kept, so
    archiving again after more iterations updates it. A run with fewer metrics rows than the record
    already holds (a run restarted from scratch, or stopped before it caught up) is refused unless
    ``allow_shorter``, so that an interrupted rebuild cannot shorten a record. Returns the record's folder."""
    source = RunFolder(run)
    if not source.exists():
        raise ValueError(f"{str(source.path)!r} is not a run folder: it has no config.json")
    record = Path(records) / source.path.resolve().name
    if record.resolve() == source.path.resolve():
        raise ValueError(f"the record of {str(source.path)!r} would overwrite the run itself")
    run_rows, record_rows = len(source.read_metrics()), len(RunFolder(record).read_metrics())
    if run_rows < record_rows and not allow_shorter:
        raise ValueError(f"{str(source.path)!r} has {run_rows} metrics rows and its record {str(record)!r} "
                         f"{record_rows}: archiving would shorten the record (`--allow-shorter`, or "
                         "allow_shorter=True, to do so)")
    for file in [*sorted(source.path.glob("*.json")), source.metrics_path]:
        if file.exists():
            atomic_write_text(record / file.name, file.read_text())
    if source.evaluation_state_path.exists():
        _atomic_write(record / source.evaluation_state_path.name, "wb",
                      lambda handle: handle.write(source.evaluation_state_path.read_bytes()))
    return record
