"""Frozen Lake task families of BO-MRL: 4x4, deterministic, horizon 49, gamma 0.8.

A map is a tuple of row strings as in Gymnasium's FrozenLake: ``S`` start (always the
top-left cell, state 0), ``F`` frozen, ``H`` hole, ``G`` goal (always the bottom-right
cell). Cell ``(row, col)`` is state ``row * size + col``. Actions are Gymnasium's:
0 left, 1 down, 2 right, 3 up; a move into the border leaves the agent in place.

Rewards depend on where a step lands: ``+1`` for every step that ends on the goal (the
goal is absorbing, so the reward keeps coming), ``hole_reward`` for a step that ends in a
hole, 0 otherwise.

- ``"hole"`` family: entering a hole gives -1 and ends the episode.
- ``"nohole"`` family: entering (or staying in) a hole gives -0.5; the agent stands in
  the hole and moves on as from any frozen cell.

Exact tensors (:attr:`FrozenLakeTask.mdp`) have ``S = size^2 + 1`` states: the grid cells
and, at index ``size^2``, an absorbing sink with zero reward. Ending the episode in a
hole is encoded as the transition into the sink (reward -1 on that transition). The sink
is unreachable in the "nohole" family but kept so all tasks share shapes. The initial
distribution is the one-hot vector of state 0.
"""

from __future__ import annotations

import functools
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

import gymnasium as gym
import numpy as np
import torch

from bilevel.envs.tabular import TabularMDP

MAP_SIZE = 4
HORIZON = 49
GAMMA = 0.8
GOAL_REWARD = 1.0
HOLE_REWARDS = {"hole": -1.0, "nohole": -0.5}
DEFAULT_NUM_TRAIN = {"hole": 10, "nohole": 20}
DEFAULT_NUM_TEST = 10
DEFAULT_HOLE_PROBABILITY = 0.2
DEFAULT_MAP_SEED = 0
ACTION_OFFSETS = ((0, -1), (1, 0), (0, 1), (-1, 0))

Kind = Literal["hole", "nohole"]
Map = tuple[str, ...]


def moves(size: int) -> torch.Tensor:
    """Grid moves ``next_cell[s, a]``, int64 ``[size^2, 4]``; a move into the border stays in place."""
    next_cell = [
        [
            min(max(row + d_row, 0), size - 1) * size + min(max(col + d_col, 0), size - 1)
            for d_row, d_col in ACTION_OFFSETS
        ]
        for row in range(size)
        for col in range(size)
    ]
    return torch.tensor(next_cell, dtype=torch.int64)


def cell_types(desc: Map) -> str:
    """The map's letters in state order (row-major)."""
    return "".join(desc)


def shortest_path_length(desc: Map) -> int | None:
    """Fewest steps from the start to the goal avoiding holes (breadth-first search); None if unreachable."""
    cells = cell_types(desc)
    next_cell = moves(len(desc)).tolist()
    distance = {0: 0}
    frontier = deque([0])
    while frontier:
        state = frontier.popleft()
        if cells[state] == "G":
            return distance[state]
        for successor in next_cell[state]:
            if successor not in distance and cells[successor] != "H":
                distance[successor] = distance[state] + 1
                frontier.append(successor)
    return None


MAX_MAP_DRAWS = 100_000
"""Draws `random_map` and `distinct_maps` make before giving up (a hole probability near 1 leaves almost no
solvable map; near 0, almost no distinct ones)."""


def _check_map_options(size: int, hole_probability: float) -> None:
    if not (isinstance(size, int) and size >= 2):
        raise ValueError(f"`size` must be an int >= 2; got {size!r}")
    if not 0 <= hole_probability < 1:
        raise ValueError(f"`hole_probability` must be in [0, 1); got {hole_probability}")


def random_map(
    generator: np.random.Generator, size: int = MAP_SIZE, hole_probability: float = DEFAULT_HOLE_PROBABILITY
) -> Map:
    """A map whose non-start, non-goal cells are holes with ``hole_probability``, redrawn until solvable."""
    _check_map_options(size, hole_probability)
    for _ in range(MAX_MAP_DRAWS):
        is_hole = generator.random(size * size) < hole_probability
        cells = ["H" if hole else "F" for hole in is_hole]
        cells[0], cells[-1] = "S", "G"
        desc = tuple("".join(cells[row * size : (row + 1) * size]) for row in range(size))
        if shortest_path_length(desc) is not None:
            return desc
    raise ValueError(f"no solvable {size}x{size} map in {MAX_MAP_DRAWS} draws with hole_probability "
                     f"{hole_probability}; lower it")


