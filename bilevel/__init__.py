"""bilevel: functional bilevel primitives for meta-reinforcement learning.

The core is a handful of pure functions over parameter trees (`bilevel.tree`):

- `unroll`: a differentiable inner loop with any TorchOpt optimiser;
- `newton_cg`: an inner solver to a stationary point, for `implicit_root` to differentiate;
- `implicit_root`: hypergradients of any solver by the implicit function theorem;
- `trpo_step`: a natural-gradient step with a KL-constrained line search;
- `conjugate_gradient`, `hvp`: the linear algebra they share;
- `minimum_attention`: the ||da/ds||^2 and ||da/dt||^2 policy regulariser.
"""

from bilevel import tree
from bilevel.implicit import implicit_root
from bilevel.inner import newton_cg, unroll
from bilevel.linalg import conjugate_gradient, hvp
from bilevel.regularizers import minimum_attention
from bilevel.trpo import trpo_step

__version__ = "0.1.0"

__all__ = [
    "conjugate_gradient",
    "hvp",
    "implicit_root",
    "minimum_attention",
    "newton_cg",
    "tree",
    "trpo_step",
    "unroll",
]
