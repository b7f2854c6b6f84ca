"""Writes the TensorFlow checkpoint fixtures of `tests/read_tf.rs` with the real framework
and records, in `expected.json`, every variable's name, dtype, shape and value as
TensorFlow itself reports them (`tf.train.list_variables` / `tf.train.load_variable`).

Run (from this folder), in a virtual environment outside the repository:

    python3 -m venv /work/venv-tf
    /work/venv-tf/bin/pip install tensorflow==2.21.0 tf_keras==2.21.0  # brings keras 3.15.1
    /work/venv-tf/bin/python make_tf.py

Fixtures (each a tensor bundle: `<prefix>.index` + `<prefix>.data-00000-of-00001`):

* `classic_run/model.ckpt-1`: the classic TF1 recipe under `tf.compat.v1.variable_scope("bn")`
  (`tf.nn.moments` + `tf.compat.v1.train.ExponentialMovingAverage(0.9)` applied to the batch
  mean and variance + `tf.nn.batch_normalization`, eps 1e-3), with the EMA apply op run
  three times, saved with `tf.compat.v1.train.Saver` (a `checkpoint` file names it).
* `classic_norun/model.ckpt-0`: the same graph saved with the update op **never run** (the
  classic bug: the moving statistics keep their initial values, zeros).
* `classic_two/model.ckpt`: two classic-recipe layers, `block/bn` (EMA applied inside its
  variable scope) and `bn2` (EMA applied outside any variable scope), two updates run.
* `layers_v1/model.ckpt`: `tf.compat.v1.layers.batch_normalization` (momentum 0.9, eps 1e-3)
  under scope `net`, trained three steps with the UPDATE_OPS run, saved with Saver.
* `tf2_checkpoint/ckpt-1`: a tf_keras model (Conv2D, BatchNormalization named `bn_a`, Dense,
  BatchNormalization named `bn_b`) trained one epoch with the legacy Adam (slot variables), saved with
  `tf.train.Checkpoint(model=..., optimizer=...).save` (object graph, optimizer slots,
  `save_counter`).
* `keras3_checkpoint/ckpt-1`: a Keras 3 model (TensorFlow backend; Dense `fc`,
  BatchNormalization `bn_k`) trained one epoch with Adam, saved with
  `tf.train.Checkpoint(model=...)` (its gamma and beta are saved under the optimizer's
  `_trainable_variables`).
* `keras3_sequential/ckpt-1`: a Keras 3 Sequential model (`fc`, `bn_s`) saved the same way
  (here gamma and beta are saved under `optimizer/_trainable_variables/N`).
* `keras_weights/weights.ckpt`: the same model's `model.save_weights("weights.ckpt")`
  (tf_keras writes a TensorFlow checkpoint for a name without `.h5`).
"""
import json
import os
import shutil

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ["TF_USE_LEGACY_KERAS"] = "1"
import numpy as np
import tensorflow as tf
import tf_keras

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(0)


def report(prefix):
    out = {}
    for name, shape in tf.train.list_variables(prefix):
        v = tf.train.load_variable(prefix, name)
        entry = {"shape": list(shape), "dtype": str(getattr(v, "dtype", type(v).__name__))}
        if isinstance(v, np.ndarray) and v.dtype.kind in "fiub":
            entry["values"] = v.reshape(-1).tolist()
        elif isinstance(v, (bytes, np.bytes_)):
            entry["string_bytes"] = len(v)
        elif isinstance(v, (int, float, np.integer, np.floating)):
            entry["values"] = [v.item() if hasattr(v, "item") else v]
        out[name] = entry
    return out


def object_graph(prefix):
    """checkpoint_key -> full_name of every attribute of the TF2 object graph, parsed by
    TensorFlow's own proto class."""
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    g = trackable_object_graph_pb2.TrackableObjectGraph()
    g.ParseFromString(tf.train.load_variable(prefix, "_CHECKPOINTABLE_OBJECT_GRAPH"))
    return {
        a.checkpoint_key: a.full_name for n in g.nodes for a in n.attributes
    }


