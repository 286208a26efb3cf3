"""Out-of-distribution perturbations of any Gymnasium MuJoCo env.

Each wrapper edits ``env.unwrapped.model`` (an ``mujoco.MjModel``) once, at construction,
and restores nothing: the edit persists through resets and affects every wrapper
around the same env.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import mujoco
import numpy as np

PERTURBATIONS = ("mass", "crippled-joint", "slope", "friction")

Name = str | int


def mujoco_model(env: gym.Env) -> mujoco.MjModel:
    """The ``MjModel`` of a Gymnasium MuJoCo env; ValueError for any other env."""
    model = getattr(env.unwrapped, "model", None)
    if not isinstance(model, mujoco.MjModel):
        raise ValueError(f"{env.unwrapped!r} is not a MuJoCo env (its unwrapped env has no MjModel)")
    return model


def _positive(name: str, value: float) -> float:
    if not 0 < value < math.inf:
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _object_ids(model: mujoco.MjModel, object_type: mujoco.mjtObj, count: int, names: Sequence[Name]) -> list[int]:
    """Indices of named or numbered MuJoCo objects of one type; ValueError naming an unknown one."""
    valid_names = [mujoco.mj_id2name(model, object_type, i) for i in range(count)]
    kind = object_type.name[6:].lower()
    if not names:
        raise ValueError(f"no {kind} chosen (an empty selection perturbs nothing); valid: {valid_names}")
    ids = []
    for name in names:
        if isinstance(name, numbers.Integral) and not isinstance(name, bool):
            index = int(name)
        elif isinstance(name, str):
            index = mujoco.mj_name2id(model, object_type, name)
        else:
            raise ValueError(f"a {kind} is a name or an index; got {name!r}")
        if not 0 <= index < count:
            raise ValueError(f"unknown {kind} {name!r}; valid: {valid_names}")
        ids.append(index)
    return ids


def _as_list(names: Name | Sequence[Name]) -> list[Name]:
    return [names] if isinstance(names, str | numbers.Integral) else list(names)


class BodyMassScale(gym.Wrapper):
    """Multiplies ``model.body_mass[b]`` and ``model.body_inertia[b]`` by ``scale`` for the chosen bodies.

    Scaling inertia with mass keeps each body's shape (a uniform density change).
    ``bodies``: names or indices; None means every body except the world (body 0).
    Afterwards ``mujoco.mj_setConst`` recomputes the derived constants
    (``body_subtreemass``, ``dof_invweight0``, ...).
    """

    def __init__(self, env: gym.Env, scale: float, bodies: Sequence[Name] | None = None):
        super().__init__(env)
        model = mujoco_model(env)
        self.scale = _positive("scale", scale)
        body_names = range(1, model.nbody) if bodies is None else _as_list(bodies)
        self.body_ids = _object_ids(model, mujoco.mjtObj.mjOBJ_BODY, model.nbody, list(body_names))
        model.body_mass[self.body_ids] *= self.scale
        model.body_inertia[self.body_ids] *= self.scale
        mujoco.mj_setConst(model, env.unwrapped.data)


class CrippledJoint(gym.Wrapper):
    """Disables actuators by setting their rows of ``model.actuator_gear`` to 0.

    The transmission then maps any control to zero generalised force, so the joint moves
    only passively; the action space and the control cost are unchanged. ``joint``: a
    joint name (its actuators are disabled), an actuator name, an actuator index, or a
    sequence of these.
    """

    def __init__(self, env: gym.Env, joint: Name | Sequence[Name]):
        super().__init__(env)
        model = mujoco_model(env)
        joints = _as_list(joint)
        if not joints:
            raise ValueError("no joint or actuator chosen (an empty selection cripples nothing)")
        self.actuator_ids = sorted({i for name in joints for i in _actuators_of(model, name)})
        model.actuator_gear[self.actuator_ids] = 0.0


def actuator_lookup(model: mujoco.MjModel) -> dict[Name, list[int]]:
    """Actuator indices keyed by the name of the joint they drive, overridden by actuator name and index."""
    lookup: dict[Name, list[int]] = {}
    for i in range(model.nu):
        if model.actuator_trntype[i] == mujoco.mjtTrn.mjTRN_JOINT:
            joint_name = mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_JOINT, model.actuator_trnid[i, 0])
            lookup.setdefault(joint_name, []).append(i)
    for i in range(model.nu):
        lookup[i] = [i]
        lookup[mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_ACTUATOR, i)] = [i]
    return lookup


def _actuators_of(model: mujoco.MjModel, name: Name) -> list[int]:
    lookup = actuator_lookup(model)
    if isinstance(name, numbers.Integral) and not isinstance(name, bool):
        name = int(name)
    if name not in lookup:
        valid = [key for key in lookup if isinstance(key, str)]
        raise ValueError(f"unknown joint or actuator {name!r}; valid names: {valid}, or an index < {model.nu}")
    return lookup[name]


class Slope(gym.Wrapper):
    """Rotates gravity ``model.opt.gravity`` by ``degrees`` in the x-z plane.

    ``g = |g| (-sin(theta), 0, -cos(theta))``: a positive angle is an uphill slope for
    motion along +x, a negative one downhill. ``|degrees|`` must be below 90.
    """

    def __init__(self, env: gym.Env, degrees: float):
        super().__init__(env)
        model = mujoco_model(env)
        if not -90 < degrees < 90:
            raise ValueError(f"degrees must lie in (-90, 90), got {degrees!r}")
        self.degrees = float(degrees)
        theta = math.radians(self.degrees)
        magnitude = float(np.linalg.norm(model.opt.gravity))
        model.opt.gravity[:] = (-magnitude * math.sin(theta), 0.0, -magnitude * math.cos(theta))


class FrictionScale(gym.Wrapper):
    """Multiplies every geom's ``model.geom_friction`` (sliding, torsional, rolling) by ``scale``."""

    def __init__(self, env: gym.Env, scale: float):
        super().__init__(env)
        model = mujoco_model(env)
        self.scale = _positive("scale", scale)
        model.geom_friction[:] *= self.scale


def perturb(env: gym.Env, name: str, **kwargs: Any) -> gym.Wrapper:
    """Apply the perturbation ``name`` (one of ``PERTURBATIONS``) with its keyword arguments."""
    wrappers = {
        "mass": BodyMassScale,
        "crippled-joint": CrippledJoint,
        "slope": Slope,
        "friction": FrictionScale,
    }
    if name not in wrappers:
        raise ValueError(f"unknown perturbation {name!r}; valid: {list(PERTURBATIONS)}")
    return wrappers[name](env, **kwargs)
