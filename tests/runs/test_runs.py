"""The run machinery with a small learner: exact resume, atomic files, CLI errors."""

import csv
import dataclasses
import json

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats

from bilevel import cli
from bilevel.runs import Learner, RunConfig, RunFolder, derive_seed, register, train
from bilevel.runs.loop import load_learner, make_config
from bilevel.runs.plot import seed_band, seeds_label


class SimulatedKill(Exception):
    """Stands for a process killed in the middle of an iteration."""


@dataclasses.dataclass
class BanditConfig(RunConfig):
    """REINFORCE on a Gaussian bandit whose reward is -||a - 1||^2."""

    env: str = "bandit"
    """The only env."""
    batch: int = 16
    """Actions sampled per iteration."""
    lr: float = 0.05
    """Adam learning rate."""

    def validate(self) -> None:
        super().validate()
        if self.batch < 1:
            raise ValueError(f"`batch` must be >= 1; got {self.batch}")


@register("test-bandit")
class BanditLearner(Learner):
    """A REINFORCE bandit learner whose randomness is all in its own generator."""

    Config = BanditConfig
    envs = ("bandit",)
    kill_in_iteration = 0

    def __init__(self, config, device):
        super().__init__(config, device)
        self.mean = torch.zeros(3, requires_grad=True)
        self.optimizer = torch.optim.Adam([self.mean], lr=config.lr)
        self.generator = torch.Generator().manual_seed(derive_seed(config.seed, 1))

    def step(self):
        if self.kill_in_iteration == self.iteration + 1:
            raise SimulatedKill(f"killed in iteration {self.iteration + 1}")
        noise = torch.randn(self.config.batch, 3, generator=self.generator)
        actions = (self.mean + noise).detach()
        rewards = -((actions - 1) ** 2).sum(-1)
        log_probs = -0.5 * ((actions - self.mean) ** 2).sum(-1)
        loss = -(log_probs * (rewards - rewards.mean())).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.env_steps += self.config.batch
        return {"return": float(rewards.mean())}

    def evaluate(self, scale=1.0):
        return {"distance": float(scale * (self.mean.detach() - 1).norm())}

    def learner_state(self):
        return {"mean": self.mean.detach().clone(), "optimizer": self.optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_learner_state(self, state):
        with torch.no_grad():
            self.mean.copy_(state["mean"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.generator.set_state(state["generator"])

    @staticmethod
    def plot_runs(run_dirs, out_dir, *, x_max=None):
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "bandit_runs.txt"
        path.write_text("\n".join(sorted(p.name for p in run_dirs)))
        return [path]


@register("test-bandit-global-rng")
class GlobalRngBandit(BanditLearner):
    """The bandit drawing from the global torch and NumPy generators (as third-party code does) instead of its
    own: exact resumption then rests on the runner saving and restoring those."""

    def __init__(self, config, device):
        super().__init__(config, device)
        self.generator = None

    def step(self):
        if self.kill_in_iteration == self.iteration + 1:
            raise SimulatedKill(f"killed in iteration {self.iteration + 1}")
        noise = torch.randn(self.config.batch, 3) + torch.from_numpy(np.random.standard_normal((self.config.batch, 3)))  # noqa: NPY002
        actions = (self.mean + noise.to(self.mean.dtype)).detach()
        rewards = -((actions - 1) ** 2).sum(-1)
        loss = -(-0.5 * ((actions - self.mean) ** 2).sum(-1) * (rewards - rewards.mean())).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        self.env_steps += self.config.batch
        return {"return": float(rewards.mean())}

    def learner_state(self):
        return {"mean": self.mean.detach().clone(), "optimizer": self.optimizer.state_dict()}

    def load_learner_state(self, state):
        with torch.no_grad():
            self.mean.copy_(state["mean"])
        self.optimizer.load_state_dict(state["optimizer"])


def bandit_config(**overrides):
    return make_config("test-bandit", {"iterations": 12, "checkpoint_every": 4, "device": "cpu", **overrides})


def metric_rows(run_dir):
    with (run_dir / "metrics.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path, monkeypatch):
    straight = train("test-bandit", bandit_config(), tmp_path / "straight", progress=False)

    monkeypatch.setattr(BanditLearner, "kill_in_iteration", 7)
    with pytest.raises(SimulatedKill):
        train("test-bandit", bandit_config(), tmp_path / "killed", progress=False)
    monkeypatch.setattr(BanditLearner, "kill_in_iteration", 0)
    assert len(metric_rows(tmp_path / "killed")) == 6
    resumed = train("test-bandit", bandit_config(), tmp_path / "killed", resume=True, progress=False)

    assert torch.equal(resumed.mean, straight.mean)
    assert resumed.iteration == straight.iteration == 12
    rows = metric_rows(tmp_path / "killed")
    assert [int(r["iteration"]) for r in rows] == list(range(1, 13))
    assert [r["return"] for r in rows] == [r["return"] for r in metric_rows(tmp_path / "straight")]


def test_resume_extends_the_budget_and_eval_writes_json(tmp_path):
    train("test-bandit", bandit_config(iterations=4), tmp_path / "run", progress=False)
    learner = train("test-bandit", bandit_config(iterations=8), tmp_path / "run", resume=True, progress=False)
    assert learner.iteration == 8 and learner.env_steps == 8 * 16
    assert cli.main(["eval", str(tmp_path / "run"), "--scale", "2.0"]) == 0
    result = json.loads((tmp_path / "run" / "eval.json").read_text())
    _, restored = load_learner(tmp_path / "run")
    assert result["distance"] == pytest.approx(2 * float((restored.mean.detach() - 1).norm()))
    assert result["iteration"] == 8


def test_eval_out_keeps_each_evaluation_in_its_own_file(tmp_path, capsys):
    train("test-bandit", bandit_config(iterations=4), tmp_path / "run", progress=False)
    assert cli.main(["eval", str(tmp_path / "run"), "--scale", "2.0", "--out", "eval-scale2.json"]) == 0
    assert cli.main(["eval", str(tmp_path / "run"), "--scale", "3.0", "--out", "eval-scale3.json"]) == 0
    two, three = (json.loads((tmp_path / "run" / f"eval-scale{k}.json").read_text()) for k in (2, 3))
    assert three["distance"] == pytest.approx(1.5 * two["distance"]) and two["distance"] > 0
    assert not (tmp_path / "run" / "eval.json").exists()
    for bad in ("../eval.json", "eval.txt", ".eval.json"):
        assert cli.main(["eval", str(tmp_path / "run"), "--out", bad]) == 2
        assert repr(bad) in capsys.readouterr().err
    assert not (tmp_path / "eval.json").exists()


def test_run_folder_layout_and_no_leftover_temporary_files(tmp_path):
    train("test-bandit", bandit_config(), tmp_path / "run", progress=False)
    folder = RunFolder(tmp_path / "run")
    algorithm, config = folder.read_config()
    assert algorithm == "test-bandit" and config["batch"] == 16 and config["seed"] == 0
    assert folder.checkpoint_path.exists()
    assert not [p for p in folder.path.rglob(".*") if p.is_file()]
    assert len(folder.read_metrics()) == 12


def test_cli_train_and_plot(tmp_path, capsys):
    for seed in (0, 1):
        code = cli.main(["train", "test-bandit", "--seed", str(seed), "--iterations", "5", "--batch", "8",
                         "--device", "cpu", "--run-dir", str(tmp_path / f"s{seed}"), "--no-progress"])
        assert code == 0
    assert RunFolder(tmp_path / "s1").read_config()[1]["batch"] == 8
    assert cli.main(["plot", str(tmp_path / "s0"), str(tmp_path / "s1"), "--out", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 1000
    assert (tmp_path / "bandit_runs.txt").read_text() == "s0\ns1", "the algorithm's own plot hook saw both runs"
    assert str(tmp_path / "bandit_runs.txt") in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "no-such-algorithm"], "no-such-algorithm"),
        (["train", "test-bandit", "--env", "moon"], "moon"),
        (["train", "test-bandit", "--iterations", "-3"], "iterations"),
        (["train", "test-bandit", "--batch", "0"], "batch"),
        (["train", "test-bandit", "--device", "cuda:7"], "cuda:7"),
    ],
)
def test_cli_bad_input_exits_2_naming_it(tmp_path, capsys, argv, message):
    run_dir = tmp_path / "run"
    assert cli.main([*argv, "--run-dir", str(run_dir)]) == 2
    assert message in capsys.readouterr().err
    assert not run_dir.exists()


def test_cli_unknown_option_exits_2(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "test-bandit", "--no-such-key", "3", "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2


def test_existing_run_is_not_overwritten_unless_asked(tmp_path, capsys):
    run = str(tmp_path / "run")
    base = ["train", "test-bandit", "--iterations", "2", "--device", "cpu", "--run-dir", run, "--no-progress"]
    assert cli.main(base) == 0
    before = (tmp_path / "run" / "metrics.csv").read_text()
    assert cli.main([*base[:3], "3", *base[4:]]) == 2
    assert "exists" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.csv").read_text() == before
    assert cli.main([*base, "--overwrite"]) == 0
    assert cli.main(["train", "test-bandit", "--resume", run, "--batch", "4"]) == 2
    assert cli.main(["train", "test-bandit", "--resume", run, "--run-dir", str(tmp_path / "elsewhere")]) == 2
    assert "--run-dir" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()


def test_threads_apply_while_training_and_are_restored(tmp_path):
    seen = []
    before = torch.get_num_threads()
    train("test-bandit", bandit_config(iterations=2, threads=1), tmp_path / "one", progress=False,
          after_iteration=lambda learner: seen.append(torch.get_num_threads()))
    assert seen == [1, 1]
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads"):
        bandit_config(threads=-1)


def test_every_algorithm_takes_threads_and_resume_may_change_it(tmp_path):
    from bilevel.runs.learner import ALGORITHMS

    assert RunConfig.threads == 1
    for name, learner_class in ALGORITHMS.items():
        field = {f.name: f for f in dataclasses.fields(learner_class.Config)}["threads"]
        assert field.type in (int, "int"), name
    run = str(tmp_path / "run")
    assert cli.main(["train", "test-bandit", "--iterations", "2", "--threads", "1", "--device", "cpu",
                     "--run-dir", run, "--no-progress"]) == 0
    assert cli.main(["train", "test-bandit", "--resume", run, "--iterations", "3", "--threads", "2"]) == 0
    assert len(metric_rows(tmp_path / "run")) == 3


def test_every_algorithm_prints_its_options(capsys):
    """Field docs may contain '%' (argparse formats help strings with it)."""
    from bilevel.runs.learner import ALGORITHMS, get_algorithm

    get_algorithm("test-bandit")
    for name in ALGORITHMS:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["train", name, "--help"])
        assert exit_info.value.code == 0, name
        assert "--threads" in capsys.readouterr().out, name


def test_seeds_label_says_where_seeds_stop_at_different_steps():
    assert seeds_label("td3", 1) == "td3 (1 seed)"
    assert seeds_label("td3", 3, [30000.0, 30000.0, 30000.0]) == "td3 (3 seeds)"
    assert seeds_label("td3", 3, [30000.0, 100000.0, 30000.0]) == "td3 (3 seeds: 1 to 100k, 2 to 30k)"
    assert seeds_label("mbmpo", 2, [2.5e6, 750.0]) == "mbmpo (2 seeds: 1 to 2.5M, 1 to 750)"


@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=4), points=st.integers(2, 50))
def test_seed_band_covers_every_run_and_averages_the_runs_present(lengths, points):
    curves = [([1000.0 * k for k in range(1, n + 1)], [float(k * (i + 1)) for k in range(1, n + 1)])
              for i, n in enumerate(lengths)]
    grid, mean, low, high, count = seed_band(curves, points=points)
    assert grid[0] == 1000.0 and grid[-1] == 1000.0 * max(lengths)
    for j, g in enumerate(grid):
        present = [np.interp(g, x, y) for x, y in curves if x[0] <= g <= x[-1]]
        assert count[j] == len(present)
        assert mean[j] == pytest.approx(np.mean(present))
        assert high[j] - mean[j] == pytest.approx(mean[j] - low[j], abs=1e-9)
        if len(present) > 1:
            studentised = (high[j] - mean[j]) / (np.std(present, ddof=1) / np.sqrt(len(present)))
            assert stats.t.cdf(studentised, len(present) - 1) == pytest.approx(0.975)
        else:
            assert high[j] == low[j] == mean[j]


