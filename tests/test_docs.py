"""The documentation site builds with `mkdocs build --strict`: every page, link and
API-reference docstring resolves."""

import subprocess
import sys
from pathlib import Path


def test_mkdocs_build_strict(tmp_path):
    root = Path(__file__).parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=root, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1", "PATH": "/usr/bin:/bin"},
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "site" / "api" / "index.html").read_text().count("unroll") > 3


def test_no_figure_is_drawn_by_two_report_blocks_from_different_runs():
    from bilevel.runs.report import figure_conflicts

    root = Path(__file__).parents[1]
    reports = [*sorted((root / "docs").rglob("*.md")), root / "README.md"]
    assert figure_conflicts(reports) == []
