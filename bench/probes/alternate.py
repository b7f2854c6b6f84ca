"""Same-minute comparison with PyTorch: for each shape and operation, five alternations of
PyTorch (median of 100 calls of aten::native_batch_norm / native_batch_norm_backward, 2
threads, f32, output memory reused by its allocator after the first calls) and bnorm's
`step_time` example (median of 100 calls, caller buffers), then the median of the five
medians of each. On a machine whose speed drifts by ±30% between minutes this says more
than two separate benchmark runs. Run from the repository root after
`cargo build --release -p bnorm --example step_time`:
    python3 bench/probes/alternate.py [S2,S3,S4 [train,infer,bwd [reps [tensorflow]]]]
With `tensorflow` as the fourth argument the peer is TensorFlow's fused op instead
(`FusedBatchNormV3` / `FusedBatchNormGradV3`, median of 100 calls, 2 intra-op threads).
Quoted in bench/RESULTS.md ("Same minutes against PyTorch")."""
import statistics, subprocess, sys, time
import torch

torch.set_num_threads(2)
SHAPES = {
    "S1": ((32, 64, 56, 56), False), "S2": ((32, 256, 14, 14), False),
    "S3": ((4096, 1024), False), "S4": ((32, 64, 56, 56), True), "S5": ((64, 128, 56, 56), False),
}

def median_ms(f):
    """The median of 100 calls of `f` after 5 untimed ones, in ms."""
    for _ in range(5):
        f()
    ts = []
    for _ in range(100):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def torch_ms(shape, op):
    dims, cl = SHAPES[shape]
    x = torch.randn(*dims)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    c = dims[1]
    w, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    _, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
    f = {
        "train": lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5),
        "infer": lambda: torch.ops.aten.native_batch_norm(x, w, b, rm, rv, False, 0.1, 1e-5),
        "bwd": lambda: torch.ops.aten.native_batch_norm_backward(
            dy, x, w, rm, rv, sm, si, True, 1e-5, [True, True, True]),
    }[op]
    with torch.no_grad():
        return median_ms(f)

_tf = {}


def tf_ms(shape, op):
    import tensorflow as tf
    if not _tf:
        tf.config.threading.set_intra_op_parallelism_threads(2)
        tf.config.threading.set_inter_op_parallelism_threads(1)
        _tf["tf"] = tf
    dims, cl = SHAPES[shape]
    if len(dims) == 2:
        shp, fmt = (dims[0], 1, 1, dims[1]), "NHWC"
    elif cl:
        shp, fmt = (dims[0], dims[2], dims[3], dims[1]), "NHWC"
    else:
        shp, fmt = dims, "NCHW"
    c = dims[1]
    x, dy = tf.random.normal(shp), tf.random.normal(shp)
    scale, offset, mean, var = tf.ones([c]), tf.zeros([c]), tf.zeros([c]), tf.ones([c])
    fwd = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=tf.zeros([0]),
                                      variance=tf.zeros([0]), epsilon=1e-3, data_format=fmt,
                                      is_training=True)
    f = {
        "train": tf.function(lambda: tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=tf.zeros([0]), variance=tf.zeros([0]),
            epsilon=1e-3, data_format=fmt, is_training=True)[0]),
        "infer": tf.function(lambda: tf.raw_ops.FusedBatchNormV3(
            x=x, scale=scale, offset=offset, mean=mean, variance=var, epsilon=1e-3,
            data_format=fmt, is_training=False)[0]),
        "bwd": tf.function(lambda: tf.raw_ops.FusedBatchNormGradV3(
            y_backprop=dy, x=x, scale=scale, reserve_space_1=fwd[3], reserve_space_2=fwd[4],
            reserve_space_3=fwd[5], epsilon=1e-3, data_format=fmt, is_training=True)[0]),
    }[op]
    return median_ms(f)


def bnorm_ms(shape, op):
    out = subprocess.run(["./target/release/examples/step_time", shape, op],
                         capture_output=True, text=True, check=True).stdout
    return float(out.split("median")[1].split("ms")[0])

shapes = sys.argv[1].split(",") if len(sys.argv) > 1 else ["S2", "S3", "S4"]
ops = sys.argv[2].split(",") if len(sys.argv) > 2 else ["train", "infer", "bwd"]
reps = int(sys.argv[3]) if len(sys.argv) > 3 else 5
peer = sys.argv[4] if len(sys.argv) > 4 else "pytorch"
peer_ms, name = (tf_ms, "TensorFlow") if peer == "tensorflow" else (torch_ms, "PyTorch")
print(f"shape op     {name} ms (runs)                    bnorm ms (runs)                      {name}/bnorm")
for s in shapes:
    for op in ops:
        t, b = [], []
        for _ in range(reps):
            t.append(peer_ms(s, op)); b.append(bnorm_ms(s, op))
        mt, mb = statistics.median(t), statistics.median(b)
        print(f"{s:5} {op:6} {mt:6.3f} ({' '.join(f'{v:.2f}' for v in t)})  "
              f"{mb:6.3f} ({' '.join(f'{v:.2f}' for v in b)})  {mt / mb:.2f}x", flush=True)
