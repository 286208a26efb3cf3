"""The on-policy batch: time-major tensors of transitions collected from vector environments."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["PER_STEP_FIELDS", "Trajectories"]

PER_STEP_FIELDS = (
    "obs",
    "actions",
    "rewards",
    "next_obs",
    "terminated",
    "truncated",
    "valid",
    "time",
    "log_probs",
)
"""The names of the ``[T, B, ...]`` fields of `Trajectories` (``log_probs`` may be None)."""


def _tensor_field_names(batch: Trajectories) -> list[str]:
    return [field.name for field in dataclasses.fields(batch) if getattr(batch, field.name) is not None]


@dataclass(frozen=True)
class Trajectories:
    """A batch of transitions, time-major: ``T`` steps of ``B`` parallel streams.

    Step ``(t, b)`` is the transition ``obs[t, b] --actions[t, b]--> next_obs[t, b]``
    with reward ``rewards[t, b]``. ``next_obs`` is the true successor: at a step that
    ends an episode it is the final observation of that episode (the one to bootstrap
    from on truncation), never the first observation of the next one.

    Attributes:
        obs: ``[T, B, *obs_shape]`` observation before each step.
        actions: ``[T, B, *action_shape]`` action taken.
        rewards: ``[T, B]`` reward received.
        next_obs: ``[T, B, *obs_shape]`` observation after each step.
        terminated: ``[T, B]`` bool, the MDP reached a terminal state (no bootstrap).
        truncated: ``[T, B]`` bool, the episode was cut by a time limit (bootstrap from
            ``next_obs``).
        valid: ``[T, B]`` bool, False where the step is not a real transition (the
            reset step of next-step autoreset, or padding after an episode's end).
            There ``rewards`` is 0 and both done flags are False; the other fields
            hold whatever the environment returned, or zeros for padding.
        time: ``[T, B]`` int64, the step's index within its episode (0 at the first step).
        log_probs: ``[T, B]`` log-probability of each action under the behaviour policy,
            or None when the policy gave none.
        episode_returns: ``[E]`` undiscounted return of each episode completed in the batch.
        episode_lengths: ``[E]`` int64 length of each of those episodes.
    """

    obs: Tensor
    actions: Tensor
    rewards: Tensor
    next_obs: Tensor
    terminated: Tensor
    truncated: Tensor
    valid: Tensor
    time: Tensor
    log_probs: Tensor | None
    episode_returns: Tensor
    episode_lengths: Tensor

    @property
    def num_steps(self) -> int:
        """``T``, the length of the time axis."""
        return self.rewards.shape[0]

    @property
    def batch_size(self) -> int:
        """``B``, the number of parallel streams."""
        return self.rewards.shape[1]

    @property
    def num_valid(self) -> int:
        """The number of real transitions in the batch."""
        return int(self.valid.sum())

    def to(self, device: torch.device | str) -> Trajectories:
        """A copy with every tensor moved to ``device``."""
        return dataclasses.replace(
            self,
            **{name: getattr(self, name).to(device) for name in _tensor_field_names(self)},
        )

    def flatten_valid(self) -> dict[str, Tensor]:
        """The real transitions as flat tensors ``[N, ...]``, ``N = valid.sum()``, in
        time-major order; keys are the per-step field names (``log_probs`` only when
        present). Uses boolean indexing, so it is not for use under ``vmap``."""
        return {
            name: getattr(self, name)[self.valid]
            for name in PER_STEP_FIELDS
            if getattr(self, name) is not None
        }
