#!/usr/bin/env python3
"""torch.nn.BatchNorm*d (cuDNN) against bnorm.torch.BatchNorm*d on a CUDA device.

A benchmark, not a test. For each shape of `bnorm bench` (S1-S5) in float32 and bfloat16
and each operation -- training forward, forward + backward, eval forward -- the two
modules run alternately on the same tensors: each round times --calls back-to-back calls
of torch's module between two synchronizations (what a training loop sees: launch and
Python overheads included, the GPU kept busy), then as many of bnorm's; the table gives
the median over rounds of each side's time per call, and torch's time over bnorm's
(> 1: the drop-in is faster). Then one training step (forward, backward, SGD) of a small
ResNet, before and after `bnorm.torch.convert` (the CPU benchmark's: `bench/torch_dropin.py`).

    pip install ./crates/bnorm-python          # from the repository root
    python3 bench/torch_dropin_cuda.py [--rounds 7] [--calls 50] [--shapes S1,S4]
                                       [--dtypes f32,bf16] [--json FILE]
"""
import argparse
import json
import statistics
import time

import torch

import bnorm.torch

# The CPU benchmark's shapes, calls, network and training step (this script's folder is on
# the module path when it runs); only the timing differs, synchronized with the GPU.
from torch_dropin import OPS, SHAPES, modules, op_call, small_resnet, train_step

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}


def per_call(call, calls):
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        call()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls


def alternate(a, b, rounds, calls):
    for _ in range(2):  # warm-up (the first bnorm call compiles the kernels)
        per_call(a, 3), per_call(b, 3)
    ta, tb = [], []
    for _ in range(rounds):
        ta.append(per_call(a, calls))
        tb.append(per_call(b, calls))
    return statistics.median(ta), statistics.median(tb)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--shapes", default=",".join(SHAPES))
    ap.add_argument("--dtypes", default="f32,bf16")
    ap.add_argument("--resnet-batch", type=int, default=128)
    ap.add_argument("--json")
    args = ap.parse_args()
    dev = torch.device("cuda")
    print(
        f"# {torch.cuda.get_device_name(dev)}; torch {torch.__version__}, "
        f"cuDNN {torch.backends.cudnn.version()}; {args.rounds} rounds x {args.calls} calls"
    )
    rows = []
    print(f"{'shape':6} {'dtype':5} {'op':9} {'torch ms':>9} {'bnorm ms':>9} {'torch/bnorm':>11}")
    for name in args.shapes.split(","):
        fmt, shape = SHAPES[name]
        for dname in args.dtypes.split(","):
            dtype = DTYPES[dname]
            g = torch.Generator(device=dev).manual_seed(0)
            x = torch.randn(shape, device=dev, generator=g).to(dtype)
            dy = torch.randn(shape, device=dev, generator=g).to(dtype)
            if fmt == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
                dy = dy.contiguous(memory_format=torch.channels_last)
            ref, ours = (m.to(dev) for m in modules(shape))
            for op in OPS:
                t, b = alternate(op_call(ref, op, x, dy), op_call(ours, op, x, dy), args.rounds, args.calls)
                rows.append({"shape": name, "dtype": dname, "op": op, "torch_ms": t * 1e3, "bnorm_ms": b * 1e3})
                print(f"{name:6} {dname:5} {op:9} {t*1e3:9.4f} {b*1e3:9.4f} {t/b:11.2f}", flush=True)
    torch.manual_seed(0)
    ref = small_resnet().to(dev)
    ours = small_resnet().to(dev)
    ours.load_state_dict(ref.state_dict())
    bnorm.torch.convert(ours)
    x = torch.randn(args.resnet_batch, 3, 32, 32, device=dev)
    target = torch.randint(0, 10, (args.resnet_batch,), device=dev)
    t, b = alternate(train_step(ref, x, target), train_step(ours, x, target), args.rounds, 20)
    rows.append({"shape": f"resnet-b{args.resnet_batch}", "dtype": "f32", "op": "train_step", "torch_ms": t * 1e3, "bnorm_ms": b * 1e3})
    print(f"small ResNet training step, batch {args.resnet_batch}, 32x32: torch {t*1e3:.3f} ms, "
          f"converted {b*1e3:.3f} ms, torch/converted {t/b:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
