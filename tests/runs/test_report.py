"""Reports regenerated from run folders: blocks rewritten, prose kept, bad blocks named."""

import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bilevel.runs.folder import MetricsWriter, RunFolder, final_mean, metric_series
from bilevel.runs.report import regenerate


def fake_run(path, lr, seed, finals):
    folder = RunFolder(path)
    folder.path.mkdir(parents=True)
    folder.write_config("maml-trpo", {"env": "navigation-2d", "seed": seed, "inner_lr": lr})
    writer = MetricsWriter(folder.metrics_path)
    for step, value in enumerate(finals, 1):
        writer.append({"iteration": step, "env_steps": 100 * step, "return": value})


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake_run(tmp_path / "runs" / "lr0.1-s0", 0.1, 0, [-50.0, -40.0, -30.0])
    fake_run(tmp_path / "runs" / "lr0.1-s1", 0.1, 1, [-52.0, -44.0, -34.0])
    fake_run(tmp_path / "runs" / "lr0.5-s0", 0.5, 0, [-60.0, -20.0, -10.0])
    return tmp_path


def test_blocks_are_rewritten_from_the_folders_and_the_prose_is_kept(runs):
    report = runs / "docs" / "report.md"
    report.parent.mkdir()
    prose = "# Report\n\nWritten by hand.\n\n"
    report.write_text(
        prose
        + "<!-- bilevel:summary runs/lr* metric=return last=2 -->\nstale table\n<!-- bilevel:end -->\n"
        + "\nMore prose.\n\n"
        + "<!-- bilevel:curves runs/lr* out=figs/return.png -->\nstale\n<!-- bilevel:end -->\n"
    )
    assert regenerate(report) == 2
    text = report.read_text()
    assert text.startswith(prose) and "\nMore prose.\n" in text and "stale" not in text
    finals = [statistics.mean([-40.0, -30.0]), statistics.mean([-44.0, -34.0])]
    row = next(line for line in text.splitlines() if "inner_lr=0.1" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and float(cells[2]) == pytest.approx(statistics.mean(finals), abs=1e-3)
    assert float(cells[3]) == pytest.approx(statistics.stdev(finals) / 2**0.5, rel=0.05)
    assert "inner_lr=0.5" in text and "![return against env_steps](figs/return.png)" in text
    assert (report.parent / "figs" / "return.png").stat().st_size > 1000

    once = report.read_text()
    regenerate(report)
    assert report.read_text() == once, "regenerating twice changes nothing"


def test_a_block_naming_no_folder_is_reported_with_its_line_and_nothing_is_written(runs):
    report = runs / "report.md"
    original = "line one\n<!-- bilevel:summary runs/no-such-* -->\nold\n<!-- bilevel:end -->\n"
    report.write_text(original)
    with pytest.raises(ValueError, match=r"report\.md:2.*no-such"):
        regenerate(report)
    assert report.read_text() == original


def test_cli_report_regenerates_and_exits_2_naming_a_bad_block(runs, capsys):
    from bilevel import cli

    good, bad = runs / "good.md", runs / "bad.md"
    good.write_text("<!-- bilevel:summary runs/lr0.5-* -->\n<!-- bilevel:end -->\n")
    assert cli.main(["report", str(good)]) == 0
    assert "inner_lr" not in good.read_text() and "| maml-trpo | 1 |" in good.read_text()
    bad.write_text("<!-- bilevel:curves runs/lr* -->\n<!-- bilevel:end -->\n")
    assert cli.main(["report", str(bad)]) == 2
    assert "out=FILE.png" in capsys.readouterr().err


def test_labels_name_only_what_differs_within_an_algorithm(tmp_path):
    from bilevel.runs.plot import group_by_config

    for name, algorithm, config in [("a0", "td3", {"seed": 0, "policy_noise": 0.2}),
                                    ("a1", "td3", {"seed": 1, "policy_noise": 0.2}),
                                    ("b0", "td3-matt", {"seed": 0, "policy_noise": 0.2, "attention_lr": 1e-4}),
                                    ("b1", "td3-matt", {"seed": 0, "policy_noise": 0.2, "attention_lr": 1e-3})]:
        RunFolder(tmp_path / name).path.mkdir()
        RunFolder(tmp_path / name).write_config(algorithm, config)
    groups = group_by_config([RunFolder(tmp_path / n) for n in ("a0", "a1", "b0", "b1")])
    assert {label: len(g) for label, g in groups.items()} == {
        "td3": 2, "td3-matt attention_lr=0.0001": 1, "td3-matt attention_lr=0.001": 1}


def test_xmax_cuts_the_curves_and_a_bad_value_is_named(runs):
    report = runs / "report.md"
    report.write_text("<!-- bilevel:curves runs/lr* out=cut.png xmax=2000 -->\n<!-- bilevel:end -->\n")
    assert regenerate(report) == 1 and (runs / "cut.png").stat().st_size > 1000
    rows = [{"env_steps": 1000.0 * k, "return": float(k)} for k in range(1, 4)]
    assert metric_series(rows, "env_steps", "return", x_max=2000) == ([1000.0, 2000.0], [1.0, 2.0])
    report.write_text("<!-- bilevel:curves runs/lr* out=cut.png xmax=two -->\n<!-- bilevel:end -->\n")
    with pytest.raises(ValueError, match=r"report\.md:1.*xmax.*'two'"):
        regenerate(report)


def test_xmax_cuts_the_rows_a_summary_averages(runs):
    report = runs / "report.md"
    report.write_text("<!-- bilevel:summary runs/lr0.1-* last=2 xmax=200 -->\n<!-- bilevel:end -->\n")
    assert regenerate(report) == 1
    text = report.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| maml-trpo"))
    finals = [statistics.mean([-50.0, -40.0]), statistics.mean([-52.0, -44.0])]
    assert float(row.strip("|").split("|")[2]) == pytest.approx(statistics.mean(finals), abs=1e-3)
    assert "with env_steps <= 200" in text
    report.write_text("<!-- bilevel:summary runs/lr* xmax=lots -->\n<!-- bilevel:end -->\n")
    with pytest.raises(ValueError, match=r"report\.md:1.*xmax.*'lots'"):
        regenerate(report)


def test_a_summary_of_several_metrics_has_a_column_pair_each(runs):
    for name, values in [("lr0.1-s0", [1.0, 3.0]), ("lr0.1-s1", [5.0, 7.0])]:
        writer = MetricsWriter(RunFolder(runs / "runs" / name).metrics_path)
        for step, value in enumerate(values, 4):
            writer.append({"iteration": step, "env_steps": 100 * step, "return": -10.0, "jerk_sq": value})
    report = runs / "report.md"
    report.write_text("<!-- bilevel:summary runs/lr* metric=return,jerk_sq last=2 -->\n<!-- bilevel:end -->\n")
    regenerate(report)
    lines = report.read_text().splitlines()
    assert "final return" in lines[1] and "final jerk_sq" in lines[1] and lines[1].count("standard error") == 2
    row = [c.strip() for c in next(line for line in lines if "inner_lr=0.1" in line).strip("|").split("|")]
    assert row[1] == "2" and float(row[2]) == -10.0 and float(row[3]) == 0.0
    assert float(row[4]) == pytest.approx(statistics.mean([2.0, 6.0]))
    assert float(row[5]) == pytest.approx(statistics.stdev([2.0, 6.0]) / 2**0.5, rel=0.05)
    other = [c.strip() for c in next(line for line in lines if "inner_lr=0.5" in line).strip("|").split("|")]
    assert other[1] == "1" and other[4] == "" and other[5] == "", "a config without the metric leaves its cells empty"


@given(values=st.lists(st.floats(-1e6, 1e6), max_size=12), last=st.integers(1, 5), x_max=st.integers(0, 13))
def test_final_mean_averages_the_last_rows_within_the_budget(values, last, x_max):
    rows = [{"env_steps": float(k), "return": v} for k, v in enumerate(values, 1)] + [{"env_steps": 99.0}]
    kept = values[:x_max][-last:]
    final = final_mean(rows, "return", last, x_max=x_max)
    assert final is None if not kept else final == pytest.approx(sum(kept) / len(kept), abs=1e-6)
    assert final_mean(rows, "return", last) == (sum(values[-last:]) / len(values[-last:]) if values else None)


def test_a_field_missing_from_an_older_config_counts_as_its_default(tmp_path):
    from bilevel.runs.learner import get_algorithm
    from bilevel.runs.plot import group_by_config

    default = get_algorithm("td3-matt").Config().meta_interval
    for name, config in [("old", {"seed": 0}), ("new", {"seed": 1, "meta_interval": default}),
                         ("other", {"seed": 2, "meta_interval": default + 3})]:
        RunFolder(tmp_path / name).path.mkdir()
        RunFolder(tmp_path / name).write_config("td3-matt", config)
    groups = group_by_config([RunFolder(tmp_path / n) for n in ("old", "new", "other")])
    assert {label: [f.path.name for f in g] for label, g in groups.items()} == {
        f"td3-matt meta_interval={default}": ["old", "new"], f"td3-matt meta_interval={default + 3}": ["other"]}


def test_an_archived_record_keeps_config_metrics_and_evaluations_not_checkpoints_and_reports_from_it(runs, capsys):
    from bilevel import cli

    run = RunFolder(runs / "runs" / "lr0.1-s0")
    run.write_json("eval-select.json", {"returns": [1.0, 2.0]})
    (run.path / "checkpoints").mkdir()
    (run.path / "checkpoints" / "last.pt").write_bytes(b"weights")
    assert cli.main(["archive", str(run.path), str(runs / "runs" / "lr0.1-s1"), "--to", "records"]) == 0
    record = runs / "records" / "lr0.1-s0"
    assert sorted(p.name for p in record.iterdir()) == ["config.json", "eval-select.json", "metrics.csv"]
    assert cli.main(["eval", str(record)]) == 2
    assert "has no checkpoint and no evaluation_state.pt" in capsys.readouterr().err
    run.evaluation_state_path.write_bytes(b"policy")
    assert cli.main(["archive", str(run.path), "--to", "records"]) == 0
    assert (record / "evaluation_state.pt").read_bytes() == b"policy"
    assert RunFolder(record).read_config() == run.read_config()
    assert RunFolder(record).read_metrics() == run.read_metrics()

    report = runs / "from-records.md"
    report.write_text("<!-- bilevel:summary records/lr0.1-* last=2 -->\n<!-- bilevel:end -->\n")
    regenerate(report)
    assert "| maml-trpo | 2 |" in report.read_text()

    assert cli.main(["archive", str(runs / "runs" / "missing"), "--to", "records"]) == 2
    assert "'" + str(runs / "runs" / "missing") + "' is not a run folder" in capsys.readouterr().err


def test_archiving_a_run_behind_its_record_is_refused_unless_allowed(runs, capsys):
    from bilevel import cli

    run = RunFolder(runs / "runs" / "lr0.1-s0")
    assert cli.main(["archive", str(run.path), "--to", "records"]) == 0
    full = (runs / "records" / "lr0.1-s0" / "metrics.csv").read_text()
    rows = run.read_metrics()
    assert len(rows) >= 2
    writer = MetricsWriter(run.metrics_path)
    writer.truncate(int(rows[0]["iteration"]))
    assert cli.main(["archive", str(run.path), "--to", "records"]) == 2
    err = capsys.readouterr().err
    assert "has 1 metrics rows and its record" in err and f"{len(rows)}: archiving would shorten" in err
    assert (runs / "records" / "lr0.1-s0" / "metrics.csv").read_text() == full
    assert cli.main(["archive", str(run.path), "--to", "records", "--allow-shorter"]) == 0
    assert RunFolder(runs / "records" / "lr0.1-s0").read_metrics() == run.read_metrics()


def test_two_blocks_drawing_one_figure_from_different_runs_are_refused_before_anything_is_written(runs):
    from bilevel import cli
    from bilevel.runs.report import figure_conflicts

    (runs / "docs" / "sub").mkdir(parents=True)
    first, second = runs / "docs" / "a.md", runs / "docs" / "sub" / "b.md"
    first.write_text("<!-- bilevel:curves runs/lr0.1-* out=figs/r.png -->\nold\n<!-- bilevel:end -->\n")
    same = "intro\n<!-- bilevel:curves runs/lr0.1-* out=../figs/r.png -->\nold\n<!-- bilevel:end -->\n"
    second.write_text(same)
    assert figure_conflicts([first, second]) == [], "the same figure from the same arguments is no clash"

    clash = same.replace("runs/lr0.1-*", "runs/lr0.5-* xmax=200")
    second.write_text(clash)
    [message] = figure_conflicts([first, second])
    assert "b.md:2" in message and "a.md:1" in message and "lr0.5" in message and "lr0.1" in message
    assert cli.main(["report", str(first), str(second)]) == 2
    assert first.read_text().endswith("old\n<!-- bilevel:end -->\n") and second.read_text() == clash
    assert not (runs / "docs" / "figs" / "r.png").exists()


def test_one_report_drawing_one_figure_twice_differently_is_refused(runs):
    report = runs / "report.md"
    original = ("<!-- bilevel:curves runs/lr0.1-* out=r.png -->\n<!-- bilevel:end -->\n"
                "<!-- bilevel:curves runs/lr0.5-* out=r.png -->\n<!-- bilevel:end -->\n")
    report.write_text(original)
    with pytest.raises(ValueError, match=r"report\.md:3 and .*report\.md:1 both draw r\.png"):
        regenerate(report)
    assert report.read_text() == original and not (runs / "r.png").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- bilevel:summary runs/lr0.1-* -->\nold\nprose\n<!-- bilevel:summary runs/lr0.5-s0 -->\nold\n"
         "<!-- bilevel:end -->\n", r"report\.md:1: the block has no <!-- bilevel:end --> before the next"),
        ("prose\n<!-- bilevel:summary runs/lr0.1-* -->\nold\n", r"report\.md:2: the block has no"),
        ("prose\n<!-- bilevel:end -->\n", r"report\.md:2: .* without an opening"),
        ("<!-- bilevel:summary runs/lr0.1-s0 runs/lr0.1-typo -->\nold\n<!-- bilevel:end -->\n",
         r"report\.md:1: no folder matches 'runs/lr0\.1-typo'"),
        ("<!-- bilevel:summary runs/lr0.1-* last=0 -->\nold\n<!-- bilevel:end -->\n", r"report\.md:1: last .* 0"),
        ("<!-- bilevel:summary runs/lr0.1-* last=five -->\nold\n<!-- bilevel:end -->\n", r"report\.md:1: last.*'five'"),
        ("<!-- bilevel:curves runs/lr0.1-* y=nonexistent out=c.png -->\nold\n<!-- bilevel:end -->\n",
         r"report\.md:1: .*'nonexistent'"),
    ],
)
def test_malformed_blocks_are_named_with_their_line_and_nothing_is_written(runs, text, message):
    """A missing end marker would let a block swallow the prose and the next block; a mistyped folder would
    silently drop out of the mean; ``last=0`` would average every row."""
    report = runs / "report.md"
    report.write_text(text)
    with pytest.raises(ValueError, match=message):
        regenerate(report)
    assert report.read_text() == text
