#!/usr/bin/env python3
"""Time PyTorch's and TensorFlow's CPU batch normalization on the shapes of `bnorm bench`,
with the same threads and the same effective-bandwidth definition, and print the same
table. Not part of CI (it needs torch and, optionally, tensorflow-cpu).

Effective bandwidth = (bytes of x read once + bytes of y written once) / median time;
backward: x and dy read once, dx written once. A plain copy of the same bytes
(torch's `dst.copy_(src)`) is measured in the same run.

Usage: python3 bench/peers.py [--threads 2] [--seconds 1.0] [--min-runs 20] [--json FILE]

With THP_MEM_ALLOC_ENABLE=1 in the environment, PyTorch's CPU allocator asks for
transparent huge pages on its buffers of 2 MB and more (the counterpart of
`bnorm bench --huge-pages`); PyTorch rows then carry "huge_pages": true.
"""
import argparse
import json
import os
import statistics
import time

SHAPES = [
    ("S1", "NCHW", (32, 64, 56, 56)),
    ("S2", "NCHW", (32, 256, 14, 14)),
    ("S3", "NC", (4096, 1024)),
    ("S4", "NHWC", (32, 56, 56, 64)),
    ("S5", "NCHW", (64, 128, 56, 56)),
]


def median_time(fn, seconds, min_runs):
    fn()  # warm-up
    times = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < seconds and len(times) < 1000):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def torch_rows(args, rows):
    import torch

    torch.set_num_threads(args.threads)
    for name, layout, dims in SHAPES:
        for dtype, dname in [(torch.float32, "f32"), (torch.bfloat16, "bf16")]:
            if dname == "bf16" and name not in ("S1", "S4"):
                continue
            if layout == "NHWC":
                n, h, w, c = dims
                x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
            else:
                x = torch.randn(*dims, dtype=dtype)
                c = dims[1]
            dy = torch.randn_like(x)
            wgt = torch.ones(c, dtype=dtype)
            bias = torch.zeros(c, dtype=dtype)
            rm = torch.zeros(c, dtype=dtype)
            rv = torch.ones_like(rm)
            size = x.element_size()
            n_el = x.numel()
            src = torch.empty(n_el, dtype=dtype)
            dst = torch.empty(n_el, dtype=dtype)
            t_copy = median_time(lambda: dst.copy_(src), args.seconds, args.min_runs)
            copy_gbps = 2 * n_el * size / t_copy / 1e9

            def train():
                torch.ops.aten.native_batch_norm(x, wgt, bias, rm, rv, True, 0.1, 1e-5)

            def infer():
                torch.ops.aten.native_batch_norm(x, wgt, bias, rm, rv, False, 0.1, 1e-5)

            _, save_mean, save_invstd = torch.ops.aten.native_batch_norm(x, wgt, bias, rm, rv, True, 0.1, 1e-5)

            def backward():
                torch.ops.aten.native_batch_norm_backward(
                    dy, x, wgt, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]
                )

            with torch.no_grad():
                for op, fn, k in [("train_fwd", train, 2), ("infer_fwd", infer, 2), ("backward", backward, 3)]:
                    t = median_time(fn, args.seconds, args.min_runs)
                    gbps = k * n_el * size / t / 1e9
                    rows.append(dict(impl="pytorch", op=op, shape=name, layout=layout, dtype=dname,
                                     median_s=t, gbps=gbps, copy_gbps=copy_gbps,
                                     ratio=gbps / copy_gbps, version=torch.__version__,
                                     huge_pages=os.environ.get("THP_MEM_ALLOC_ENABLE") == "1"))


def tf_rows(args, rows):
    try:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        import tensorflow as tf
    except ImportError:
        print("tensorflow not installed: no TensorFlow rows (pip install tensorflow-cpu)")
        return
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    for name, layout, dims in SHAPES:
        # TensorFlow's fused op takes NHWC (and NCHW on some builds); NC runs as N×1×1×C.
        if layout == "NC":
            shape, fmt = (dims[0], 1, 1, dims[1]), "NHWC"
        elif layout == "NHWC":
            shape, fmt = dims, "NHWC"
        else:
            shape, fmt = dims, "NCHW"
        c = shape[3] if fmt == "NHWC" else shape[1]
        x = tf.random.normal(shape)
        dy = tf.random.normal(shape)
        scale, offset = tf.ones([c]), tf.zeros([c])
        mean, var = tf.zeros([c]), tf.ones([c])
        n_el = int(x.shape.num_elements())
        size = 4

        @tf.function
        def train(x):
            return tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=1e-3, data_format=fmt, is_training=True)

        @tf.function
        def infer(x):
            return tf.compat.v1.nn.fused_batch_norm(x, scale, offset, mean=mean, variance=var, epsilon=1e-3,
                                                    data_format=fmt, is_training=False)

        # The backward op itself (what the tape would call), on the saved statistics of one
        # training forward: `FusedBatchNormGradV3`, as PyTorch's rows time
        # `native_batch_norm_backward`. (Until the eighth session this row was a tape step
        # minus a training forward timed at another moment: a difference of two noisy
        # medians, 1.5 ms for the S4 backward in one run against 3.4–4.6 in the others.)
        fwd = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=tf.zeros([0]),
                                          variance=tf.zeros([0]), epsilon=1e-3, data_format=fmt,
                                          is_training=True)

        @tf.function
        def backward(x, dy):
            return tf.raw_ops.FusedBatchNormGradV3(y_backprop=dy, x=x, scale=scale,
                                                   reserve_space_1=fwd[3], reserve_space_2=fwd[4],
                                                   reserve_space_3=fwd[5], epsilon=1e-3,
                                                   data_format=fmt, is_training=True)

        # No `.numpy()` on the results: eager calls on the CPU return once the op has run,
        # and the conversion copied the 25 MB outputs of S1 and S4 (up to 3.5 ms a call;
        # until the eighth session TensorFlow's forward rows included it).
        try:
            t_tr = median_time(lambda: train(x)[0], args.seconds, args.min_runs)
            t_in = median_time(lambda: infer(x)[0], args.seconds, args.min_runs)
            t_bw = median_time(lambda: backward(x, dy)[0], args.seconds, args.min_runs)
        except Exception as e:  # an unsupported format on this build
            print(f"tensorflow {name} {fmt}: {str(e).splitlines()[0]}")
            continue
        for op, t, k in [("train_fwd", t_tr, 2), ("infer_fwd", t_in, 2), ("backward", t_bw, 3)]:
            rows.append(dict(impl="tensorflow", op=op, shape=name, layout=layout, dtype="f32", median_s=t,
                             gbps=k * n_el * size / t / 1e9, version=tf.__version__))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--min-runs", type=int, default=20)
    p.add_argument("--json")
    args = p.parse_args()
    rows = []
    torch_rows(args, rows)
    tf_rows(args, rows)
    print(f"{'impl':<11} {'shape':<6} {'layout':<6} {'dtype':<5} {'op':<10} {'median ms':>10} {'GB/s':>8}")
    for r in rows:
        print(f"{r['impl']:<11} {r['shape']:<6} {r['layout']:<6} {r['dtype']:<5} {r['op']:<10} "
              f"{r['median_s'] * 1e3:>10.3f} {r['gbps']:>8.2f}")
    if args.json:
        with open(args.json + ".tmp", "w") as f:
            json.dump(rows, f, indent=1)
        os.replace(args.json + ".tmp", args.json)


if __name__ == "__main__":
    main()
