#!/usr/bin/env python3
"""PyTorch's side of the bnorm-cuda benchmark, and the merged table.

Times torch.nn.functional.batch_norm (training forward, inference forward, backward via
autograd; cuDNN where PyTorch uses it) on the cuDNN anchor's cases
(../../../shared/gpu/cudnn_anchor.py: labels S1 S2 S3 S5 L1 L3, 4-d shapes in NCHW and
channels-last; f32, bf16, f16) with CUDA events, and prints one table next to bnorm's numbers read from
`gpu_check --json` (if that file is missing, the torch-only table).

Metric, as the anchor counts it: training and inference forward move 2 tensor passes
(x read, y written), backward 3 (x, dy read, dx written); %copy is passes per second over
the device-to-device copy's 2 per second, the copy timed by bnorm in the same run (by
torch when bnorm's numbers are missing).

    python3 torch_cudnn.py [--bnorm bnorm.json] [--json torch.json] [--iters 20]
"""
import argparse
import json
import os
import statistics
import sys

ANCHOR = [
    ("S1", (32, 64, 56, 56)),
    ("S2", (32, 256, 14, 14)),
    ("S3", (4096, 1024)),
    ("S5", (64, 128, 56, 56)),
    ("L1", (256, 64, 112, 112)),
    ("L3", (65536, 4096)),
]
PASSES = {"train_ms": 2.0, "infer_ms": 2.0, "bwd_ms": 3.0}


def cases():
    """(label, layout, logical NC... shape) in gpu_check's order."""
    out = []
    for label, shape in ANCHOR:
        if len(shape) == 4:
            out.append((label, "NCHW", shape))
            out.append((label, "NHWC", shape))
        else:
            out.append((label, "NC", shape))
    return out


def pct(passes, ms, copy_ms):
    return 100.0 * (passes / ms) / (2.0 / copy_ms)


def load_bnorm(path):
    """bnorm's rows keyed by (label, layout, dtype); {} when the file is missing or bad."""
    if not path:
        return {}
    if not os.path.exists(path):
        print(f"note: {path} is missing (gpu_check did not write it): torch-only table")
        return {}
    try:
        with open(path) as f:
            return {(r["label"], r["layout"], r["dtype"]): r for r in json.load(f)}
    except (OSError, ValueError, KeyError) as e:
        print(f"note: cannot read {path} ({e}): torch-only table")
        return {}


def bench(iters, torch, F):
    dtypes = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}

    def time_ms(fn):
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

    rows = []
    for label, layout, shape in cases():
        for dname, dtype in dtypes.items():
            x = torch.randn(*shape, device="cuda", dtype=dtype)
            if layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last)
            c = shape[1]
            # PyTorch keeps parameters and running statistics in f32 for bf16 input
            w = torch.randn(c, device="cuda", requires_grad=True)
            b = torch.randn(c, device="cuda", requires_grad=True)
            rm = torch.zeros(c, device="cuda")
            rv = torch.ones(c, device="cuda")
            y = torch.empty_like(x)
            copy_ms = time_ms(lambda: y.copy_(x))
            with torch.no_grad():
                train_ms = time_ms(lambda: F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))
                infer_ms = time_ms(lambda: F.batch_norm(x, rm, rv, w, b, False, 0.1, 1e-5))
            xg = x.detach().requires_grad_(True)
            out = F.batch_norm(xg, rm, rv, w, b, True, 0.1, 1e-5)
            dy = torch.randn_like(out)
            bwd_ms = time_ms(lambda: torch.autograd.grad(out, (xg, w, b), dy, retain_graph=True))
            rows.append(dict(label=label, layout=layout, dtype=dname, copy_ms=copy_ms,
                             train_ms=train_ms, infer_ms=infer_ms, bwd_ms=bwd_ms,
                             bytes=x.numel() * x.element_size()))
            del x, y, xg, out, dy
            torch.cuda.empty_cache()
    return rows


def table(rows, ours):
    hdr = (f"{'':3} {'':5} {'dtype':5} {'copy ms':>8} | {'train bn':>9} {'cuDNN':>9} {'bn%':>4} "
           f"{'cu%':>4} | {'infer bn':>9} {'cuDNN':>9} {'bn%':>4} {'cu%':>4} | {'bwd bn':>9} "
           f"{'cuDNN':>9} {'bn%':>4} {'cu%':>4} | faster")
    lines = [hdr, "-" * len(hdr)]
    for t in rows:
        o = ours.get((t["label"], t["layout"], t["dtype"]))
        cp = o["copy_ms"] if o else t["copy_ms"]
        cells = []
        for k in ("train_ms", "infer_ms", "bwd_ms"):
            theirs = f"{t[k]:9.4f}"
            cu = f"{pct(PASSES[k], t[k], cp):3.0f}%"
            if o:
                cells.append(f"{o[k]:9.4f} {theirs} {pct(PASSES[k], o[k], cp):3.0f}% {cu}")
            else:
                cells.append(f"{'-':>9} {theirs} {'-':>4} {cu}")
        faster = ("yes" if all(o[k] < t[k] for k in PASSES) else "NO") if o else "-"
        lines.append(f"{t['label']:3} {t['layout']:5} {t['dtype']:5} {cp:8.4f} | "
                     + " | ".join(cells) + f" | {faster}")
    lines.append("times in ms (median of 5 runs of --iters steps); bn% / cu%: bnorm's / cuDNN's "
                 "tensor passes per second (forward 2, backward 3, as cudnn_anchor.py counts) "
                 "over the copy's 2, copy timed by bnorm in the same run")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bnorm", help="gpu_check --json output")
    ap.add_argument("--json", help="write torch timings here")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    ours = load_bnorm(args.bnorm)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError as e:
        print(f"torch_cudnn.py: PyTorch is not importable ({e}); no cuDNN timings")
        return 2
    if not torch.cuda.is_available():
        print("torch_cudnn.py: torch sees no CUDA device; no cuDNN timings")
        return 2
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), cuDNN "
          f"{torch.backends.cudnn.version()} (enabled: {torch.backends.cudnn.enabled}), "
          f"device {torch.cuda.get_device_name()}")
    torch.backends.cudnn.benchmark = True
    rows = bench(args.iters, torch, F)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    print(table(rows, ours))
    return 0


if __name__ == "__main__":
    sys.exit(main())
