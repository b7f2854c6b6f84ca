"""TensorFlow's fused batch norm on S4 and S3 (2 intra-op threads, f32, median of 40 calls):
the training forward and `FusedBatchNormGradV3` timed with and without `.numpy()` on the
result (the conversion copies outputs it does not share), and the direct backward op
checked against the tape's gradient. Why bench/peers.py times TensorFlow's ops directly
and without the conversion since the eighth session (bench/RESULTS.md, "Eighth
session"). Outside CI: python3 bench/probes/tf_direct.py"""
import statistics
import time

import tensorflow as tf

tf.config.threading.set_intra_op_parallelism_threads(2)
tf.config.threading.set_inter_op_parallelism_threads(1)


def med(f, n=40):
    for _ in range(5):
        f()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


for name, shape, c in [("S4", (32, 56, 56, 64), 64), ("S3", (4096, 1, 1, 1024), 1024)]:
    x, dy = tf.random.normal(shape), tf.random.normal(shape)
    scale, offset = tf.ones([c]), tf.zeros([c])
    fw = tf.raw_ops.FusedBatchNormV3(x=x, scale=scale, offset=offset, mean=tf.zeros([0]),
                                     variance=tf.zeros([0]), epsilon=1e-3, data_format="NHWC",
                                     is_training=True)

    @tf.function
    def train(x):
        return tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=1e-3,
                                                data_format="NHWC", is_training=True)

    @tf.function
    def bwd(dy, x):
        return tf.raw_ops.FusedBatchNormGradV3(y_backprop=dy, x=x, scale=scale,
                                               reserve_space_1=fw[3], reserve_space_2=fw[4],
                                               reserve_space_3=fw[5], epsilon=1e-3,
                                               data_format="NHWC", is_training=True)

    with tf.GradientTape() as tape:
        tape.watch(x)
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, scale, offset, epsilon=1e-3,
                                                   data_format="NHWC", is_training=True)
    g = tape.gradient(y, x, output_gradients=dy)
    diff = float(tf.reduce_max(tf.abs(g - bwd(dy, x)[0])))
    for _ in range(2):
        print(f"{name}: train {med(lambda: train(x)[0].numpy()):.2f} ms with .numpy(), "
              f"{med(lambda: train(x)[0]):.2f} without; backward op "
              f"{med(lambda: bwd(dy, x)[0].numpy()):.2f} with, {med(lambda: bwd(dy, x)[0]):.2f} "
              f"without; largest |direct - tape| {diff:.3g}", flush=True)
