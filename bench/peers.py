#!/usr/bin/env python3
"""Time PyTorch's and TensorFlow's CPU batch normalization on the shapes of `bnorm bench`,
with the same threads and the same effective-bandwidth definition. Not part of CI (it
needs torch and, optionally, tensorflow-cpu).

Table (the default mode): each peer's median time per shape, dtype and operation, printed as a
table (and written with --json), to set beside `bnorm bench`'s rows.

    python3 bench/peers.py [--threads 2] [--seconds 1.0] [--min-runs 20] [--shapes S1,S4]
                           [--json FILE]

Effective bandwidth = (bytes of x read once + bytes of y written once) / median time;
backward: x and dy read once, dx written once. A plain copy of the same bytes (torch's
`dst.copy_(src)`) is measured in the same run. With THP_MEM_ALLOC_ENABLE=1 in the
environment, PyTorch's CPU allocator asks for transparent huge pages on its buffers of
2 MB and more (the counterpart of `bnorm bench --huge-pages`); PyTorch rows then carry
"huge_pages": true.

Alternation (the --alternate mode): the peer and bnorm in the same minutes. For each shape and
operation, --rounds rounds of: the peer (median of 100 calls after 5 untimed ones, f32,
fresh tensors each round), then bnorm's `step_time` example in a new process (median of
100 calls, tensors in fresh mappings); then the median of each side's round medians. On a
machine whose speed drifts by ±30% from one minute to the next this says more than two
benchmark runs taken minutes apart. Build the example first:

    cargo build --release -p bnorm --example step_time
    python3 bench/peers.py --alternate [--peer pytorch|tensorflow] [--shapes S2,S3,S4]
                           [--ops train,infer,bwd] [--rounds 5] [--alloc] [--dtype bf16]
                           [--json FILE]

With --alloc bnorm runs through its allocating tier (`BatchNorm::forward` / `backward`, a
fresh output per call), the tier that compares with the peer's own allocation.

PyTorch runs `aten::native_batch_norm` / `native_batch_norm_backward`; TensorFlow its
fused op called directly (`FusedBatchNormV3` / `FusedBatchNormGradV3`, the backward on
the saved statistics of one training forward).
"""
import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time

# Name, bnorm's layout and its dimensions in that layout (as in `bnorm bench`).
SHAPES = [
    ("S1", "NCHW", (32, 64, 56, 56)),
    ("S2", "NCHW", (32, 256, 14, 14)),
    ("S3", "NC", (4096, 1024)),
    ("S4", "NHWC", (32, 56, 56, 64)),
    ("S5", "NCHW", (64, 128, 56, 56)),
]

# Operation as `step_time` names it -> (row name, tensor passes counted in GB/s).
OPS = {"train": ("train_fwd", 2), "infer": ("infer_fwd", 2), "bwd": ("backward", 3)}


def median_time(fn, seconds, min_runs, warmup=1):
    """Median wall time of `fn` in seconds: `warmup` untimed calls, then at least
    `min_runs` timed ones and about `seconds` seconds of them (at most 1000)."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def import_torch(threads):
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def import_tf(threads):
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
    except ImportError:
        return None
    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return tf


def torch_calls(torch, layout, dims, dtype):
    """x and PyTorch's three calls on fresh tensors of one shape: {train, infer, bwd}."""
    if layout == "NHWC":
        n, h, w, c = dims
        x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    else:
        x = torch.randn(*dims, dtype=dtype)
        c = dims[1]
    dy = torch.randn_like(x)
    wgt, bias = torch.ones(c, dtype=dtype), torch.zeros(c, dtype=dtype)
    rm, rv = torch.zeros(c, dtype=dtype), torch.ones(c, dtype=dtype)
    bn = torch.ops.aten.native_batch_norm
    _, save_mean, save_invstd = bn(x, wgt, bias, rm, rv, True, 0.1, 1e-5)
    return x, {
        "train": lambda: bn(x, wgt, bias, rm, rv, True, 0.1, 1e-5),
        "infer": lambda: bn(x, wgt, bias, rm, rv, False, 0.1, 1e-5),
        "bwd": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, wgt, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]),
    }


