"""Every example imports what it names and parses its options: ``python examples/X.py --help`` exits 0 and
prints its usage (the training they do is tested through the CLI in ``tests/algorithms``, except the
standalone ``custom_method.py``, whose meta-iteration is tested here)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).parents[1] / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.py"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"bomrl_frozen_lake.py", "maml_trpo_halfcheetah.py",
                                          "min_attention_halfcheetah.py", "meta_attention_td3.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_imports_and_prints_its_usage(example):
    done = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and example.name in done.stdout


def test_custom_method_takes_an_accepted_trust_region_step_on_policy_and_learning_rates():
    """The standalone Meta-SGD example (not a CLI learner): one meta-iteration on three goals lowers the
    surrogate within the KL bound and moves both the policy and the inner learning rates."""
    import importlib.util

    import torch

    from bilevel import tree
    from bilevel.nets import GaussianMLPPolicy

    spec = importlib.util.spec_from_file_location("custom_method", EXAMPLES_DIR / "custom_method.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    torch.manual_seed(0)
    initial = tree.params_of(GaussianMLPPolicy(2, 2, hidden=(64, 64)), detach=True)
    meta = {"policy": initial, "log_lr": tree.map(lambda p: torch.full_like(p, -2.3), initial)}
    goals = torch.tensor([[0.4, 0.3], [-0.2, 0.45], [0.1, -0.4]])
    new_meta, info, before, after = example.meta_iteration(meta, goals, torch.Generator().manual_seed(0))
    assert info.accepted and 0 < info.kl <= 0.01 and info.loss_after < info.loss_before
    assert tree.norm(tree.sub(new_meta["policy"], meta["policy"])) > 0
    assert tree.norm(tree.sub(new_meta["log_lr"], meta["log_lr"])) > 0
    assert after > before
