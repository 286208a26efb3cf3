"""Building blocks shared by the networks: MLP stacks, sub-trees and argument checks."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from itertools import pairwise

from torch import Tensor, nn

ActivationFactory = Callable[[], nn.Module]
"""A zero-argument callable returning an activation module, e.g. ``nn.Tanh``."""

__all__ = ["ActivationFactory", "ObsActionModule", "check_last_dim", "check_positive", "mlp", "subtree"]


def mlp(sizes: Sequence[int], activation: ActivationFactory, *, activate_last: bool = False) -> nn.Sequential:
    """Linear layers ``sizes[0] -> sizes[1] -> ... -> sizes[-1]`` with ``activation``
    after every layer but the last (after the last too when ``activate_last``); every size an int >= 1
    (a width of 0 would make a network that ignores its input)."""
    if len(sizes) < 2:
        raise ValueError(f"`sizes` must name an input and an output size; got {tuple(sizes)}")
    for size in sizes:
        check_positive(size, "every layer size")
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
        layers.append(nn.Linear(fan_in, fan_out))
        if activate_last or i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def subtree(params: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The entries of a ``functional_call`` tree under submodule ``prefix``, renamed
    relative to it, so that ``functional_call(module.<prefix>, subtree(params, prefix), x)``
    evaluates the submodule with ``params``.

    >>> subtree({"features.0.weight": w, "head.0.bias": b}, "features")
    {'0.weight': w}
    """
    start = prefix + "."
    picked = {name[len(start) :]: value for name, value in params.items() if name.startswith(start)}
    if not picked:
        raise ValueError(f"`prefix` {prefix!r} names no entry of `params`; keys are {sorted(params)}")
    return picked


def check_last_dim(tensor: Tensor, size: int, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``tensor.shape[-1] == size``."""
    if tensor.dim() == 0 or tensor.shape[-1] != size:
        raise ValueError(f"`{name}` must have last dimension {size}; got shape {tuple(tensor.shape)}")


def check_positive(value: int, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``value`` is an integer ``>= 1``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1; got {value!r}")


class ObsActionModule(nn.Module):
    """A network of observations ``[..., obs_dim]`` and actions ``[..., act_dim]``: both sizes checked
    positive and kept as ``obs_dim`` and ``act_dim``."""

    def __init__(self, obs_dim: int, act_dim: int) -> None:
        super().__init__()
        check_positive(obs_dim, "obs_dim")
        check_positive(act_dim, "act_dim")
        self.obs_dim, self.act_dim = obs_dim, act_dim
