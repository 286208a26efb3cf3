"""``docs/reproductions/meta-attention/table.py``, which computes the MATT report's tables from the run
records: per-seed values, mean ± standard error over seeds, the threshold crossing and the budget cut."""

import csv
import importlib.util
import statistics
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def load_table_module():
    spec = importlib.util.spec_from_file_location("matt_table", ROOT / "docs/reproductions/meta-attention/table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_run(folder: Path, returns: list[float]) -> None:
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["iteration", "env_steps", "return", "seconds"])
        writer.writeheader()
        for i, value in enumerate(returns, 1):
            writer.writerow({"iteration": i, "env_steps": 1000 * i, "return": value, "seconds": 2.0})


def test_learner_rows_are_mean_and_standard_error_of_the_per_seed_values_within_the_budget(tmp_path, capsys):
    table = load_table_module()
    seeds = {0: [-300.0, -200.0, -100.0, -90.0, -80.0, -70.0, -60.0, 500.0],
             1: [-400.0, -300.0, -260.0, -240.0, -100.0, -50.0, -40.0, 500.0],
             2: [-350.0, -240.0, -230.0, -220.0, -210.0, -200.0, -190.0]}
    for seed, returns in seeds.items():
        write_run(tmp_path / "records" / f"td3-s{seed}", returns)
    out = tmp_path / "all.csv"
    table.main(str(tmp_path / "records"), str(out), -250.0, 7000)
    printed = capsys.readouterr().out

    runs = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in printed.splitlines() if line.startswith("| td3-s")}
    assert [runs[f"td3-s{s}"][5] for s in range(3)] == ["2000", "4000", "2000"], "first env steps at >= -250"
    assert all(runs[f"td3-s{s}"][1] == "7000" and runs[f"td3-s{s}"][7] == "14" for s in range(3))

    last5 = [statistics.mean(seeds[s][2:7]) for s in range(3)]
    learner_row = next(line for line in printed.splitlines() if line.startswith("| td3 |"))
    mean, error = (float(x) for x in learner_row.split("|")[4].split("±"))
    assert mean == pytest.approx(statistics.mean(last5), abs=0.05)
    assert error == pytest.approx(statistics.stdev(last5) / 3**0.5, abs=0.05)
    with open(out) as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 21 and max(int(r["env_steps"]) for r in rows) == 7000, "the 500s past the budget are cut"


def test_stage_columns_count_only_the_evaluations_after_the_window_start(tmp_path, capsys):
    table = load_table_module()
    seeds = {0: [-100.0, 250.0, 150.0, 210.0, 300.0, 900.0], 1: [300.0, -50.0, 190.0, 200.0, -20.0, 900.0]}
    for seed, returns in seeds.items():
        write_run(tmp_path / "records" / f"td3-s{seed}", returns)
    table.main(str(tmp_path / "records"), str(tmp_path / "all.csv"), 0.0, 5000, 2000, 200.0)
    printed = capsys.readouterr().out

    header = next(line for line in printed.splitlines() if line.startswith("| run |"))
    assert "mean 3k-5k" in header and "evaluations >= 200 after 2k" in header
    runs = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in printed.splitlines() if line.startswith("| td3-s")}
    window_means = [statistics.mean(seeds[s][2:5]) for s in range(2)]
    assert [runs[f"td3-s{s}"][4] for s in range(2)] == [str(round(m)) for m in window_means]
    assert [runs[f"td3-s{s}"][7] for s in range(2)] == ["2", "1"], "returns >= 200 among evaluations 3k-5k"
    learner_row = next(line for line in printed.splitlines() if line.startswith("| td3 |"))
    mean, error = (float(x) for x in learner_row.split("|")[5].split("±"))
    assert mean == pytest.approx(statistics.mean(window_means), abs=0.05)
    assert error == pytest.approx(statistics.stdev(window_means) / 2**0.5, abs=0.05)
    with pytest.raises(ValueError, match="AFTER=5000"):
        table.main(str(tmp_path / "records"), str(tmp_path / "all.csv"), 0.0, 5000, 5000)


def test_a_folder_pattern_keeps_only_the_runs_it_matches(tmp_path, capsys):
    table = load_table_module()
    for seed in range(4):
        write_run(tmp_path / "records" / f"td3-s{seed}", [100.0 * seed] * 5)
    table.main(str(tmp_path / "records" / "*-s[0-2]"), str(tmp_path / "all.csv"), -250.0)
    printed = capsys.readouterr().out
    learner_row = next(line for line in printed.splitlines() if line.startswith("| td3 |"))
    assert learner_row.split("|")[2].strip() == "3" and "td3-s3" not in printed
    assert float(learner_row.split("|")[4].split("±")[0]) == pytest.approx(100.0)


