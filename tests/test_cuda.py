"""The GPU path: every learner trains, checkpoints, resumes and evaluates with ``--device cuda``, and the core's
hypergradient and TRPO step on CUDA equal the CPU's in float64. Runs only where a CUDA device is present (the
project's CI has none; ``benchmarks/gpu_check.sh`` runs this module on a lent GPU machine)."""

import csv
import math

import optree
import pytest
import torch
import torchopt
from torch.distributions import Normal, kl_divergence

from bilevel import cli, implicit_root, trpo_step, unroll
from bilevel.runs.loop import load_learner

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PENDULUM = ["--env", "Pendulum-v1", "--hidden", "16", "16", "--batch-size", "16", "--buffer-size", "2000",
            "--steps-per-iteration", "100", "--learning-starts", "50", "--eval-episodes", "1"]
NAVIGATION = ["--env", "navigation-2d", "--meta-batch-size", "2", "--episodes-per-task", "2", "--horizon", "10",
              "--hidden", "8"]
MBMPO = ["--env", "halfcheetah", "--horizon", "10", "--initial-random-steps", "30", "--episodes-per-model", "1",
         "--meta-steps", "1", "--imagined-trajectories", "4", "--imagined-horizon", "6", "--ensemble-size", "3",
         "--num-elites", "2", "--model-hidden", "16", "16", "--model-max-epochs", "2", "--hidden", "8", "8",
         "--attention-weight", "0.5", "--cg-iters", "3"]
CPU_ONLY = {"bomrl"}  # tabular, 17 x 4 tensors in float64: runs on the CPU whatever --device says
SMOKES = {
    "bomrl": ["--env", "frozenlake-hole", "--episodes", "20", "--tasks-per-batch", "2"],
    "bomrl-neural": [*NAVIGATION, "--adapt-steps", "3"],
    "maml-trpo": NAVIGATION,
    "mbmpo": MBMPO,
    **{name: PENDULUM for name in ("ddpg", "td3", "sac")},
    **{name: [*PENDULUM, "--attention-hidden", "5"] for name in ("ddpg-matt", "td3-matt", "td3-matt-dt", "sac-matt")},
    "td3-mc": [*PENDULUM, "--meta-hidden", "5"],
}


@pytest.mark.parametrize("algorithm", list(SMOKES))
def test_learner_trains_resumes_and_evaluates_on_cuda(tmp_path, algorithm):
    run = tmp_path / algorithm
    argv = ["train", algorithm, *SMOKES[algorithm], "--device", "cuda", "--no-progress", "--checkpoint-every", "1"]
    assert cli.main([*argv, "--iterations", "2", "--run-dir", str(run)]) == 0
    assert cli.main(["train", algorithm, "--resume", str(run), "--iterations", "3", "--no-progress"]) == 0
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["iteration"]) for row in rows] == [1, 2, 3]
    for row in rows:
        for key, value in row.items():
            if value not in ("", None):
                assert math.isfinite(float(value)), (key, value)
    _, learner = load_learner(run, "cuda")
    assert learner.device.type == ("cpu" if algorithm in CPU_ONLY else "cuda")
    floating = [v for v in optree.tree_leaves(learner.state_dict(), none_is_leaf=True)
                if isinstance(v, torch.Tensor) and v.is_floating_point()]
    assert floating and any(v.device.type == learner.device.type for v in floating)
    assert cli.main(["eval", str(run)]) == 0


def _ridge_hypergradient(device):
    """d/d(lam, y) of ||w* - target||^2, w* = argmin_w 1/2 ||X w - y||^2 + lam/2 ||w||^2, by `implicit_root`."""
    g = torch.Generator().manual_seed(0)
    X, y, target = (torch.randn(*shape, generator=g, dtype=torch.float64).to(device)
                    for shape in ((23, 6), (23,), (6,)))

    def optimality(params, X, y, lam):
        return {"w": X.T @ (X @ params["w"] - y) + lam * params["w"]}

    @implicit_root(optimality, solve="cg")
    def ridge(init, X, y, lam):
        return {"w": torch.linalg.solve(X.T @ X + lam * torch.eye(6, dtype=X.dtype, device=X.device), X.T @ y)}

    init = {"w": torch.zeros(6, dtype=torch.float64, device=device)}
    lam = torch.tensor(1.3, dtype=torch.float64, device=device)
    return torch.func.grad(lambda l, y: ((ridge(init, X, y, l)["w"] - target) ** 2).sum(), argnums=(0, 1))(lam, y)


def test_implicit_hypergradient_on_cuda_equals_the_cpu_one():
    on_cuda, on_cpu = _ridge_hypergradient("cuda"), _ridge_hypergradient("cpu")
    for gpu, cpu in zip(on_cuda, on_cpu, strict=True):
        assert gpu.is_cuda
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-10, atol=1e-12)


def _maml_trpo_step(device):
    """One `trpo_step` on a linear-Gaussian policy's surrogate after one `unroll`ed policy-gradient step."""
    g = torch.Generator().manual_seed(1)
    draw = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64).to(device)  # noqa: E731
    params = {"W": 0.3 * draw(2, 3), "log_std": -0.5 * torch.ones(2, dtype=torch.float64, device=device)}
    obs, inner_obs, actions, inner_actions = draw(64, 3), draw(64, 3), draw(64, 2), draw(64, 2)
    advantages, inner_advantages = draw(64), draw(64)

    def dist(p, states):
        return Normal(states @ p["W"].T, p["log_std"].exp())

    def adapt(p):
        def pg_loss(q):
            return -(dist(q, inner_obs).log_prob(inner_actions).sum(-1) * inner_advantages).mean()
        return unroll(pg_loss, p, torchopt.sgd(0.1), 1)

    old = dist(adapt(params), obs)
    old_log_prob, old_detached = old.log_prob(actions).sum(-1).detach(), Normal(old.loc.detach(), old.scale.detach())

    def loss_fn(p):
        return -(torch.exp(dist(adapt(p), obs).log_prob(actions).sum(-1) - old_log_prob) * advantages).mean()

    def kl_fn(p):
        return kl_divergence(old_detached, dist(adapt(p), obs)).sum(-1).mean()

    new_params, info = trpo_step(loss_fn, kl_fn, params, max_kl=1e-2)
    return new_params, info, float(kl_fn(new_params))


def test_maml_trpo_step_on_cuda_equals_the_cpu_one_and_holds_the_trust_region():
    (gpu_params, gpu_info, gpu_kl), (cpu_params, cpu_info, _) = _maml_trpo_step("cuda"), _maml_trpo_step("cpu")
    assert gpu_info.accepted and cpu_info.accepted and gpu_kl <= 1e-2
    for name, value in gpu_params.items():
        assert value.is_cuda
        torch.testing.assert_close(value.cpu(), cpu_params[name], rtol=1e-9, atol=1e-12)