@pytest.mark.parametrize("seeds", [2, 3, 5])
def test_seed_band_covers_the_true_mean_95_percent_of_the_time(seeds):
    rng = np.random.default_rng(seeds)
    trials, covered = 4000, 0
    for _ in range(trials):
        values = rng.normal(1.0, 2.0, size=seeds)
        _, _, low, high, _ = seed_band([([0.0, 1.0], [v, v]) for v in values], points=2)
        covered += bool(low[0] <= 1.0 <= high[0])
    assert abs(covered / trials - 0.95) < 4 * np.sqrt(0.95 * 0.05 / trials)


def test_overwrite_refuses_a_folder_that_is_not_a_run_and_a_missing_device_deletes_nothing(tmp_path, capsys):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "something else"}')
    (project / "src" / "main.py").write_text("print(1)\n")
    base = ["train", "test-bandit", "--iterations", "2", "--no-progress", "--overwrite"]
    assert cli.main([*base, "--device", "cpu", "--run-dir", str(project)]) == 2
    assert "not a run's" in capsys.readouterr().err and (project / "src" / "main.py").exists()
    run = tmp_path / "run"
    assert cli.main([*base, "--device", "cpu", "--run-dir", str(run)]) == 0
    before = (run / "metrics.csv").read_text()
    assert cli.main([*base, "--device", "cuda:7", "--run-dir", str(run)]) == 2
    assert "cuda:7" in capsys.readouterr().err and (run / "metrics.csv").read_text() == before


