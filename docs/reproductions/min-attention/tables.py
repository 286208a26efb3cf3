"""Rewrite the report's per-iteration table of the MB-MPO runs.

    python docs/reproductions/min-attention/tables.py docs/reproductions/records/min-attention/alpha-*

replaces the lines between ``<!-- runs table -->`` and ``<!-- end runs table -->`` in
docs/reproductions/min-attention.md with one row per iteration of every run (or record) given, from its
metrics.csv. The runs' metrics are kept in their records (``bilevel archive``), not copied here.
"""

import csv
import re
import sys
from pathlib import Path

REPORT = Path("docs/reproductions/min-attention.md")
BEGIN, END = "<!-- runs table -->\n", "\n<!-- end runs table -->"
HEADER = ("| alpha | seed | iteration | real steps | return (200 steps) | imagined return pre, first -> last meta-step "
          "| imagined post, last | `jacobian_sq` | `jerk_sq` | log-std | holdout MSE | s / iteration |\n"
          "|---|---|---|---|---|---|---|---|---|---|---|---|")


def table_rows(run: Path) -> list[str]:
    alpha, seed = re.fullmatch(r"alpha-(.+)-s(\d+)", run.name).groups()
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))

    def cell(row: dict[str, str], key: str, fmt: str = "{:.1f}") -> str:
        return fmt.format(float(row[key]))

    return [f"| {alpha} | {seed} | {r['iteration']} | {int(float(r['env_steps'])):,} | {cell(r, 'return')} | "
            f"{cell(r, 'imagined_return_pre_first')} -> {cell(r, 'imagined_return_pre_last')} | "
            f"{cell(r, 'imagined_return_post_last')} | {cell(r, 'jacobian_sq', '{:.3g}')} | "
            f"{cell(r, 'jerk_sq', '{:.3g}')} | {cell(r, 'policy_log_std', '{:.2f}')} | "
            f"{cell(r, 'model_holdout_mse', '{:.3f}')} | {cell(r, 'seconds', '{:.0f}')} |" for r in rows]


def main(runs: list[Path]) -> None:
    table = "\n".join([HEADER, *(line for run in runs for line in table_rows(run))])
    text = REPORT.read_text()
    pattern = re.escape(BEGIN) + ".*?" + re.escape(END)
    if not re.search(pattern, text, flags=re.S):
        raise SystemExit(f"{REPORT} has no runs table markers")
    REPORT.write_text(re.sub(pattern, lambda _: BEGIN + table + END, text, flags=re.S))


if __name__ == "__main__":
    main([Path(arg) for arg in sys.argv[1:]])
