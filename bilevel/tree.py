"""Parameter trees: the values every core function takes and returns.

A parameter tree is any nest of dicts, lists and tuples whose leaves are tensors;
in practice the ``dict[str, Tensor]`` that ``torch.func.functional_call`` expects.
Trees are flattened with `optree` (the library TorchOpt flattens with) in its
default namespace, where dict leaves come in sorted key order, always. (In the
``"torch"`` namespace the order turns from sorted to insertion order once
``torch.func`` first imports ``torch.utils._cxx_pytree``, so a vector from `ravel`
would change meaning in the middle of a process.)

Every function here is pure, keeps each leaf on its device and dtype, and
composes with ``torch.func`` transforms and with ``torch.autograd``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeAlias

import optree
import torch
from torch import Tensor, nn

Tree: TypeAlias = Any
"""A nest of dicts, lists and tuples with tensor leaves."""

__all__ = [
    "Tree",
    "add",
    "axpy",
    "buffers_of",
    "check_same_structure",
    "detach",
    "dot",
    "leaves",
    "map",
    "merge",
    "norm",
    "numel",
    "params_of",
    "partition",
    "ravel",
    "scale",
    "stack",
    "sub",
    "to",
    "where",
    "zeros_like",
]


def map(fn: Callable[..., Any], tree: Tree, *rest: Tree) -> Tree:  # noqa: A001
    """Apply ``fn`` leafwise to one tree or to several trees of the same structure."""
    return optree.tree_map(fn, tree, *rest)


def leaves(tree: Tree) -> list[Tensor]:
    """The leaves of ``tree`` in flattening order."""
    return optree.tree_leaves(tree)


def check_same_structure(a: Tree, b: Tree, names: tuple[str, str] = ("a", "b")) -> None:
    """Raise ``ValueError`` naming both arguments when ``a`` and ``b`` differ in
    structure or in any leaf's shape."""
    spec_a = optree.tree_structure(a)
    spec_b = optree.tree_structure(b)
    if spec_a != spec_b:
        raise ValueError(
            f"`{names[0]}` and `{names[1]}` must be trees of the same structure; "
            f"got {spec_a} and {spec_b}"
        )
    paths = optree.tree_paths(a)
    for path, leaf_a, leaf_b in zip(paths, leaves(a), leaves(b), strict=True):
        if leaf_a.shape != leaf_b.shape:
            where = "/".join(str(p) for p in path) or "<root>"
            raise ValueError(
                f"`{names[0]}` and `{names[1]}` differ at leaf {where!r}: "
                f"shape {tuple(leaf_a.shape)} against {tuple(leaf_b.shape)}"
            )