def fresh(sub):
    d = os.path.join(HERE, sub)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def classic(sub, run_updates):
    d = fresh(sub)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2, 2, 3])
        train = tf.compat.v1.placeholder(tf.bool, [])
        with tf.compat.v1.variable_scope("bn"):
            beta = tf.Variable(tf.constant([0.1, -0.2, 0.3]), name="beta")
            gamma = tf.Variable(tf.constant([1.5, 0.5, 2.0]), name="gamma")
            batch_mean, batch_var = tf.nn.moments(x, [0, 1, 2], name="moments")
            ema = tf.compat.v1.train.ExponentialMovingAverage(decay=0.9)
            ema_apply_op = ema.apply([batch_mean, batch_var])

            def mean_var_with_update():
                with tf.control_dependencies([ema_apply_op]):
                    return tf.identity(batch_mean), tf.identity(batch_var)

            mean, var = tf.compat.v1.cond(
                train,
                mean_var_with_update,
                lambda: (ema.average(batch_mean), ema.average(batch_var)),
            )
            y = tf.nn.batch_normalization(x, mean, var, beta, gamma, 1e-3)
        shadows = {
            "mean": ema.average(batch_mean).name,
            "variance": ema.average(batch_var).name,
            "mean_op": batch_mean.op.name,
            "variance_op": batch_var.op.name,
        }
        saver = tf.compat.v1.train.Saver(save_relative_paths=True)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            steps = 3 if run_updates else 0
            batches = []
            for _ in range(steps):
                b = rng.normal(1.0, 2.0, size=(4, 2, 2, 3)).astype(np.float32)
                batches.append(b)
                s.run(y, {x: b, train: True})
            prefix = saver.save(
                s, os.path.join(d, "model.ckpt"), global_step=steps, write_meta_graph=False
            )
    return os.path.relpath(prefix, HERE), {
        "ema_decay": 0.9,
        "eps": 1e-3,
        "update_ops_run": steps,
        "moving_statistics_at_initial_values": not run_updates,
        "ema_shadow_names": shadows,
    }


def classic_two(sub):
    """Two classic-recipe layers in one graph: `block/bn` with the EMA applied inside its
    variable scope (shadows `block/bn/block/bn/moments/...`) and `bn2` with the EMA applied
    outside any variable scope (shadows `bn2/moments/...`)."""
    d = fresh(sub)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 2])
        shadows = {}

        def layer(h, scope, outside):
            with tf.compat.v1.variable_scope(scope):
                beta = tf.Variable(tf.zeros([2]), name="beta")
                gamma = tf.Variable(tf.ones([2]), name="gamma")
                m, v = tf.nn.moments(h, [0], name="moments")
            ema = tf.compat.v1.train.ExponentialMovingAverage(decay=0.5)
            if outside:
                op = ema.apply([m, v])
            else:
                with tf.compat.v1.variable_scope(scope, reuse=tf.compat.v1.AUTO_REUSE):
                    op = ema.apply([m, v])
            full = tf.compat.v1.get_variable_scope().name
            shadows[(full + "/" if full else "") + scope] = {
                "mean": ema.average(m).name,
                "variance": ema.average(v).name,
            }
            with tf.control_dependencies([op]):
                return tf.nn.batch_normalization(h, m, v, beta, gamma, 1e-3)

        with tf.compat.v1.variable_scope("block"):
            y = layer(x, "bn", outside=False)
        y = layer(y, "bn2", outside=True)
        saver = tf.compat.v1.train.Saver(save_relative_paths=True)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            for _ in range(2):
                s.run(y, {x: rng.normal(2.0, 3.0, size=(5, 2)).astype(np.float32)})
            prefix = saver.save(s, os.path.join(d, "model.ckpt"), write_meta_graph=False)
    return os.path.relpath(prefix, HERE), {"ema_decay": 0.5, "ema_shadow_names": shadows}


def layers_v1(sub):
    d = fresh(sub)
    g = tf.Graph()
    with g.as_default():
        x = tf.compat.v1.placeholder(tf.float32, [None, 4])
        with tf.compat.v1.variable_scope("net"):
            h = tf.compat.v1.layers.dense(x, 4, name="fc")
            y = tf.compat.v1.layers.batch_normalization(
                h, momentum=0.9, epsilon=1e-3, training=True
            )
        loss = tf.reduce_mean(tf.square(y))
        update_ops = tf.compat.v1.get_collection(tf.compat.v1.GraphKeys.UPDATE_OPS)
        with tf.control_dependencies(update_ops):
            step = tf.compat.v1.train.GradientDescentOptimizer(0.1).minimize(loss)
        saver = tf.compat.v1.train.Saver(save_relative_paths=True)
        with tf.compat.v1.Session(graph=g) as s:
            s.run(tf.compat.v1.global_variables_initializer())
            for _ in range(3):
                s.run(step, {x: rng.normal(0.5, 1.5, size=(8, 4)).astype(np.float32)})
            prefix = saver.save(s, os.path.join(d, "model.ckpt"), write_meta_graph=False)
    return os.path.relpath(prefix, HERE), {"momentum": 0.9, "eps": 1e-3, "update_ops_run": 3}