def test_a_second_process_cannot_train_into_a_locked_folder(tmp_path):
    folder = RunFolder(tmp_path / "run")
    with folder.lock():
        import multiprocessing

        context = multiprocessing.get_context("spawn")
        with context.Pool(1) as pool:
            error = pool.apply(_train_bandit_reporting_error, (str(folder.path),))
    assert "in use by another process" in error
    assert not (folder.path / "config.json").exists()
    train("test-bandit", bandit_config(iterations=2), folder.path, progress=False)
    assert not (folder.path / ".lock").exists() and len(folder.read_metrics()) == 2


def _train_bandit_reporting_error(run_dir):
    """Runs in a spawned process, which registers "test-bandit" by importing this module."""
    try:
        train("test-bandit", bandit_config(iterations=2), run_dir, progress=False)
    except ValueError as error:
        return str(error)
    return ""


def test_run_files_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        train("test-bandit", bandit_config(iterations=2), tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "run" / "config.json", tmp_path / "run" / "checkpoints" / "last.pt"):
        assert path.stat().st_mode & 0o777 == 0o644, path


@pytest.mark.parametrize(("values", "message"), [({"iterations": "5"}, "`iterations` must be int; got '5'"),
                                                 ({"seed": 0.5}, "`seed` must be int"),
                                                 ({"lr": True}, "`lr` must be float")])
