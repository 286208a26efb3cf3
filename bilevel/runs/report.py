"""Reproduction reports regenerated from run and sweep folders.

A report is a Markdown file whose generated parts sit between marker comments; everything
outside them is prose and is left alone. Two kinds of block:

    <!-- bilevel:summary runs/matt-pendulum/* metric=return last=5 -->
    | config | seeds | final return ... |        (rewritten from the folders' metrics.csv)
    <!-- bilevel:end -->

(``metric=return,jerk_sq`` gives a column pair per metric.)

    <!-- bilevel:curves sweeps/alpha out=min-attention/curves.png y=return x=env_steps -->
    ![return](min-attention/curves.png)           (the figure is redrawn, the link rewritten)
    <!-- bilevel:end -->

Folder arguments are paths or glob patterns relative to the working directory; a sweep
folder stands for its trials. ``out`` is relative to the report's own folder; ``xmax=N`` cuts the
curves, and the rows a summary averages, at ``x <= N`` (runs that continued past the budget a
report describes; ``x`` defaults to ``env_steps`` in both).
``bilevel report FILE...`` rewrites each file atomically, after checking that no figure is drawn by two
curves blocks that name different folders or options (`figure_conflicts`): the later block would
overwrite the earlier one's figure.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

from bilevel.runs.folder import atomic_write_text
from bilevel.runs.sweep import expand_sweeps, summary_markdown, summary_rows

__all__ = ["figure_conflicts", "regenerate"]

_BLOCK = re.compile(r"(<!-- bilevel:(summary|curves) (.*?) -->\n)(.*?)(<!-- bilevel:end -->)", re.DOTALL)


def _parse(arguments: str, where: str) -> tuple[list[Path], dict[str, str]]:
    patterns, options = [], {}
    for word in arguments.split():
        key, equals, value = word.partition("=")
        if equals:
            options[key] = value
        else:
            patterns.append(word)
    folders = []
    for pattern in patterns:
        matches = [Path(m) for m in (sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern])]
        matches = [m for m in matches if m.is_dir()]
        if not matches:
            raise ValueError(f"{where}: no folder matches {pattern!r}")
        folders += matches
    if not folders:
        raise ValueError(f"{where}: no run or sweep folder matches {patterns}")
    return expand_sweeps(folders), options


def _x_max(options: dict[str, str], where: str) -> float | None:
    try:
        return float(options["xmax"]) if "xmax" in options else None
    except ValueError:
        raise ValueError(f"{where}: xmax must be a number; got {options['xmax']!r}") from None


def _last(options: dict[str, str], where: str) -> int:
    try:
        last = int(options.get("last", 5))
    except ValueError:
        raise ValueError(f"{where}: last must be a positive integer; got {options['last']!r}") from None
    if last < 1:
        raise ValueError(f"{where}: last must be a positive integer; got {last}")
    return last


def _summary(folders: list[Path], options: dict[str, str], where: str) -> str:
    metrics, last = options.get("metric", "return").split(","), _last(options, where)
    x, x_max = options.get("x", "env_steps"), _x_max(options, where)
    rows_by_metric = {metric: summary_rows(folders, metric, last, x=x, x_max=x_max) for metric in metrics}
    for metric, rows in rows_by_metric.items():
        if not rows:
            raise ValueError(f"{where}: none of {len(folders)} folders has metric {metric!r}")
    return summary_markdown(rows_by_metric, last, x=x, x_max=x_max)


def _curves(folders: list[Path], options: dict[str, str], report: Path, where: str) -> str:
    from bilevel.runs.plot import plot_curves

    if "out" not in options:
        raise ValueError(f"{where}: a curves block needs out=FILE.png")
    y, x = options.get("y", "return"), options.get("x", "env_steps")
    try:
        plot_curves(folders, report.parent / options["out"], x=x, y=y, x_max=_x_max(options, where))
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return f"![{y} against {x}]({options['out']})\n"


def _location(report: Path, text: str, match: re.Match[str]) -> str:
    """``file:line`` of the block ``match`` found in ``text``, lines counted from 1."""
    return f"{report}:{text.count(chr(10), 0, match.start()) + 1}"


_OPENING = re.compile(r"<!-- bilevel:(summary|curves) ")
_END = "<!-- bilevel:end -->"


def _check_markers(report: Path, text: str) -> None:
    """Every block opening is followed by its end marker before the next opening, and no end marker is
    unmatched: a missing one would let a block's body run on over the prose and the next block."""
    expecting_end_since: int | None = None
    for match in re.finditer(rf"{_OPENING.pattern}|{re.escape(_END)}", text):
        line = text.count("\n", 0, match.start()) + 1
        if match.group(0) == _END:
            if expecting_end_since is None:
                raise ValueError(f"{report}:{line}: {_END} without an opening block marker")
            expecting_end_since = None
        elif expecting_end_since is not None:
            raise ValueError(f"{report}:{expecting_end_since}: the block has no {_END} before the next block")
        else:
            expecting_end_since = line
    if expecting_end_since is not None:
        raise ValueError(f"{report}:{expecting_end_since}: the block has no {_END}")


def figure_conflicts(reports: list[str | Path]) -> list[str]:
    """Figures that two curves blocks of ``reports`` write from different arguments.

    Blocks are compared by their figure path (``out`` resolved against the report's folder) and, for
    the same figure, by their folder patterns and options; nothing is read from the folders. Returns
    one message per clashing pair, naming both blocks by ``file:line``; empty when every figure has one
    definition."""
    drawn: dict[Path, tuple[str, tuple[str, ...]]] = {}
    conflicts = []
    for report in map(Path, reports):
        text = report.read_text()
        for match in _BLOCK.finditer(text):
            _, kind, arguments, _, _ = match.groups()
            if kind != "curves":
                continue
            words = arguments.split()
            outs = [w.partition("=")[2] for w in words if w.startswith("out=")]
            if not outs:
                continue
            where = _location(report, text, match)
            figure = (report.parent / outs[-1]).resolve()
            definition = tuple(sorted(w for w in words if not w.startswith("out=")))
            first = drawn.setdefault(figure, (where, definition))
            if first[1] != definition:
                conflicts.append(f"{where} and {first[0]} both draw {outs[-1]} from different arguments: "
                                 f"{' '.join(definition)!r} against {' '.join(first[1])!r}")
    return conflicts


def regenerate(report: str | Path) -> int:
    """Rewrite every generated block of ``report`` from the folders it names; returns the
    number of blocks. A block naming no folder, or folders without the metric, or two blocks drawing one
    figure from different arguments, raise ``ValueError`` with the block's line number, and the file is
    left unchanged."""
    path = Path(report)
    conflicts = figure_conflicts([path])
    if conflicts:
        raise ValueError("; ".join(conflicts))
    text = path.read_text()
    _check_markers(path, text)
    count = 0

    def rewrite(match: re.Match[str]) -> str:
        nonlocal count
        head, kind, arguments, _, tail = match.groups()
        where = _location(path, text, match)
        folders, options = _parse(arguments, where)
        body = _summary(folders, options, where) if kind == "summary" else _curves(folders, options, path, where)
        count += 1
        return head + body + tail

    new_text = _BLOCK.sub(rewrite, text)
    if new_text != text:
        atomic_write_text(path, new_text)
    return count