def partition(params: dict[str, Tensor], keep: Callable[[str], bool]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Split a ``functional_call`` tree by name: ``(selected, rest)``, ``selected`` the entries whose name
    ``keep`` accepts (e.g. ``lambda name: name.startswith("mean_net.4.")``, the last layer, for ANIL's inner
    loop). `merge` puts them back together."""
    selected = {name: value for name, value in params.items() if keep(name)}
    return selected, {name: value for name, value in params.items() if name not in selected}


def merge(*parts: dict[str, Tensor]) -> dict[str, Tensor]:
    """One ``functional_call`` tree from disjoint parts (the inverse of `partition`); a name in two parts is
    an error."""
    merged: dict[str, Tensor] = {}
    for part in parts:
        repeated = sorted(set(merged) & set(part))
        if repeated:
            raise ValueError(f"`merge` got the entries {repeated} twice")
        merged.update(part)
    return merged


def params_of(module: nn.Module, *, detach: bool = False) -> dict[str, Tensor]:
    """The parameters of ``module`` as a ``functional_call`` tree (name -> tensor).

    With ``detach=True`` the leaves are detached copies, the starting point of a
    functional loop (``torch.func.grad`` needs no ``requires_grad``); otherwise they
    are the module's own parameters."""
    params = dict(module.named_parameters())
    if detach:
        return {k: v.detach().clone() for k, v in params.items()}
    return params


def buffers_of(module: nn.Module) -> dict[str, Tensor]:
    """The buffers of ``module`` as a ``functional_call`` tree."""
    return dict(module.named_buffers())


def stack(modules: Iterable[nn.Module]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Stack the parameters and buffers of same-shaped modules along a new leading
    axis of size ``len(modules)``, for ``vmap(functional_call)`` over an ensemble."""
    modules = list(modules)
    if not modules:
        raise ValueError("`modules` must hold at least one module; got an empty sequence")
    return torch.func.stack_module_state(modules)


def add(a: Tree, b: Tree) -> Tree:
    """``a + b`` leafwise."""
    return map(torch.add, a, b)


def sub(a: Tree, b: Tree) -> Tree:
    """``a - b`` leafwise."""
    return map(torch.sub, a, b)


def scale(a: Tree, s: float | Tensor) -> Tree:
    """``s * a`` for a scalar ``s`` (a float or a 0-dim tensor)."""
    return map(lambda x: x * s, a)


def axpy(alpha: float | Tensor, x: Tree, y: Tree) -> Tree:
    """``alpha * x + y`` leafwise."""
    return map(lambda xi, yi: yi + alpha * xi, x, y)


def dot(a: Tree, b: Tree) -> Tensor:
    """The Euclidean inner product ``sum_i <a_i, b_i>`` over all leaves, a 0-dim tensor."""
    if not leaves(a):
        raise ValueError("`dot` of trees without tensor leaves has no device or dtype to take; got an empty tree")
    products = [torch.sum(x * y) for x, y in zip(leaves(a), leaves(b), strict=True)]
    return torch.stack(products).sum()


def norm(a: Tree) -> Tensor:
    """The Euclidean norm of all leaves taken as one vector."""
    return torch.sqrt(dot(a, a))


def where(condition: Tensor, a: Tree, b: Tree) -> Tree:
    """``a`` where the 0-dim boolean ``condition`` holds, else ``b``, leafwise (a select that runs under
    ``vmap``, where ``condition`` may differ per batch element)."""
    return map(lambda x, y: torch.where(condition, x, y), a, b)


def zeros_like(a: Tree) -> Tree:
    """A tree of zeros shaped like ``a``."""
    return map(torch.zeros_like, a)


def detach(a: Tree) -> Tree:
    """Every leaf detached from the graph (at the current ``torch.func`` level)."""
    return map(torch.Tensor.detach, a)


def to(a: Tree, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Tree:
    """Every leaf moved to ``device`` and/or cast to ``dtype``."""
    return map(lambda x: x.to(device=device, dtype=dtype), a)


def numel(a: Tree) -> int:
    """The total number of scalars in ``a``."""
    return sum(x.numel() for x in leaves(a))


def ravel(a: Tree) -> tuple[Tensor, Callable[[Tensor], Tree]]:
    """Flatten ``a`` into one vector of shape ``[numel(a)]``.

    Returns the vector (in the leaves' promoted dtype) and ``unravel``, which maps any
    vector of that length back to a tree shaped like ``a``, each leaf in its own dtype.
    Differentiable both ways."""
    flat, spec = optree.tree_flatten(a)
    shapes = [x.shape for x in flat]
    sizes = [x.numel() for x in flat]
    dtypes = [x.dtype for x in flat]
    vector = torch.cat([x.reshape(-1) for x in flat]) if flat else torch.zeros(0)

    def unravel(v: Tensor) -> Tree:
        if v.shape != (sum(sizes),):
            raise ValueError(f"`v` must be a vector of {sum(sizes)} entries; got shape {tuple(v.shape)}")
        pieces = torch.split(v, sizes)
        return optree.tree_unflatten(
            spec, [p.reshape(s).to(d) for p, s, d in zip(pieces, shapes, dtypes, strict=True)]
        )

    return vector, unravel
