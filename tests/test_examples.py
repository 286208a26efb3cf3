"""Every example imports what it names and parses its options: ``python examples/X.py --help`` exits 0 and
prints its usage (the training they do is tested through the CLI in ``tests/algorithms``)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = sorted((Path(__file__).parents[1] / "examples").glob("*.py"))


def test_there_are_examples():
    assert {p.name for p in EXAMPLES} >= {"bomrl_frozen_lake.py", "maml_trpo_halfcheetah.py",
                                          "min_attention_halfcheetah.py", "meta_attention_td3.py"}


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_example_imports_and_prints_its_usage(example):
    done = subprocess.run([sys.executable, str(example), "--help"], capture_output=True, text=True, timeout=120,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage:") and example.name in done.stdout