def test_config_values_of_the_wrong_type_are_named(values, message):
    with pytest.raises(ValueError, match=message):
        make_config("test-bandit", values)


def test_a_bare_resume_continues_to_the_last_budget_asked_for(tmp_path, monkeypatch, capsys):
    """Trained to 4, resumed towards 12 and killed in iteration 10 (checkpoint at 8): a resume without
    --iterations goes on to 12, rather than stopping at the first budget, 4, and dropping row 9."""
    run = str(tmp_path / "run")
    assert cli.main(["train", "test-bandit", "--iterations", "4", "--checkpoint-every", "4", "--device", "cpu",
                     "--run-dir", run, "--no-progress"]) == 0
    monkeypatch.setattr(BanditLearner, "kill_in_iteration", 10)
    with pytest.raises(SimulatedKill):
        cli.main(["train", "test-bandit", "--resume", run, "--iterations", "12", "--no-progress"])
    monkeypatch.setattr(BanditLearner, "kill_in_iteration", 0)
    assert cli.main(["train", "test-bandit", "--resume", run, "--no-progress"]) == 0
    assert [int(r["iteration"]) for r in metric_rows(tmp_path / "run")] == list(range(1, 13))
    assert RunFolder(run).read_config()[1]["iterations"] == 12


def test_a_corrupted_checkpoint_is_named_on_resume_and_eval(tmp_path, capsys):
    run = tmp_path / "run"
    train("test-bandit", bandit_config(iterations=2), run, progress=False)
    checkpoint = RunFolder(run).checkpoint_path
    checkpoint.write_bytes(checkpoint.read_bytes()[:100])
    assert cli.main(["train", "test-bandit", "--resume", str(run), "--iterations", "3", "--no-progress"]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert cli.main(["eval", str(run)]) == 2
    assert "last.pt" in capsys.readouterr().err


def test_a_learner_drawing_from_the_global_generators_resumes_exactly(tmp_path, monkeypatch):
    """The runner saves torch's and NumPy's global generator states with each checkpoint and restores them on
    resume: a run killed in iteration 7 (checkpoint at 4) and resumed equals a straight run."""
    config = make_config("test-bandit-global-rng", {"iterations": 8, "checkpoint_every": 4, "device": "cpu"})
    straight = train("test-bandit-global-rng", config, tmp_path / "straight", progress=False)
    monkeypatch.setattr(GlobalRngBandit, "kill_in_iteration", 7)
    with pytest.raises(SimulatedKill):
        train("test-bandit-global-rng", config, tmp_path / "killed", progress=False)
    monkeypatch.setattr(GlobalRngBandit, "kill_in_iteration", 0)
    torch.manual_seed(12345)
    np.random.seed(12345)  # noqa: NPY002
    resumed = train("test-bandit-global-rng", config, tmp_path / "killed", resume=True, progress=False)
    assert torch.equal(resumed.mean, straight.mean)
    returns = [[r["return"] for r in metric_rows(tmp_path / run)] for run in ("killed", "straight")]
    assert returns[0] == returns[1] and len(returns[0]) == 8
