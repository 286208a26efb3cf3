"""A replay buffer of transitions held in preallocated tensors on the learner's device."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["ReplayBuffer", "Transitions"]

ArrayLike = Tensor | np.ndarray | Sequence[Any]

_FIELDS = ("obs", "actions", "rewards", "next_obs", "terminated", "truncated")


@dataclass(frozen=True)
class Transitions:
    """A batch of ``N`` transitions ``obs --actions--> next_obs``.

    Attributes:
        obs: ``[N, *obs_shape]``.
        actions: ``[N, *action_shape]``.
        rewards: ``[N]``.
        next_obs: ``[N, *obs_shape]``, the true successor (the final observation at an
            episode's end).
        terminated: ``[N]`` bool, a terminal state was reached: the target is ``r`` alone.
        truncated: ``[N]`` bool, the episode was cut by a time limit: still bootstrap
            from ``next_obs``. Kept for logging and for methods that need it.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor
    truncated: Tensor


class ReplayBuffer:
    """A ring buffer of ``capacity`` transitions on ``device``; once full, each new
    transition overwrites the oldest.

    Args:
        capacity: the number of transitions kept.
        obs_shape: shape of one observation.
        action_shape: shape of one action (``()`` for a discrete action).
        obs_dtype: dtype of observations; the default dtype when None.
        action_dtype: dtype of actions; the default dtype when None.
        device: where the storage lives and samples are returned.
    """

    def __init__(
        self,
        capacity: int,
        obs_shape: Sequence[int],
        action_shape: Sequence[int],
        *,
        obs_dtype: torch.dtype | None = None,
        action_dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"`capacity` must be a positive integer; got {capacity!r}")
        self.device = torch.device(device)
        float_dtype = torch.get_default_dtype()
        obs_dtype = obs_dtype or float_dtype
        self._storage = {
            "obs": torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=self.device),
            "actions": torch.zeros(
                (capacity, *action_shape), dtype=action_dtype or float_dtype, device=self.device
            ),
            "rewards": torch.zeros(capacity, dtype=float_dtype, device=self.device),
            "next_obs": torch.zeros((capacity, *obs_shape), dtype=obs_dtype, device=self.device),
            "terminated": torch.zeros(capacity, dtype=torch.bool, device=self.device),
            "truncated": torch.zeros(capacity, dtype=torch.bool, device=self.device),
        }
        self._position = 0
        self._size = 0

    @property
    def capacity(self) -> int:
        """The number of transitions the buffer holds when full."""
        return self._storage["rewards"].shape[0]

    def __len__(self) -> int:
        """The number of transitions stored, at most ``capacity``."""
        return self._size

    def add(
        self,
        obs: ArrayLike,
        actions: ArrayLike,
        rewards: ArrayLike,
        next_obs: ArrayLike,
        terminated: ArrayLike,
        truncated: ArrayLike,
    ) -> None:
        """Store ``N`` transitions given as arrays or tensors with a leading axis of ``N``
        (shapes as in `Transitions`). Of more than ``capacity`` only the last ``capacity``
        are kept."""
        batch = self._as_batch(obs, actions, rewards, next_obs, terminated, truncated)
        count = batch["rewards"].shape[0]
        kept = min(count, self.capacity)
        slots = (self._position + torch.arange(kept, device=self.device)) % self.capacity
        for name, values in batch.items():
            self._storage[name][slots] = values[count - kept :]
        self._position = (self._position + kept) % self.capacity
        self._size = min(self._size + kept, self.capacity)

    def add_vector_step(
        self,
        obs: ArrayLike,
        actions: ArrayLike,
        rewards: ArrayLike,
        next_obs: ArrayLike,
        terminated: ArrayLike,
        truncated: ArrayLike,
        is_reset_step: ArrayLike,
    ) -> Tensor:
        """Store one step of a vector environment in next-step autoreset mode, dropping the
        sub-environments whose step was an autoreset (action ignored, not a transition).

        ``obs`` is what the policy saw, the other arguments are what ``envs.step(actions)``
        returned, each ``[num_envs, ...]``. ``is_reset_step`` is ``[num_envs]`` bool: the
        value this method returned for the previous step, all False right after
        ``envs.reset()``.

        Returns:
            ``[num_envs]`` bool, ``terminated | truncated``: the sub-environments whose
            next step is an autoreset, to pass back with the next step.
        """
        batch = self._as_batch(obs, actions, rewards, next_obs, terminated, truncated)
        is_reset_step = torch.as_tensor(is_reset_step, dtype=torch.bool, device=self.device)
        if is_reset_step.shape != batch["rewards"].shape:
            raise ValueError(
                f"`is_reset_step` must have shape {tuple(batch['rewards'].shape)}; "
                f"got {tuple(is_reset_step.shape)}"
            )
        real = ~is_reset_step
        self.add(*(values[real] for values in batch.values()))
        return batch["terminated"] | batch["truncated"]

    def sample(self, batch_size: int, generator: torch.Generator | None = None) -> Transitions:
        """``batch_size`` transitions drawn uniformly with replacement, on ``device``.

        Indices are drawn by ``torch.randint`` with ``generator`` (on the generator's
        device), so the same generator state gives the same sample."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer; got {batch_size!r}")
        if self._size == 0:
            raise ValueError("cannot sample from an empty replay buffer")
        index_device = self.device if generator is None else generator.device
        indices = torch.randint(self._size, (batch_size,), generator=generator, device=index_device)
        indices = indices.to(self.device)
        return Transitions(**{name: self._storage[name][indices] for name in _FIELDS})

    def state_dict(self) -> dict[str, Any]:
        """A copy of the buffer's contents and write position, for checkpoints."""
        stored = {name: self._storage[name][: self._size].clone() for name in _FIELDS}
        return {"capacity": self.capacity, "position": self._position, "size": self._size, **stored}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore contents saved by `state_dict` into a buffer built with the same
        capacity, shapes and dtypes (onto this buffer's device)."""
        if state["capacity"] != self.capacity:
            raise ValueError(
                f"`state` holds a buffer of capacity {state['capacity']}; this one has {self.capacity}"
            )
        size = state["size"]
        for name in _FIELDS:
            expected = (size, *self._storage[name].shape[1:])
            if tuple(state[name].shape) != expected:
                raise ValueError(
                    f"`state[{name!r}]` must have shape {expected}; got {tuple(state[name].shape)}"
                )
            self._storage[name][:size] = state[name].to(self.device)
        position = state["position"]
        full = size == self.capacity
        if not (0 <= size <= self.capacity and 0 <= position < self.capacity and (full or position == size)):
            raise ValueError(f"`state` has write position {position} and size {size}, impossible for capacity "
                             f"{self.capacity}")
        self._position = position
        self._size = size

    def _as_batch(self, *values: ArrayLike) -> dict[str, Tensor]:
        """The six transition fields as tensors on ``device`` in storage dtypes, shapes checked; the done
        flags must be bool (or integer 0/1), never a float that a cast would turn into True."""
        for name, value in zip(_FIELDS, values, strict=True):
            if name in ("terminated", "truncated"):
                flags = torch.as_tensor(value)
                if flags.is_floating_point() or flags.is_complex() or (flags.dtype != torch.bool and bool(
                        ((flags != 0) & (flags != 1)).any())):
                    raise ValueError(f"`{name}` must hold bool flags; got dtype {flags.dtype}")
        batch = {
            name: torch.as_tensor(value, dtype=self._storage[name].dtype, device=self.device)
            for name, value in zip(_FIELDS, values, strict=True)
        }
        count = batch["rewards"].shape[0] if batch["rewards"].dim() == 1 else -1
        for name, tensor in batch.items():
            expected = (count, *self._storage[name].shape[1:])
            if tuple(tensor.shape) != expected:
                raise ValueError(
                    f"`{name}` must have shape {('N', *expected[1:])} with N the length of `rewards`; "
                    f"got {tuple(tensor.shape)}"
                )
        return batch
