"""``scripts/link-runs.sh`` moves run folders out of the work tree and links them back, without losing or
overwriting one."""

import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def link_runs(repo: Path, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(repo / "scripts" / "link-runs.sh")], capture_output=True, text=True,
                          env={**os.environ, "BILEVEL_RUNS_HOME": str(home)}, check=False)


def test_link_runs_moves_runs_out_of_the_work_tree_and_is_idempotent(tmp_path):
    repo, home = tmp_path / "repo", tmp_path / "home" / "runs"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "link-runs.sh", repo / "scripts")
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / "runs" / "group" / "run-a").mkdir(parents=True)
    (repo / "runs" / "group" / "run-a" / "metrics.csv").write_text("iteration\n1\n")

    assert link_runs(repo, home).returncode == 0
    assert (repo / "runs").is_symlink() and (repo / "runs").resolve() == home.resolve()
    assert (home / "group" / "run-a" / "metrics.csv").read_text() == "iteration\n1\n"
    assert link_runs(repo, home).returncode == 0, "a second call leaves the link as it is"
    assert (repo / "runs").resolve() == home.resolve()

    (repo / "runs").unlink()  # what a fresh checkout leaves: no runs/, the home kept
    (repo / "runs" / "other").mkdir(parents=True)
    assert link_runs(repo, home).returncode == 0
    assert sorted(p.name for p in home.iterdir()) == ["group", "other"]

    (repo / "runs").unlink()
    (repo / "runs" / "group").mkdir(parents=True)
    clash = link_runs(repo, home)
    assert clash.returncode == 2 and "group" in clash.stderr
    assert (repo / "runs" / "group").is_dir() and (home / "group" / "run-a" / "metrics.csv").exists()
