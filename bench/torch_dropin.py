#!/usr/bin/env python3
"""torch.nn.BatchNorm*d against bnorm.torch.BatchNorm*d, alternated in one process.

A benchmark, not a test. For each shape of `bnorm bench` (S1-S5, float32) and each
operation -- training forward, forward + backward, eval forward -- the two modules run
alternately: each round times --calls calls of torch's module, then --calls calls of
bnorm's, both on the same tensors; the table gives the median over rounds of each side's
median call, and torch's time over bnorm's (> 1: the drop-in is faster). Then one CPU
training step (forward, backward, SGD) of a small ResNet, before and after
`bnorm.torch.convert`, alternated the same way.

Both libraries get the same threads: torch.set_num_threads(--threads), and bnorm runs on
PyTorch's own OpenMP team (bnorm.use_openmp, what importing bnorm.torch does) or, with
--bnorm-threads own, in its own pool of as many threads (bnorm.set_num_threads). The
forward rows run under torch.no_grad() (the training forward still updates the running
statistics); forward + backward builds the graph and calls y.backward(dy).

    pip install ./crates/bnorm-python          # from the repository root
    python3 bench/torch_dropin.py [--threads 2] [--rounds 7] [--calls 10] [--shapes S1,S4]
                                  [--bnorm-threads openmp|own] [--json FILE]

Run it on a quiet machine; a machine loaded by other work gives numbers that say little.
"""
import argparse
import copy
import json
import platform
import statistics
import subprocess
import time

import torch

import bnorm
import bnorm.torch

# Name, torch memory format, logical (N, C, ...) shape; as crates/bnorm/benches/common/shapes.rs.
SHAPES = {
    "S1": ("contiguous", (32, 64, 56, 56)),
    "S2": ("contiguous", (32, 256, 14, 14)),
    "S3": ("contiguous", (4096, 1024)),
    "S4": ("channels_last", (32, 64, 56, 56)),
    "S5": ("contiguous", (64, 128, 56, 56)),
}
OPS = ("train_fwd", "fwd_bwd", "eval_fwd")


def modules(shape):
    cls_t, cls_b = (
        (torch.nn.BatchNorm1d, bnorm.torch.BatchNorm1d)
        if len(shape) == 2
        else (torch.nn.BatchNorm2d, bnorm.torch.BatchNorm2d)
    )
    ref = cls_t(shape[1])
    ours = cls_b(shape[1])
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def op_call(module, op, x, dy):
    if op == "train_fwd":
        module.train()

        def call():
            with torch.no_grad():
                module(x)

    elif op == "eval_fwd":
        module.eval()

        def call():
            with torch.no_grad():
                module(x)

    else:
        module.train()
        xg = x.detach().requires_grad_()

        def call():
            xg.grad = None
            module(xg).backward(dy)

    return call


def median_call(call, calls):
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def alternate(a, b, rounds, calls):
    """Median over rounds of each side's median call: (a seconds, b seconds)."""
    a(), b()  # warm-up
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(median_call(a, calls))
        tb.append(median_call(b, calls))
    return statistics.median(ta), statistics.median(tb)


class Block(torch.nn.Module):
    def __init__(self, c_in, c, stride):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c_in, c, 3, stride, 1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)
        self.short = None
        if stride != 1 or c_in != c:
            self.short = torch.nn.Sequential(
                torch.nn.Conv2d(c_in, c, 1, stride, bias=False), torch.nn.BatchNorm2d(c)
            )

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.short is None else self.short(x)))


def small_resnet():
    """A ResNet-10-style network for 32x32 images (CIFAR-sized): stem, 4 stages."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 32, 3, 1, 1, bias=False),
        torch.nn.BatchNorm2d(32),
        torch.nn.ReLU(),
        Block(32, 32, 1),
        Block(32, 64, 2),
        Block(64, 128, 2),
        Block(128, 256, 2),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(256, 10),
    )


def train_step(model, x, target):
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()

    def call():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), target).backward()
        opt.step()

    return call


def machine():
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        commit = "?"
    return {"cpu": cpu, "commit": commit, "torch": torch.__version__}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--resnet-batch", type=int, default=64)
    ap.add_argument("--bnorm-threads", choices=("openmp", "own"), default="openmp")
    ap.add_argument("--json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.bnorm_threads == "own":
        bnorm.set_num_threads(args.threads)
    else:
        bnorm.use_openmp()
    info = machine() | {"threads": args.threads, "rounds": args.rounds, "calls": args.calls,
                        "bnorm_threads": bnorm.get_threading(),
                        "bnorm_num_threads": bnorm.get_num_threads()}
    print(f"# {info}")
    print(f"| shape | op | torch ms | bnorm ms | torch/bnorm |")
    print(f"| --- | --- | ---: | ---: | ---: |")
    rows = []
    torch.manual_seed(0)
    for name in args.shapes.split(","):
        fmt, shape = SHAPES[name]
        x = torch.randn(shape)
        if fmt == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        dy = torch.randn_like(x)
        ref, ours = modules(shape)
        for op in OPS:
            t_ref, t_ours = alternate(
                op_call(ref, op, x, dy), op_call(ours, op, x, dy), args.rounds, args.calls
            )
            rows.append(dict(shape=name, op=op, torch_s=t_ref, bnorm_s=t_ours))
            print(f"| {name} | {op} | {t_ref*1e3:.2f} | {t_ours*1e3:.2f} | {t_ref/t_ours:.2f} |",
                  flush=True)
    ref = small_resnet()
    ours = bnorm.torch.convert(copy.deepcopy(ref))
    x = torch.randn(args.resnet_batch, 3, 32, 32)
    target = torch.randint(0, 10, (args.resnet_batch,))
    t_ref, t_ours = alternate(
        train_step(ref, x, target), train_step(ours, x, target), args.rounds,
        max(1, args.calls // 2),
    )
    rows.append(dict(shape=f"resnet b{args.resnet_batch}", op="train_step", torch_s=t_ref,
                     bnorm_s=t_ours))
    print(f"| small ResNet, batch {args.resnet_batch} | train step | {t_ref*1e3:.2f} | "
          f"{t_ours*1e3:.2f} | {t_ref/t_ours:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