def distinct_maps(
    count: int,
    generator: np.random.Generator,
    size: int = MAP_SIZE,
    hole_probability: float = DEFAULT_HOLE_PROBABILITY,
) -> list[Map]:
    """``count`` pairwise different solvable random maps."""
    _check_map_options(size, hole_probability)
    maps: list[Map] = []
    for _ in range(MAX_MAP_DRAWS):
        if len(maps) >= count:
            return maps
        desc = random_map(generator, size, hole_probability)
        if desc not in maps:
            maps.append(desc)
    if len(maps) >= count:
        return maps
    raise ValueError(f"only {len(maps)} distinct solvable {size}x{size} maps in {MAX_MAP_DRAWS} draws with "
                     f"hole_probability {hole_probability}; asked for {count}")


def transposed_map(desc: Map) -> Map:
    """The map mirrored along its main diagonal, cell ``(row, col)`` to ``(col, row)``: start and goal stay in
    place and moves swap (down with right, up with left), so a solvable map stays solvable with the same
    shortest path. `random_map` draws a map and its transpose with the same probability."""
    return tuple("".join(row[col] for row in desc) for col in range(len(desc)))


def frozen_lake_mdp(desc: Map, holes_terminal: bool, hole_reward: float) -> TabularMDP:
    """Exact tensors of a map: ``P [S, A, S]`` and ``R [S, A]`` (float64), ``rho [S]``, ``S = size^2 + 1``.

    For a grid cell ``s`` and action ``a`` with landing cell ``c = next_cell[s, a]``:
    from the goal, ``s' = goal`` and ``r = 1``; into a terminal hole, ``s' = sink`` and
    ``r = hole_reward``; otherwise ``s' = c`` and ``r = 1`` on the goal, ``hole_reward`` in
    a hole, 0 elsewhere. The sink maps to itself with ``r = 0``.
    """
    cells = cell_types(desc)
    num_cells = len(cells)
    sink = num_cells
    num_actions = len(ACTION_OFFSETS)
    next_cell = moves(len(desc)).tolist()
    landing = [[state] * num_actions if cells[state] == "G" else next_cell[state] for state in range(num_cells)]
    landing_rewards = {"G": GOAL_REWARD, "H": hole_reward}
    successors = [[sink if cells[cell] == "H" and holes_terminal else cell for cell in row] for row in landing]
    rewards = [[landing_rewards.get(cells[cell], 0.0) for cell in row] for row in landing]
    transitions = torch.nn.functional.one_hot(torch.tensor([*successors, [sink] * num_actions]), num_cells + 1)
    initial_distribution = torch.zeros(num_cells + 1, dtype=torch.float64)
    initial_distribution[0] = 1.0
    return TabularMDP(
        transitions.to(torch.float64),
        torch.tensor([*rewards, [0.0] * num_actions], dtype=torch.float64),
        initial_distribution,
        GAMMA,
        HORIZON,
        num_cells,
    )


@dataclass(frozen=True)
class FrozenLakeTask:
    """One map of a Frozen Lake family; :attr:`mdp` holds its exact tensors."""

    desc: Map
    kind: Kind

    @functools.cached_property
    def mdp(self) -> TabularMDP:
        return frozen_lake_mdp(self.desc, holes_terminal=self.kind == "hole", hole_reward=HOLE_REWARDS[self.kind])


def _sample_index(cumulative_probabilities: np.ndarray, generator: np.random.Generator) -> int:
    """Inverse-CDF draw of an index from a distribution given by its cumulative sums."""
    index = int(np.searchsorted(cumulative_probabilities, generator.random(), side="right"))
    return min(index, len(cumulative_probabilities) - 1)