def keras_model():
    tf_keras.utils.set_random_seed(0)
    inp = tf_keras.Input((4, 4, 2))
    h = tf_keras.layers.Conv2D(3, 3, name="conv")(inp)
    h = tf_keras.layers.BatchNormalization(name="bn_a", momentum=0.8, epsilon=1e-4)(h)
    h = tf_keras.layers.Flatten()(h)
    h = tf_keras.layers.Dense(2, name="fc")(h)
    out = tf_keras.layers.BatchNormalization(name="bn_b")(h)
    model = tf_keras.Model(inp, out, name="net")
    model.compile(optimizer=tf_keras.optimizers.legacy.Adam(1e-2), loss="mse")
    xs = rng.normal(0.3, 1.2, size=(16, 4, 4, 2)).astype(np.float32)
    ys = rng.normal(size=(16, 2)).astype(np.float32)
    model.fit(xs, ys, batch_size=8, epochs=1, verbose=0)
    return model


def tf2(sub, model):
    d = fresh(sub)
    ckpt = tf.train.Checkpoint(model=model, optimizer=model.optimizer)
    prefix = ckpt.save(os.path.join(d, "ckpt"))
    return os.path.relpath(prefix, HERE), {
        "layers": {
            l.name: {"eps": l.epsilon, "momentum": l.momentum,
                     "variables": [v.name for v in l.weights]}
            for l in model.layers if "bn" in l.name
        }
    }


def keras3(sub):
    """A Keras 3 model (TensorFlow backend) saved with `tf.train.Checkpoint`."""
    import keras

    keras.utils.set_random_seed(0)
    inp = keras.Input((3,))
    h = keras.layers.Dense(2, name="fc")(inp)
    out = keras.layers.BatchNormalization(name="bn_k", momentum=0.9)(h)
    model = keras.Model(inp, out, name="k3")
    model.compile(optimizer="adam", loss="mse")
    xs = rng.normal(1.0, 2.0, size=(8, 3)).astype(np.float32)
    model.fit(xs, np.ones((8, 2), np.float32), batch_size=4, epochs=1, verbose=0)
    d = fresh(sub)
    prefix = tf.train.Checkpoint(model=model).save(os.path.join(d, "ckpt"))
    bn = model.get_layer("bn_k")
    return os.path.relpath(prefix, HERE), {
        "keras": keras.__version__,
        "layers": {
            "bn_k": {"eps": bn.epsilon, "momentum": bn.momentum,
                     "variables": [v.path for v in bn.weights]}
        },
    }


def keras3_sequential(sub):
    """A Keras 3 Sequential model saved with `tf.train.Checkpoint`: its trainable variables
    are saved under the optimizer's `_trainable_variables/N`."""
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(2, name="fc"),
         keras.layers.BatchNormalization(name="bn_s")],
        name="seq",
    )
    model.compile(optimizer="adam", loss="mse")
    xs = rng.normal(-1.0, 0.5, size=(8, 3)).astype(np.float32)
    model.fit(xs, np.ones((8, 2), np.float32), batch_size=4, epochs=1, verbose=0)
    d = fresh(sub)
    prefix = tf.train.Checkpoint(model=model).save(os.path.join(d, "ckpt"))
    bn = model.get_layer("bn_s")
    return os.path.relpath(prefix, HERE), {
        "layers": {
            "bn_s": {"eps": bn.epsilon, "momentum": bn.momentum,
                     "variables": [v.path for v in bn.weights],
                     "tf_variable_names": [v.value.name for v in bn.weights]}
        },
    }


def save_weights(sub, model):
    d = fresh(sub)
    prefix = os.path.join(d, "weights.ckpt")
    model.save_weights(prefix)
    return os.path.relpath(prefix, HERE), {}


def main():
    expected = {
        "tensorflow": tf.__version__,
        "tf_keras": tf_keras.__version__,
        "numpy": np.__version__,
        "fixtures": {},
    }
    model = keras_model()
    for name, (prefix, facts) in {
        "classic_run": classic("classic_run", True),
        "classic_norun": classic("classic_norun", False),
        "classic_two": classic_two("classic_two"),
        "layers_v1": layers_v1("layers_v1"),
        "tf2_checkpoint": tf2("tf2_checkpoint", model),
        "keras_weights": save_weights("keras_weights", model),
        "keras3_checkpoint": keras3("keras3_checkpoint"),
        "keras3_sequential": keras3_sequential("keras3_sequential"),
    }.items():
        full = os.path.join(HERE, prefix)
        expected["fixtures"][name] = {
            "prefix": prefix,
            "facts": facts,
            "variables": report(full),
        }
        if name in ("tf2_checkpoint", "keras_weights", "keras3_checkpoint", "keras3_sequential"):
            expected["fixtures"][name]["object_graph"] = object_graph(full)
    with open(os.path.join(HERE, "expected.json"), "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
