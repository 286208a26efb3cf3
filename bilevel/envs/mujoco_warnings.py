"""MuJoCo's warnings as Python warnings.

MuJoCo prints each warning of its C library to stderr, every time: Gymnasium's v5 locomotion XMLs
use ``<compiler settotalmass=...>``, which MuJoCo 4 deprecates, so every env construction (each
evaluation, each worker) printed the same paragraph again. `forward_mujoco_warnings` routes them to
``warnings.warn(message, MujocoWarning)``, where Python's filters apply: shown once per process by
default, silenced with ``warnings.filterwarnings("ignore", category=MujocoWarning)``. An exception cannot
cross MuJoCo's C frames (the process aborts), so under an ``"error"`` filter the warning is written to
stderr instead of raised.
"""

from __future__ import annotations

import sys
import warnings

__all__ = ["MujocoWarning", "forward_mujoco_warnings"]


class MujocoWarning(UserWarning):
    """A warning raised by MuJoCo's C library (``mju_warning``)."""


def _warn(message: str) -> None:
    try:
        warnings.warn(message, MujocoWarning, stacklevel=2)
    except Exception:
        sys.stderr.write(f"MujocoWarning (an error filter matched; it cannot be raised through MuJoCo): {message}\n")


def forward_mujoco_warnings() -> bool:
    """Install the forwarding handler as MuJoCo's ``mju_user_warning`` unless a handler is already
    installed (a user's own is kept); returns whether MuJoCo's warnings now go through ``warnings``."""
    try:
        import mujoco
    except ImportError:
        return False
    current = mujoco.get_mju_user_warning()
    if current is None:
        mujoco.set_mju_user_warning(_warn)
        return True
    return current is _warn
