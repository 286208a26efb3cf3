"""Task families, tabular MDPs and out-of-distribution perturbations, registered with Gymnasium.

Importing this package registers the ``bilevel/...`` env ids (see :func:`register_all`).
"""

from bilevel.envs.batched_mujoco import BatchedHalfCheetah
from bilevel.envs.energy import EnergyMeter
from bilevel.envs.frozen_lake import (
    FrozenLake,
    FrozenLakeEnv,
    FrozenLakeTask,
    random_map,
    shortest_path_length,
    transposed_map,
)
from bilevel.envs.locomotion import (
    AntDirection,
    DirectionReward,
    DirectionTask,
    HalfCheetahDirection,
    HalfCheetahVelocity,
    VelocityReward,
    VelocityTask,
)
from bilevel.envs.mujoco_warnings import MujocoWarning, forward_mujoco_warnings
from bilevel.envs.navigation import BatchedNavigation2D, GoalTask, Navigation2D, Navigation2DEnv, goals_tensor
from bilevel.envs.perturbations import BodyMassScale, CrippledJoint, FrictionScale, Slope, perturb
from bilevel.envs.registry import FAMILIES, family_names, make_family, register_all
from bilevel.envs.tabular import (
    Episodes,
    TabularMDP,
    Values,
    discounted_visitation,
    evaluate_policy,
    sample_episodes,
    stack_mdps,
    value_iteration,
)

register_all()
forward_mujoco_warnings()

__all__ = [
    "FAMILIES",
    "AntDirection",
    "BatchedHalfCheetah",
    "BatchedNavigation2D",
    "BodyMassScale",
    "CrippledJoint",
    "DirectionReward",
    "DirectionTask",
    "EnergyMeter",
    "Episodes",
    "FrictionScale",
    "FrozenLake",
    "FrozenLakeEnv",
    "FrozenLakeTask",
    "GoalTask",
    "HalfCheetahDirection",
    "HalfCheetahVelocity",
    "MujocoWarning",
    "Navigation2D",
    "Navigation2DEnv",
    "Slope",
    "TabularMDP",
    "Values",
    "VelocityReward",
    "VelocityTask",
    "discounted_visitation",
    "evaluate_policy",
    "family_names",
    "forward_mujoco_warnings",
    "goals_tensor",
    "make_family",
    "perturb",
    "random_map",
    "register_all",
    "sample_episodes",
    "shortest_path_length",
    "stack_mdps",
    "transposed_map",
    "value_iteration",
]