def tf_calls(tf, layout, dims):
    """Elements and TensorFlow's three calls (f32) on fresh tensors of one shape."""
    # The fused op takes NHWC (and NCHW on some builds); NC runs as N×1×1×C.
    if layout == "NC":
        shape, fmt = (dims[0], 1, 1, dims[1]), "NHWC"
    else:
        shape, fmt = dims, layout
    c = shape[3] if fmt == "NHWC" else shape[1]
    x, dy = tf.random.normal(shape), tf.random.normal(shape)
    scale, offset, mean, var = tf.ones([c]), tf.zeros([c]), tf.zeros([c]), tf.ones([c])
    empty = tf.zeros([0])

    def forward(training):
        return tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=empty if training else mean,
            variance=empty if training else var, epsilon=1e-3, data_format=fmt,
            is_training=training)

    # The backward op itself (what a tape would call), on the saved statistics of one
    # training forward, as PyTorch's rows time `native_batch_norm_backward`. No `.numpy()`
    # on any result: eager calls on the CPU return once the op has run, and the conversion
    # would copy outputs it does not share (up to 3.5 ms a call on S1 and S4).
    saved = forward(True)
    return int(x.shape.num_elements()), {
        "train": tf.function(lambda: forward(True)[0]),
        "infer": tf.function(lambda: forward(False)[0]),
        "bwd": tf.function(lambda: tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=scale, reserve_space_1=saved[3], reserve_space_2=saved[4],
            reserve_space_3=saved[5], epsilon=1e-3, data_format=fmt, is_training=True)[0]),
    }


def selected(args):
    names = args.shapes or [s[0] for s in SHAPES]
    unknown = set(names) - {s[0] for s in SHAPES}
    if unknown:
        sys.exit(f"peers.py: unknown shape(s) {', '.join(sorted(unknown))} (S1 to S5)")
    return [s for s in SHAPES if s[0] in names]