class FrozenLakeEnv(gym.Env):
    """Gymnasium env stepping a task's MDP; ``Discrete(size^2)`` observations, ``Discrete(4)`` actions.

    A step samples ``s' ~ P[s, a]`` and pays ``R[s, a]``. A transition into the sink ends
    the episode (``terminated``) and reports the hole cell the agent fell into as the
    observation. Episodes are truncated after the task's horizon (49 steps).
    """

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, task: FrozenLakeTask):
        self.task = task
        self.mdp = task.mdp
        self.observation_space = gym.spaces.Discrete(self.mdp.num_observable_states)
        self.action_space = gym.spaces.Discrete(self.mdp.rewards.shape[-1])
        self._cumulative_transitions = self.mdp.transitions.cumsum(dim=-1).cpu().numpy()
        self._cumulative_initial = self.mdp.initial_distribution.cumsum(dim=-1).cpu().numpy()
        self._rewards = self.mdp.rewards.cpu().numpy()
        self._next_cell = moves(len(task.desc)).numpy()
        self._state = 0
        self._elapsed_steps = 0

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[int, dict]:
        super().reset(seed=seed)
        self._state = _sample_index(self._cumulative_initial, self.np_random)
        self._elapsed_steps = 0
        return self._state, {}

    def step(self, action: int) -> tuple[int, float, bool, bool, dict[str, Any]]:
        successor = _sample_index(self._cumulative_transitions[self._state, action], self.np_random)
        reward = float(self._rewards[self._state, action])
        terminated = successor == self.mdp.num_observable_states
        self._state = int(self._next_cell[self._state, action]) if terminated else successor
        self._elapsed_steps += 1
        return self._state, reward, terminated, self._elapsed_steps >= self.mdp.horizon, {}


class FrozenLake:
    """Task family: random solvable maps, split into fixed disjoint train and test sets.

    ``kind`` is ``"hole"`` (10 train maps by default) or ``"nohole"`` (20); ``num_test``
    held-out maps (10). Maps are drawn with ``hole_probability`` per cell (0.2, as
    Gymnasium's ``generate_random_map``) from ``numpy.random.default_rng(seed)``, so the
    split is the same on every machine.
    """

    def __init__(
        self,
        kind: Kind = "hole",
        num_train: int | None = None,
        num_test: int = DEFAULT_NUM_TEST,
        hole_probability: float = DEFAULT_HOLE_PROBABILITY,
        seed: int = DEFAULT_MAP_SEED,
    ):
        if kind not in HOLE_REWARDS:
            raise ValueError(f"unknown Frozen Lake kind {kind!r}; valid kinds: {sorted(HOLE_REWARDS)}")
        self.kind = kind
        self.env_id = "bilevel/FrozenLakeHole-v0" if kind == "hole" else "bilevel/FrozenLakeNoHole-v0"
        num_train = DEFAULT_NUM_TRAIN[kind] if num_train is None else num_train
        if not (isinstance(num_train, int) and num_train >= 1):
            raise ValueError(f"`num_train` must be an int >= 1; got {num_train!r}")
        if not (isinstance(num_test, int) and num_test >= 0):
            raise ValueError(f"`num_test` must be an int >= 0; got {num_test!r}")
        maps = distinct_maps(num_train + num_test, np.random.default_rng(seed), hole_probability=hole_probability)
        self._train = [FrozenLakeTask(desc, kind) for desc in maps[:num_train]]
        self._test = [FrozenLakeTask(desc, kind) for desc in maps[num_train:]]

    def train_tasks(self) -> list[FrozenLakeTask]:
        return list(self._train)

    def test_tasks(self) -> list[FrozenLakeTask]:
        return list(self._test)

    def sample_tasks(self, n: int, generator: np.random.Generator) -> list[FrozenLakeTask]:
        """``n`` training maps drawn uniformly with replacement."""
        return [self._train[i] for i in generator.integers(len(self._train), size=n)]

    def make_env(self, task: FrozenLakeTask, **kwargs: Any) -> gym.Env:
        return gym.make(self.env_id, task=task, **kwargs)


def make_frozen_lake_env(task: FrozenLakeTask | None = None, kind: Kind = "hole") -> FrozenLakeEnv:
    """:class:`FrozenLakeEnv` of ``task``; defaults to the first training map of the ``kind`` family."""
    return FrozenLakeEnv(task or FrozenLake(kind).train_tasks()[0])
