"""The README's core example runs and means what it says: the vmapped meta-gradient equals a loop."""

import re
from pathlib import Path

import torch


def test_readme_core_example_runs_and_batches_over_tasks():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    g = torch.Generator().manual_seed(0)
    tasks = {"X": torch.randn(4, 30, 3, generator=g), "y": torch.randn(4, 30, generator=g)}
    init = {"w": torch.zeros(3)}
    batched = namespace["batched"](init, tasks)["w"]
    looped = torch.stack([namespace["meta_grad"](init, {k: v[i] for k, v in tasks.items()})["w"] for i in range(4)])
    torch.testing.assert_close(batched, looped)
    assert batched.abs().sum() > 0
