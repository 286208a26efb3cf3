"""One MAML meta-gradient: `unroll` under `vmap` against TorchOpt's MetaSGD and higher.

Problem (from ../shared/anchors.md): 20 regression tasks, an MLP 20-64-64-6, 200 support
and 200 query samples a task, 5 inner SGD steps (lr 0.1), meta-loss the mean query MSE
after adaptation. Each contender computes the same meta-gradient; the script checks that
they agree and prints median wall times and ratios.

- bilevel: ``torch.func.grad`` of the task mean of a ``vmap``ped `unroll`.
- torchopt: ``torchopt.MetaSGD`` on the module, looping over tasks (TorchOpt's MAML recipe).
- higher: ``higher.innerloop_ctx``, looping over tasks (if installed).
- floor: the same 5 inner steps under ``vmap`` with no meta-gradient.

Run: ``.venv/bin/python benchmarks/maml_meta_gradient.py [--repeats 20] [--device cpu] [--threads 1]``
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torchopt
from torch import nn

from bilevel import tree, unroll

TASKS, IN, OUT, HIDDEN, SAMPLES, STEPS, LR = 20, 20, 6, 64, 200, 5, 0.1


def make_net() -> nn.Module:
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUT))


def make_tasks(device: torch.device) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(TASKS, IN, OUT, generator=g)
    xs, xq = (torch.randn(TASKS, SAMPLES, IN, generator=g) for _ in range(2))
    return {k: v.to(device) for k, v in
            {"xs": xs, "ys": torch.tanh(xs @ w), "xq": xq, "yq": torch.tanh(xq @ w)}.items()}


def bilevel_meta_gradient(net: nn.Module, params: dict, tasks: dict) -> dict:
    def loss(p, x, y):
        return ((torch.func.functional_call(net, p, (x,)) - y) ** 2).mean()

    def task_meta_loss(init, task):
        adapted = unroll(lambda p: loss(p, task["xs"], task["ys"]), init, torchopt.sgd(LR), STEPS)
        return loss(adapted, task["xq"], task["yq"])

    def meta_loss(init):
        return torch.func.vmap(task_meta_loss, in_dims=(None, 0))(init, tasks).mean()

    return torch.func.grad(meta_loss)(params)


def floor_inner_loop(net: nn.Module, params: dict, tasks: dict) -> dict:
    def loss(p, x, y):
        return ((torch.func.functional_call(net, p, (x,)) - y) ** 2).mean()

    def adapt(init, task):
        return unroll(lambda p: loss(p, task["xs"], task["ys"]), init, torchopt.sgd(LR), STEPS)

    return torch.func.vmap(adapt, in_dims=(None, 0))(tree.detach(params), tasks)


def torchopt_meta_gradient(net: nn.Module, tasks: dict) -> dict:
    inner_opt = torchopt.MetaSGD(net, lr=LR)
    net.zero_grad()
    for i in range(TASKS):
        state = torchopt.extract_state_dict(net)
        for _ in range(STEPS):
            inner_opt.step(((net(tasks["xs"][i]) - tasks["ys"][i]) ** 2).mean())
        (((net(tasks["xq"][i]) - tasks["yq"][i]) ** 2).mean() / TASKS).backward()
        torchopt.recover_state_dict(net, state)
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def higher_meta_gradient(net: nn.Module, tasks: dict) -> dict:
    import higher

    opt = torch.optim.SGD(net.parameters(), lr=LR)
    net.zero_grad()
    for i in range(TASKS):
        with higher.innerloop_ctx(net, opt, copy_initial_weights=False) as (fnet, diffopt):
            for _ in range(STEPS):
                diffopt.step(((fnet(tasks["xs"][i]) - tasks["ys"][i]) ** 2).mean())
            (((fnet(tasks["xq"][i]) - tasks["yq"][i]) ** 2).mean() / TASKS).backward()
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def timed(fn, repeats: int, device: torch.device) -> tuple[float, object]:
    result = fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    net = make_net().to(device)
    params = tree.params_of(net, detach=True)
    tasks = make_tasks(device)

    contenders = {
        "bilevel unroll + vmap": lambda: bilevel_meta_gradient(net, params, tasks),
        "torchopt MetaSGD loop": lambda: torchopt_meta_gradient(net, tasks),
    }
    try:
        import higher  # noqa: F401

        contenders["higher loop"] = lambda: higher_meta_gradient(net, tasks)
    except ImportError:
        print("higher is not installed: skipped")
    contenders["floor (inner loop only)"] = lambda: floor_inner_loop(net, params, tasks)

    results = {name: timed(fn, args.repeats, device) for name, fn in contenders.items()}
    reference = results["bilevel unroll + vmap"][1]
    ours = results["bilevel unroll + vmap"][0]
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print("| contender | median ms | time / bilevel | max abs diff of meta-gradient |")
    print("|---|---:|---:|---:|")
    for name, (seconds, grads) in results.items():
        if name.startswith("floor"):
            diff = "n/a"
        else:
            diff = f"{max(float((grads[k] - reference[k]).detach().abs().max()) for k in reference):.1e}"
        print(f"| {name} | {1e3 * seconds:.1f} | {seconds / ours:.2f} | {diff} |")
    print(f"command: .venv/bin/python benchmarks/maml_meta_gradient.py --repeats {args.repeats} "
          f"--device {args.device} --threads {args.threads}")


if __name__ == "__main__":
    main()