def torch_rows(torch, args, rows):
    for name, layout, dims in selected(args):
        for dtype, dname in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            if dname == "bf16" and name not in ("S1", "S4"):
                continue
            x, calls = torch_calls(torch, layout, dims, dtype)
            size, n_el = x.element_size(), x.numel()
            src = torch.empty(n_el, dtype=dtype)
            dst = torch.empty(n_el, dtype=dtype)
            t_copy = median_time(lambda: dst.copy_(src), args.seconds, args.min_runs)
            copy_gbps = 2 * n_el * size / t_copy / 1e9
            with torch.no_grad():
                for op, (row_op, k) in OPS.items():
                    t = median_time(calls[op], args.seconds, args.min_runs)
                    gbps = k * n_el * size / t / 1e9
                    rows.append(dict(impl="pytorch", op=row_op, shape=name, layout=layout, dtype=dname,
                                     median_s=t, gbps=gbps, copy_gbps=copy_gbps,
                                     ratio=gbps / copy_gbps, version=torch.__version__,
                                     huge_pages=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"))


def tf_rows(tf, args, rows):
    for name, layout, dims in selected(args):
        try:
            n_el, calls = tf_calls(tf, layout, dims)
            times = {op: median_time(calls[op], args.seconds, args.min_runs) for op in OPS}
        except Exception as e:  # an unsupported format on this build
            print(f"tensorflow {name} {layout}: {str(e).splitlines()[0]}")
            continue
        for op, (row_op, k) in OPS.items():
            rows.append(dict(impl="tensorflow", op=row_op, shape=name, layout=layout, dtype="f32",
                             median_s=times[op], gbps=k * n_el * 4 / times[op] / 1e9,
                             version=tf.__version__))


def table(args):
    rows = []
    torch = import_torch(args.threads)
    if torch is None:
        print("torch not installed: no PyTorch rows (pip install torch)")
    else:
        torch_rows(torch, args, rows)
    tf = import_tf(args.threads)
    if tf is None:
        print("tensorflow not installed: no TensorFlow rows (pip install tensorflow-cpu)")
    else:
        tf_rows(tf, args, rows)
    if torch is None and tf is None:
        sys.exit("peers.py: neither torch nor tensorflow is installed: nothing to time")
    print(f"{'impl':<11} {'shape':<6} {'layout':<6} {'dtype':<5} {'op':<10} {'median ms':>10} {'GB/s':>8}")
    for r in rows:
        print(f"{r['impl']:<11} {r['shape']:<6} {r['layout']:<6} {r['dtype']:<5} {r['op']:<10} "
              f"{r['median_s'] * 1e3:>10.3f} {r['gbps']:>8.2f}")
    return rows


def bnorm_ms(args, shape, op):
    """bnorm's median in ms from one run of the `step_time` example (a new process)."""
    env = dict(os.environ)
    env.setdefault("RAYON_NUM_THREADS", str(args.threads))
    if args.alloc:
        env["ALLOC"] = "1"
    env["DTYPE"] = args.dtype
    out = subprocess.run([args.step_time, shape, op], capture_output=True, text=True,
                         check=True, env=env).stdout
    return float(out.split("median")[1].split("ms")[0])


def alternate(args):
    if not os.access(args.step_time, os.X_OK):
        sys.exit(f"peers.py: {args.step_time} not found; build it first: "
                 "cargo build --release -p bnorm --example step_time")
    if args.peer == "tensorflow" and args.dtype != "f32":
        sys.exit("peers.py: --dtype bf16 alternates with PyTorch only")
    if args.peer == "tensorflow":
        tf, name = import_tf(args.threads), "TensorFlow"
        if tf is None:
            sys.exit("peers.py: tensorflow not installed (pip install tensorflow-cpu)")

        def calls(layout, dims):
            return tf_calls(tf, layout, dims)[1]

        quiet = contextlib.nullcontext
    else:
        torch, name = import_torch(args.threads), "PyTorch"
        if torch is None:
            sys.exit("peers.py: torch not installed (pip install torch)")

        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[args.dtype]

        def calls(layout, dims):
            return torch_calls(torch, layout, dims, dtype)[1]

        quiet = torch.no_grad
    unknown = set(args.ops) - set(OPS)
    if unknown:
        sys.exit(f"peers.py: unknown operation(s) {', '.join(sorted(unknown))} (train, infer, bwd)")
    rows = []
    print(f"shape op     {name} ms (rounds)                   bnorm ms (rounds)                    {name}/bnorm")
    for shape, layout, dims in selected(args):
        for op in args.ops:
            peer, ours = [], []
            try:
                for _ in range(args.rounds):
                    fn = calls(layout, dims)[op]
                    with quiet():
                        peer.append(median_time(fn, 0.0, 100, warmup=5) * 1e3)
                    ours.append(bnorm_ms(args, shape, op))
            except Exception as e:  # e.g. a format TensorFlow's build lacks
                print(f"{shape:5} {op:6} {name}: {str(e).splitlines()[0]}")
                continue
            mp, mb = statistics.median(peer), statistics.median(ours)
            print(f"{shape:5} {op:6} {mp:6.3f} ({' '.join(f'{v:.2f}' for v in peer)})  "
                  f"{mb:6.3f} ({' '.join(f'{v:.2f}' for v in ours)})  {mp / mb:.2f}x", flush=True)
            rows.append(dict(impl=args.peer, mode="alternate", shape=shape, layout=layout,
                             op=OPS[op][0], dtype=args.dtype, peer_ms=peer, bnorm_ms=ours,
                             peer_median_ms=mp, bnorm_median_ms=mb, ratio=mp / mb,
                             bnorm_tier="allocating" if args.alloc else "caller buffers"))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--threads", type=int, default=2, help="threads of every side (default 2)")
    p.add_argument("--shapes", type=lambda s: s.split(","), default=None,
                   help="comma-separated subset of S1,S2,S3,S4,S5 (default: all)")
    p.add_argument("--json", help="also write the rows to this file")
    t = p.add_argument_group("table")
    t.add_argument("--seconds", type=float, default=1.0, help="timed seconds per row (default 1.0)")
    t.add_argument("--min-runs", type=int, default=20, help="fewest timed calls per row (default 20)")
    a = p.add_argument_group("alternation (--alternate)")
    a.add_argument("--alternate", action="store_true",
                   help="alternate the peer with bnorm's step_time in the same minutes")
    a.add_argument("--dtype", choices=["f32", "bf16"], default="f32",
                   help="storage type of both sides (default f32; bf16 with PyTorch only)")
    a.add_argument("--alloc", action="store_true",
                   help="bnorm through its allocating tier (step_time with ALLOC=1: a fresh "
                        "output per call, as the peer's)")
    a.add_argument("--peer", choices=["pytorch", "tensorflow"], default="pytorch")
    a.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS),
                   help="comma-separated subset of train,infer,bwd (default: all)")
    a.add_argument("--rounds", type=int, default=5, help="rounds per shape and operation (default 5)")
    a.add_argument("--step-time", default="./target/release/examples/step_time",
                   help="bnorm's step_time binary (default: %(default)s)")
    args = p.parse_args()
    rows = alternate(args) if args.alternate else table(args)
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
