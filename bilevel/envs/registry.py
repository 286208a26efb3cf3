"""Gymnasium registration under the ``bilevel/`` namespace and the task-family registry."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

from bilevel.envs.frozen_lake import FrozenLake
from bilevel.envs.locomotion import AntDirection, HalfCheetahDirection, HalfCheetahVelocity
from bilevel.envs.navigation import Navigation2D

FAMILIES: dict[str, type] = {
    "halfcheetah-vel": HalfCheetahVelocity,
    "halfcheetah-dir": HalfCheetahDirection,
    "ant-dir": AntDirection,
    "navigation-2d": Navigation2D,
    "frozenlake": FrozenLake,
}

FAMILY_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "frozenlake-hole": ("frozenlake", {"kind": "hole"}),
    "frozenlake-nohole": ("frozenlake", {"kind": "nohole"}),
}

ENVS: dict[str, dict[str, Any]] = {
    "bilevel/HalfCheetahVel-v0": {
        "entry_point": "bilevel.envs.locomotion:make_half_cheetah_velocity_env",
        "max_episode_steps": 200,
    },
    "bilevel/HalfCheetahDir-v0": {
        "entry_point": "bilevel.envs.locomotion:make_half_cheetah_direction_env",
        "max_episode_steps": 200,
    },
    "bilevel/AntDir-v0": {
        "entry_point": "bilevel.envs.locomotion:make_ant_direction_env",
        "max_episode_steps": 200,
    },
    "bilevel/Navigation2D-v0": {"entry_point": "bilevel.envs.navigation:Navigation2DEnv"},
    "bilevel/FrozenLakeHole-v0": {
        "entry_point": "bilevel.envs.frozen_lake:make_frozen_lake_env",
        "kwargs": {"kind": "hole"},
    },
    "bilevel/FrozenLakeNoHole-v0": {
        "entry_point": "bilevel.envs.frozen_lake:make_frozen_lake_env",
        "kwargs": {"kind": "nohole"},
    },
}


def register_all() -> None:
    """Register every env of :data:`ENVS` with Gymnasium; ids already registered are left alone."""
    for env_id, spec in ENVS.items():
        if env_id not in gym.registry:
            gym.register(id=env_id, **spec)


def family_names() -> list[str]:
    return sorted([*FAMILIES, *FAMILY_PRESETS])


def make_family(name: str, **kwargs: Any) -> Any:
    """A task family by name (:func:`family_names`), constructed with ``kwargs`` over the name's presets."""
    if name in FAMILY_PRESETS:
        base_name, presets = FAMILY_PRESETS[name]
        return FAMILIES[base_name](**{**presets, **kwargs})
    if name not in FAMILIES:
        raise ValueError(f"unknown task family {name!r}; valid names: {family_names()}")
    return FAMILIES[name](**kwargs)
