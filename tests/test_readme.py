"""The README's commands and core example mean what they say: the first command is the Frozen Lake
quickstart with options its script accepts, the listed examples exist, and the vmapped meta-gradient
of the core example equals a loop."""

import importlib.util
import re
import shlex
from pathlib import Path

import torch

ROOT = Path(__file__).parents[1]


def readme_commands() -> list[str]:
    block = re.search(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_first_command_is_the_frozen_lake_quickstart_with_options_it_accepts():
    setup, run = readme_commands()[0].split(" && ")
    assert setup == "bash scripts/setup.sh plot"
    words = shlex.split(run)
    assert words[:2] == [".venv/bin/python", "examples/bomrl_frozen_lake.py"]
    spec = importlib.util.spec_from_file_location("bomrl_frozen_lake", ROOT / words[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    args = module.build_parser().parse_args(words[2:])
    assert args.env == "frozenlake-hole" and args.rounds == 4 and args.episodes == 500


def test_the_docs_home_page_gives_the_readme_commands():
    section = (ROOT / "docs" / "index.md").read_text().split("## The two commands", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    commands = [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]
    assert commands == readme_commands()


def test_readme_lists_examples_that_exist():
    listed = set(re.findall(r"examples/(\w+\.py)", (ROOT / "README.md").read_text()))
    assert {"bomrl_frozen_lake.py", "custom_method.py"} <= listed
    assert all((ROOT / "examples" / name).exists() for name in listed)


def test_readme_core_example_runs_and_batches_over_tasks():
    readme = (ROOT / "README.md").read_text()
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
