"""Sweeps on a local Ray: trials as run folders, retry from a checkpoint after a killed worker,
resume of an interrupted sweep, and bad specs refused before anything starts."""

import json
import sys

import pytest
import torch

from bilevel import cli
from bilevel.runs import train
from bilevel.runs.loop import load_learner, make_config
from bilevel.runs.sweep import expand_spec, run_sweep

TINY = {
    "bomrl": {"env": "frozenlake-hole", "iterations": 3, "checkpoint_every": 1, "exact": True, "tasks_per_batch": 2},
    "maml-trpo": {"env": "navigation-2d", "iterations": 3, "checkpoint_every": 1, "meta_batch_size": 2,
                  "episodes_per_task": 2, "horizon": 10, "hidden": [8]},
}


def spec():
    return {
        "name": "test",
        "seeds": [0, 1],
        "resources": {"num_cpus": 1, "max_retries": 2},
        "group": [
            {"algorithm": name, "env": values["env"], "overrides": {k: v for k, v in values.items() if k != "env"}}
            for name, values in TINY.items()
        ],
    }


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)


def test_sweep_retries_a_killed_trial_from_its_checkpoint_and_resume_skips_finished(tmp_path):
    sweep_dir = tmp_path / "sweep"
    trials = expand_spec(spec())
    assert len(trials) == 4
    killed = 0
    result = run_sweep(spec(), sweep_dir, fault=(2, killed))
    assert result["skipped"] == 0 and len(result["ran"]) == 4
    assert (sweep_dir / trials[killed].name / ".fault-injected").exists()
    for trial in trials:
        assert len((sweep_dir / trial.name / "metrics.csv").read_text().splitlines()) == 1 + 3, trial.name
    assert (sweep_dir / "summary.csv").exists() and (sweep_dir / "summary.md").read_text().count("|") > 8

    undisturbed = tmp_path / "undisturbed"
    trial = trials[killed]
    train(trial.algorithm, make_config(trial.algorithm, trial.values), undisturbed, progress=False)
    assert_same_state(load_learner(sweep_dir / trial.name, "cpu")[1].learner_state(),
                      load_learner(undisturbed, "cpu")[1].learner_state())

    finished = {t.name: (sweep_dir / t.name / "checkpoints" / "last.pt").read_bytes() for t in trials[1:]}
    for path in sorted((sweep_dir / trials[0].name).rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    assert cli.main(["sweep", "--resume", str(sweep_dir)]) == 0
    for name, content in finished.items():
        assert (sweep_dir / name / "checkpoints" / "last.pt").read_bytes() == content
    assert (sweep_dir / trials[0].name / "checkpoints" / "last.pt").exists()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda s: s["group"][0].update(algorithm="no-such"), "no-such"),
        (lambda s: s["group"][0]["overrides"].update(no_such_key=1), "no_such_key"),
        (lambda s: s.update(seeds=[]), "seeds"),
        (lambda s: s["resources"].update(gpus=1), "gpus"),
        (lambda s: s["group"][0]["overrides"].update(tasks_per_batch=[]), "tasks_per_batch"),
        (lambda s: s["group"][0]["overrides"].update(iterations="3"), "iterations"),
        (lambda s: s["group"][0]["overrides"].update(seed=3), "seed"),
    ],
)
def test_bad_spec_exits_2_before_anything_starts(tmp_path, capsys, change, message):
    bad = spec()
    change(bad)
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(_to_toml(bad))
    assert cli.main(["sweep", str(spec_path), "--out", str(tmp_path / "sweep")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_unreachable_cluster_address_exits_2_at_once_naming_it(tmp_path, capsys):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(_to_toml(spec()))
    address = f"127.0.0.1:{closed_port}"
    assert cli.main(["sweep", str(spec_path), "--out", str(tmp_path / "sweep"), "--address", address]) == 2
    assert address in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


def test_without_ray_the_command_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    spec_path = tmp_path / "spec.toml"
    spec_path.write_text(_to_toml(spec()))
    monkeypatch.setitem(sys.modules, "ray", None)
    assert cli.main(["sweep", str(spec_path), "--out", str(tmp_path / "sweep")]) == 2
    assert "bilevel[ray]" in capsys.readouterr().err


def _to_toml(value, prefix=""):
    """A minimal TOML writer for the spec's shape (tables, arrays of tables, scalars, lists)."""
    lines, tables = [], []
    for key, item in value.items():
        if isinstance(item, dict):
            tables.append((f"{prefix}{key}", item, False))
        elif isinstance(item, list) and item and isinstance(item[0], dict):
            tables += [(f"{prefix}{key}", entry, True) for entry in item]
        else:
            lines.append(f"{key} = {json.dumps(item)}")
    for name, table, is_array in tables:
        lines.append(f"[[{name}]]" if is_array else f"[{name}]")
        lines.append(_to_toml(table, prefix=f"{name}."))
    return "\n".join(lines) + "\n"


def test_a_trial_killed_before_its_first_checkpoint_is_retried_from_scratch(tmp_path):
    """Its folder holds a config but no checkpoint: the retry must start it again, not refuse the folder."""
    one = spec()
    one["seeds"] = [0]
    one["group"] = one["group"][:1]
    one["group"][0]["overrides"]["checkpoint_every"] = 3
    sweep_dir = tmp_path / "sweep"
    result = run_sweep(one, sweep_dir, fault=(2, 0))
    (trial,) = expand_spec(one)
    assert len(result["ran"]) == 1 and (sweep_dir / trial.name / ".fault-injected").exists()
    assert len((sweep_dir / trial.name / "metrics.csv").read_text().splitlines()) == 1 + 3
