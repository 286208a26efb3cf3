"""Argument checks shared by the core: each raises before any work, naming the argument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor


def scalar_valued(fn: Callable[..., Any], name: str) -> Callable[..., Tensor]:
    """Wrap ``fn`` so that a result other than a 0-dim tensor raises ``ValueError``
    naming ``name`` (``torch.func.grad`` would raise a RuntimeError that does not)."""

    def checked(*args: Any) -> Tensor:
        value = fn(*args)
        if not isinstance(value, Tensor) or value.ndim != 0:
            shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
            raise ValueError(f"`{name}` must return a 0-dim tensor; got {shape}")
        return value

    return checked
