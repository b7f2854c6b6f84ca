#!/usr/bin/env python3
"""PyTorch's side of the bnorm-cuda benchmark, and the merged table.

Times torch.nn.functional.batch_norm (training forward, inference forward, backward via
autograd) on the same shapes and dtypes as gpu_check, with CUDA events, and prints one
table next to bnorm's numbers (read from gpu_check --json).

    python3 torch_cudnn.py --bnorm bnorm.json [--json torch.json] [--iters 20]
"""
import argparse
import json
import statistics

import torch
import torch.nn.functional as F

CASES = [
    ("L1", "NCHW", (64, 128, 56, 56)),
    ("L2", "NCHW", (256, 64, 112, 112)),
    ("L3", "NHWC", (256, 112, 112, 64)),
    ("L4", "NC", (65536, 4096)),
    ("S1", "NCHW", (32, 64, 56, 56)),
    ("S2", "NCHW", (32, 256, 14, 14)),
    ("S3", "NC", (4096, 1024)),
]
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16}


def make(layout, shape, dtype):
    if layout == "NHWC":
        n, h, w, c = shape
        # logical NCHW tensor stored channels-last: the same bytes as bnorm's NHWC
        return torch.randn(n, c, h, w, device="cuda", dtype=dtype).contiguous(
            memory_format=torch.channels_last
        ), c
    return torch.randn(*shape, device="cuda", dtype=dtype), shape[1]


def time_ms(fn, iters):
    for _ in range(3):
        fn()
    reps = []
    for _ in range(5):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(iters):
            fn()
        b.record()
        torch.cuda.synchronize()
        reps.append(a.elapsed_time(b) / iters)
    return statistics.median(reps)


def bench(iters):
    rows = []
    for label, layout, shape in CASES:
        for dname, dtype in DTYPES.items():
            x, c = make(layout, shape, dtype)
            # PyTorch keeps parameters and running statistics in f32 for bf16 input
            w = torch.ones(c, device="cuda", requires_grad=True)
            b = torch.zeros(c, device="cuda", requires_grad=True)
            rm = torch.zeros(c, device="cuda")
            rv = torch.ones(c, device="cuda")
            y = torch.empty_like(x)
            copy_ms = time_ms(lambda: y.copy_(x), iters)
            with torch.no_grad():
                train_ms = time_ms(lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5), iters)
                infer_ms = time_ms(lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5), iters)
            xg = x.detach().requires_grad_(True)
            out = F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5)
            dy = torch.randn_like(out)
            bwd_ms = time_ms(
                lambda: torch.autograd.grad(out, (xg, w, b), dy, retain_graph=True), iters
            )
            rows.append(dict(label=label, dtype=dname, copy_ms=copy_ms, train_ms=train_ms,
                             infer_ms=infer_ms, bwd_ms=bwd_ms,
                             bytes=x.numel() * x.element_size()))
            del x, y, xg, out, dy
            torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bnorm", help="gpu_check --json output")
    ap.add_argument("--json", help="write torch timings here")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()} "
          f"(enabled: {torch.backends.cudnn.enabled}), device {torch.cuda.get_device_name()}")
    rows = bench(args.iters)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    ours = {}
    if args.bnorm:
        with open(args.bnorm) as f:
            ours = {(r["label"], r["dtype"]): r for r in json.load(f)}

    def pct(passes, ms, copy_ms):
        return 100.0 * (passes / ms) / (2.0 / copy_ms)

    hdr = (f"{'':3} {'dtype':5} {'copy ms':>8} | {'train bn':>9} {'torch':>9} {'%cp':>4} | "
           f"{'infer bn':>9} {'torch':>9} {'%cp':>4} | {'bwd bn':>9} {'torch':>9} {'%cp':>4} | faster")
    print(hdr)
    print("-" * len(hdr))
    for t in rows:
        o = ours.get((t["label"], t["dtype"]))
        if o is None:
            print(f"{t['label']:3} {t['dtype']:5} {t['copy_ms']:8.4f} | bnorm missing; torch "
                  f"{t['train_ms']:.4f} {t['infer_ms']:.4f} {t['bwd_ms']:.4f}")
            continue
        cp = o["copy_ms"]
        faster = all(o[k] < t[k] for k in ("train_ms", "infer_ms", "bwd_ms"))
        print(f"{t['label']:3} {t['dtype']:5} {cp:8.4f} | "
              f"{o['train_ms']:9.4f} {t['train_ms']:9.4f} {pct(3, o['train_ms'], cp):3.0f}% | "
              f"{o['infer_ms']:9.4f} {t['infer_ms']:9.4f} {pct(2, o['infer_ms'], cp):3.0f}% | "
              f"{o['bwd_ms']:9.4f} {t['bwd_ms']:9.4f} {pct(5, o['bwd_ms'], cp):3.0f}% | "
              f"{'yes' if faster else 'NO'}")
    print("times in ms (median of 5 runs of --iters steps); %cp: bnorm's bytes moved per second "
          "(train 3, inference 2, backward 5 tensor passes) over the copy's 2 passes, copy "
          "timed by bnorm in the same run")


if __name__ == "__main__":
    main()
