"""The ``bilevel`` command: ``train``, ``eval``, ``plot``, ``sweep``, ``report``, ``archive`` and ``list``.

    bilevel train ALGORITHM --env ENV [--seed N] [--iterations N] [--FIELD VALUE ...] [--run-dir DIR]
    bilevel train ALGORITHM --resume RUN [--iterations N] [--threads N]
    bilevel eval RUN [--KEY VALUE ...]
    bilevel plot RUN_OR_SWEEP [...] [--y return] [--x env_steps] [--out FILE]
    bilevel sweep SPEC.toml [--out SWEEP] [--address RAY_ADDRESS]
    bilevel sweep --resume SWEEP
    bilevel report REPORT.md [...]
    bilevel archive RUN [...] --to RECORDS
    bilevel list

Every config field of the algorithm is an option (``attention_weight`` is
``--attention-weight``); ``--threads N`` (default 1, and 0 for mbmpo; 0 means torch's default)
caps torch's CPU threads for every algorithm. Bad input (an unknown algorithm, env, option or
device, a negative budget) prints an error naming it (after argparse's usage text, for an
unknown option or a value of the wrong type) and exits with status 2, before anything is
written.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import itertools
import json
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bilevel.runs.learner import ALGORITHMS, RunConfig, get_algorithm

EXIT_BAD_INPUT = 2
RESUMABLE = {"iterations", "threads"}
"""The config fields ``bilevel train --resume`` may change."""


def field_docs(config_class: type) -> dict[str, str]:
    """The attribute docstrings (the string under each field) of a dataclass and its bases."""
    docs: dict[str, str] = {}
    for cls in reversed(config_class.__mro__):
        if not dataclasses.is_dataclass(cls):
            continue
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
        except (OSError, TypeError):
            continue
        for node, following in itertools.pairwise(body):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant)):
                docs[node.target.id] = " ".join(str(following.value.value).split())
    return docs


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


def _add_config_options(parser: argparse.ArgumentParser, config_class: type[RunConfig]) -> None:
    docs = field_docs(config_class)
    for f in dataclasses.fields(config_class):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict[str, Any] = {"dest": f.name, "default": argparse.SUPPRESS,
                                  "help": f"{docs.get(f.name, '')} (default: {default})".replace("%", "%%")}
        if isinstance(default, bool):
            kwargs["type"] = _parse_bool
        elif isinstance(default, (tuple, list)):
            kwargs["nargs"] = "+"
            kwargs["type"] = type(default[0]) if default else str
        elif default is not None:
            kwargs["type"] = type(default)
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _train(argv: list[str]) -> int:
    from bilevel.runs.loop import make_config, train

    head = argparse.ArgumentParser(add_help=False)
    head.add_argument("algorithm")
    known, _ = head.parse_known_args(argv)
    try:
        learner_class = get_algorithm(known.algorithm)
    except ValueError as error:
        print(f"bilevel train: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    parser = argparse.ArgumentParser(prog=f"bilevel train {known.algorithm}",
                                     description=(learner_class.__doc__ or "").split("\n")[0])
    parser.add_argument("algorithm")
    parser.add_argument("--run-dir", type=Path, help="the run folder (default: runs/ALGORITHM-ENV-sSEED)")
    parser.add_argument("--resume", type=Path, metavar="RUN", help="continue RUN from its last checkpoint")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing run folder")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    _add_config_options(parser, learner_class.Config)
    args = vars(parser.parse_args(argv))
    run_dir, resume = args.pop("run_dir"), args.pop("resume")
    overwrite, progress = args.pop("overwrite"), not args.pop("no_progress")
    algorithm = args.pop("algorithm")
    try:
        if resume is not None:
            from bilevel.runs.folder import RunFolder

            if run_dir is not None and Path(run_dir).resolve() != Path(resume).resolve():
                raise ValueError(f"--resume continues RUN in its own folder; --run-dir {str(run_dir)!r} names "
                                 "another")

            if set(args) - RESUMABLE:
                raise ValueError(f"--resume continues a run with its saved config; only --iterations and --threads "
                                 f"may change, not {sorted(set(args) - RESUMABLE)}")
            _, saved = RunFolder(resume).read_config()
            config = make_config(algorithm, {**saved, **args})
            run_dir = resume
        else:
            config = make_config(algorithm, args)
            run_dir = run_dir or Path("runs") / f"{algorithm}-{config.env}-s{config.seed}"
        learner = train(algorithm, config, run_dir, resume=resume is not None, overwrite=overwrite,
                        progress=None if progress else False)
    except ValueError as error:
        print(f"bilevel train: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{algorithm}: {learner.iteration} iterations, {learner.env_steps} env steps -> {run_dir}")
    return 0


def _eval(argv: list[str]) -> int:
    from bilevel.runs.loop import evaluate_run

    parser = argparse.ArgumentParser(
        prog="bilevel eval",
        description="Evaluate a run's last checkpoint, or an archived record's evaluation state.")
    parser.add_argument("run", type=Path)
    parser.add_argument("--device", default=None)
    parser.add_argument("--out", default="eval.json", metavar="NAME.json",
                        help="the result's file name inside RUN (default eval.json)")
    args, rest = parser.parse_known_args(argv)
    if len(rest) % 2 or any(not key.startswith("--") for key in rest[::2]):
        print(f"bilevel eval: options must be --KEY VALUE pairs; got {rest}", file=sys.stderr)
        return EXIT_BAD_INPUT
    options = {key[2:].replace("-", "_"): _literal(value) for key, value in zip(rest[::2], rest[1::2], strict=True)}
    try:
        result = evaluate_run(args.run, options, device=args.device, out_name=args.out)
    except (ValueError, TypeError) as error:
        print(f"bilevel eval: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(json.dumps(result, indent=2))
    return 0


def _plot(argv: list[str]) -> int:
    from bilevel.runs.plot import plot_curves
    from bilevel.runs.sweep import expand_sweeps, summarize

    parser = argparse.ArgumentParser(prog="bilevel plot", description="Learning curves with 95%% bands over seeds.")
    parser.add_argument("runs", type=Path, nargs="+", help="run folders or sweep folders")
    parser.add_argument("--x", default="env_steps")
    parser.add_argument("--y", default="return")
    parser.add_argument("--out", type=Path, help="the PNG (default: FIRST/plots/Y.png)")
    parser.add_argument("--xmax", type=float, help="use only the metrics rows with X (and env_steps, in the "
                        "algorithms' own figures) at most this; runs compared at a smaller budget than they ran")
    args = parser.parse_args(argv)
    out = args.out or args.runs[0] / "plots" / f"{args.y}.png"
    try:
        runs = expand_sweeps(args.runs)
        path = plot_curves(runs, out, x=args.x, y=args.y, x_max=args.xmax)
        extra = _algorithm_plots(runs, out.parent, args.xmax)
        for sweep in (p for p in args.runs if (p / "sweep.json").exists()):
            summarize(sweep, metric=args.y)
            print(sweep / "summary.md")
    except ValueError as error:
        print(f"bilevel plot: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(path)
    for figure in extra:
        print(figure)
    return 0


def _algorithm_plots(runs: list[Path], out_dir: Path, x_max: float | None) -> list[Path]:
    """Each algorithm's own figures (`Learner.plot_runs`) of the runs it trained."""
    from bilevel.runs.folder import RunFolder

    by_algorithm: dict[str, list[Path]] = {}
    for run in runs:
        algorithm, _ = RunFolder(run).read_config()
        by_algorithm.setdefault(algorithm, []).append(run)
    return [figure for name, group in sorted(by_algorithm.items())
            for figure in get_algorithm(name).plot_runs(group, out_dir, x_max=x_max)]


