"""Parameter-tree helpers."""

import importlib

import pytest
import torch
from torch import nn

from bilevel import tree


def test_ravel_round_trip_and_arithmetic():
    t = {"w": torch.arange(6.0).reshape(2, 3), "b": (torch.ones(2), torch.tensor(3.0))}
    flat, unravel = tree.ravel(t)
    assert flat.shape == (9,)
    back = unravel(flat)
    for a, b in zip(tree.leaves(back), tree.leaves(t), strict=True):
        assert torch.equal(a, b)
    assert float(tree.dot(t, t)) == float((flat**2).sum())
    assert torch.allclose(tree.norm(tree.sub(tree.scale(t, 3.0), tree.axpy(2.0, t, t))), torch.tensor(0.0))
    assert tree.numel(t) == 9


def test_params_of_and_stack():
    modules = [nn.Linear(3, 2) for _ in range(4)]
    params = tree.params_of(modules[0], detach=True)
    assert set(params) == {"weight", "bias"} and not params["weight"].requires_grad
    assert params["weight"].data_ptr() != modules[0].weight.data_ptr()
    stacked, _ = tree.stack(modules)
    assert stacked["weight"].shape == (4, 2, 3)
    with pytest.raises(ValueError, match="modules"):
        tree.stack([])


def test_structure_mismatch_names_the_leaf():
    with pytest.raises(ValueError, match="'w'"):
        tree.check_same_structure({"w": torch.ones(2)}, {"w": torch.ones(3)}, ("params", "v"))
    with pytest.raises(ValueError, match="params"):
        tree.check_same_structure({"w": torch.ones(2)}, {"v": torch.ones(2)}, ("params", "v"))
    with pytest.raises(ValueError, match="entries"):
        tree.ravel({"w": torch.ones(2)})[1](torch.ones(3))
    with pytest.raises(ValueError, match=r"\(4, 2\)"):
        tree.ravel({"w": torch.ones(2)})[1](torch.ones(4, 2))
    with pytest.raises(ValueError, match="empty tree"):
        tree.dot({}, {})


def test_unravel_keeps_each_leafs_dtype():
    t = {"a": torch.ones(2, dtype=torch.float32), "b": torch.full((3,), 1 / 3, dtype=torch.float64)}
    flat, unravel = tree.ravel(t)
    assert flat.dtype == torch.float64
    back = unravel(flat)
    assert back["a"].dtype == torch.float32 and back["b"].dtype == torch.float64
    assert torch.equal(back["b"], t["b"]) and torch.equal(back["a"], t["a"])


def test_ravel_order_is_sorted_and_stable_across_torch_func_imports():
    t = {"b": torch.tensor([2.0]), "a": torch.tensor([1.0])}
    before = tree.ravel(t)[0]
    torch.func.grad(lambda x: (x**2).sum())(torch.ones(2))
    importlib.import_module("torch.utils._cxx_pytree")
    assert torch.equal(tree.ravel(t)[0], before)
    assert torch.equal(before, torch.tensor([1.0, 2.0]))
    tree.check_same_structure(t, {"a": torch.zeros(1), "b": torch.zeros(1)})


def test_partition_and_merge_split_a_tree_by_name_and_put_it_back():
    params = {"mean_net.0.weight": torch.ones(2, 3), "mean_net.4.bias": torch.zeros(2), "log_std": torch.ones(2)}
    head, rest = tree.partition(params, lambda name: name.startswith("mean_net.4."))
    assert list(head) == ["mean_net.4.bias"] and set(rest) == {"mean_net.0.weight", "log_std"}
    assert tree.merge(head, rest) == params and all(tree.merge(rest, head)[k] is v for k, v in params.items())
    with pytest.raises(ValueError, match="log_std"):
        tree.merge(rest, {"log_std": torch.zeros(2)})