def test_welch_t_of_each_learner_against_its_base_on_the_last_five(tmp_path, capsys):
    table = load_table_module()
    last5 = {"td3": [10.0, 30.0, 20.0], "td3-matt": [50.0, 80.0, 65.0, 45.0], "td3-mc": [0.0]}
    for learner, values in last5.items():
        for seed, value in enumerate(values):
            write_run(tmp_path / "records" / f"{learner}-s{seed}", [value] * 6)
    table.main(str(tmp_path / "records"), str(tmp_path / "all.csv"), -250.0)
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| td3-m")]
    compared = [row for row in rows if row.split("|")[2].strip() == "td3"]
    assert len(compared) == 1, "td3-mc has one seed, so it is not compared"
    matt, base = last5["td3-matt"], last5["td3"]
    t = (statistics.mean(matt) - statistics.mean(base)) / (
        statistics.variance(matt) / len(matt) + statistics.variance(base) / len(base)) ** 0.5
    assert float(compared[0].split("|")[3].split("(")[0]) == pytest.approx(t, abs=0.005)


def test_mann_whitney_u_counts_the_pairs_a_learner_wins_with_the_exact_p(tmp_path, capsys):
    table = load_table_module()
    last5 = {"td3": [10.0, 30.0, -500.0], "td3-matt": [50.0, 80.0, 65.0, 20.0]}
    for learner, values in last5.items():
        for seed, value in enumerate(values):
            write_run(tmp_path / "records" / f"{learner}-s{seed}", [value] * 6)
    table.main(str(tmp_path / "records"), str(tmp_path / "all.csv"), -250.0)
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| td3-matt | td3 |"))
    u_cell = row.split("|")[4].strip()
    wins = sum(m > b for m in last5["td3-matt"] for b in last5["td3"])
    assert wins == 11
    assert u_cell.startswith(f"{wins} of 12 ")
    # of the C(7, 3) = 35 equally likely rankings, U >= 11 has two (11, 12) and U <= 1 two more
    assert float(u_cell.split("(")[1].rstrip(")")) == pytest.approx(4 / 35, abs=0.0005)


def test_runs_of_several_folders_are_told_apart_and_compared_with_the_one_base_learner(tmp_path, capsys):
    table = load_table_module()
    last5 = {("decayed", "td3"): [10.0, 30.0, 20.0], ("decayed", "td3-matt"): [15.0, 25.0],
             ("live", "td3-matt"): [50.0, 80.0, 65.0]}
    for (folder, learner), values in last5.items():
        for seed, value in enumerate(values):
            write_run(tmp_path / folder / f"{learner}-s{seed}", [value] * 6)
    table.main(f"{tmp_path / 'decayed'},{tmp_path / 'live' / '*-s[0-9]'}", str(tmp_path / "all.csv"), -250.0)
    lines = capsys.readouterr().out.splitlines()
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines if line.startswith("| td3")]
    learners = {row[0]: row for row in cells if row[1].isdigit() and not row[0][-1].isdigit()}
    assert set(learners) == {"td3 (decayed)", "td3-matt (decayed)", "td3-matt (live)"}
    assert float(learners["td3-matt (live)"][3].split("±")[0]) == pytest.approx(65.0)
    compared = {row[0]: row[1] for row in cells if row[1].startswith("td3")}
    assert compared == {"td3-matt (decayed)": "td3 (decayed)", "td3-matt (live)": "td3 (decayed)"}
    with open(tmp_path / "all.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 6 * 8


def test_the_landing_is_held_from_the_last_of_the_first_five_evaluations_averaging_good(tmp_path, capsys):
    table = load_table_module()
    runs = {"td3-s0": [0.0, 250.0, 250.0, 250.0, 100.0, 150.0, 300.0, 300.0],  # first five-mean >= 200 ends at 6k
            "td3-s1": [0.0] * 8,  # never
            "td3-matt-s0": [300.0, 300.0, 300.0, 300.0, 300.0, 0.0, 0.0, 0.0],  # 5k
            "td3-matt-s1": [0.0, 0.0, 200.0, 200.0, 200.0, 200.0, 200.0, 0.0]}  # 7k
    for run, returns in runs.items():
        write_run(tmp_path / "records" / run, returns)
    table.main(str(tmp_path / "records"), str(tmp_path / "all.csv"), 0.0, 8000, 0, 200.0)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in capsys.readouterr().out.splitlines() if "k /" in line}
    assert rows["td3"][2:5] == ["6k / never", "never", "-"]
    assert rows["td3-matt"][2:4] == ["5k / 7k", "6k"]
    # pairs in which td3-matt lands earlier: 5k beats 6k and never, 7k beats never; of the C(4, 2) = 6 equally likely
    # orders, U >= 3 has two and U <= 1 two more
    assert rows["td3-matt"][4] == "3 of 4 (0.667)"
    assert table.first_held([{"env_steps": 1000 * i} for i in range(1, 5)], [300.0] * 4, 200.0) == float("inf")