def _sweep(argv: list[str]) -> int:
    from bilevel.runs.sweep import load_spec, run_sweep

    parser = argparse.ArgumentParser(prog="bilevel sweep", description="Run a sweep spec on Ray.")
    parser.add_argument("spec", type=Path, nargs="?", help="the TOML spec (not with --resume)")
    parser.add_argument("--out", type=Path, help="the sweep folder (default: sweeps/NAME)")
    parser.add_argument("--resume", type=Path, metavar="SWEEP", help="run the unfinished trials of SWEEP")
    parser.add_argument("--address", help="a Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    args = parser.parse_args(argv)
    try:
        if args.resume is not None:
            record = args.resume / "sweep.json"
            if not record.exists():
                raise ValueError(f"{str(args.resume)!r} is not a sweep folder: it has no sweep.json")
            spec, sweep_dir = json.loads(record.read_text())["spec"], args.resume
        elif args.spec is not None:
            spec = load_spec(args.spec)
            sweep_dir = args.out or Path("sweeps") / str(spec.get("name", args.spec.stem))
        else:
            raise ValueError("give a spec file or --resume SWEEP")
        result = run_sweep(spec, sweep_dir, address=args.address, resume=args.resume is not None)
    except ValueError as error:
        print(f"bilevel sweep: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"ran {len(result['ran'])} trials, skipped {result['skipped']} finished -> {sweep_dir}")
    print((Path(sweep_dir) / "summary.md").read_text())
    return 0


def _report(argv: list[str]) -> int:
    from bilevel.runs.report import figure_conflicts, regenerate

    parser = argparse.ArgumentParser(
        prog="bilevel report",
        description="Regenerate the tables and figures of Markdown reports from the run and sweep folders "
        "their <!-- bilevel:summary/curves ... --> blocks name.",
    )
    parser.add_argument("reports", type=Path, nargs="+")
    args = parser.parse_args(argv)
    try:
        conflicts = figure_conflicts(args.reports)
    except OSError as error:
        print(f"bilevel report: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if conflicts:
        print("bilevel report: " + "\n".join(conflicts), file=sys.stderr)
        return EXIT_BAD_INPUT
    return _each_path("report", args.reports, lambda report: f"{report}: {regenerate(report)} blocks regenerated")


def _archive(argv: list[str]) -> int:
    from bilevel.runs.folder import archive

    parser = argparse.ArgumentParser(
        prog="bilevel archive",
        description="Copy each run's config.json, metrics.csv, evaluation JSONs and evaluation state (not its "
        "checkpoints) to RECORDS/RUN_NAME/, a folder small enough to commit that reports, plots and evaluations "
        "can read.",
    )
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--to", type=Path, required=True, metavar="RECORDS")
    parser.add_argument("--allow-shorter", action="store_true",
                        help="replace a record that holds more metrics rows than the run (refused by default)")
    args = parser.parse_args(argv)
    return _each_path("archive", args.runs,
                      lambda run: f"{run} -> {archive(run, args.to, allow_shorter=args.allow_shorter)}")


def _each_path(command: str, paths: list[Path], done: Callable[[Path], str]) -> int:
    """Print ``done(path)`` for each path in turn; at the first ``ValueError`` or ``OSError``, print
    ``bilevel COMMAND: error`` and return `EXIT_BAD_INPUT` (the later paths are left), else return 0."""
    for path in paths:
        try:
            line = done(path)
        except (ValueError, OSError) as error:
            print(f"bilevel {command}: {error}", file=sys.stderr)
            return EXIT_BAD_INPUT
        print(line)
    return 0


def _list(argv: list[str]) -> int:
    import bilevel.algorithms  # noqa: F401
    from bilevel.envs import family_names

    argparse.ArgumentParser(prog="bilevel list", description="Algorithms and environments.").parse_args(argv)
    print("algorithms:")
    for name, cls in sorted(ALGORITHMS.items()):
        print(f"  {name:<16} envs: {', '.join(cls.envs) or 'any'}")
    print("task families:")
    for name in family_names():
        print(f"  {name}")
    return 0


COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "sweep": _sweep, "report": _report, "archive": _archive,
            "list": _list}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__.strip(), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else EXIT_BAD_INPUT
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
