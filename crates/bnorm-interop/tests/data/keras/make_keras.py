"""Writes small real Keras 3 and tf_keras files with BatchNormalization layers, and what
the frameworks reported about them, for bnorm-interop's Keras reader tests
(crates/bnorm-interop/tests/read_keras.rs).

    python3 -m venv /work/venv-keras
    /work/venv-keras/bin/pip install tensorflow keras tf_keras h5py
    # used on 2026-12-03: tensorflow 2.21.0, keras 3.15.1, tf_keras 2.21.0, h5py 3.14.0,
    # numpy 2.4.6, Python 3.11.7
    cd crates/bnorm-interop/tests/data/keras
    KERAS_BACKEND=tensorflow /work/venv-keras/bin/python make_keras.py

Keras 3 (model: Conv2D -> BN defaults -> pooling -> Dense -> BN center=False eps=1e-2
momentum=0.9 -> nested Sequential [Dense -> BN scale=False eps=1e-4 momentum=0.8] -> BN
center=False scale=False):
    k3_fresh.keras, k3_trained.keras          model.save (never trained / 2 fit batches)
    k3_trained.weights.h5                     model.save_weights of the trained model
    k3_custom.keras                           a custom layer holding a BN (trained)
    k3_chunked.weights.h5                     its copy by h5py with chunked datasets
tf_keras (model: Conv2D -> BN fused (default) -> Conv2D -> BN fused=False -> pooling ->
Dense -> BN renorm=True -> nested Sequential [Dense -> BN center=False scale=False
eps=1e-2 momentum=0.5]):
    tfk_fresh.h5, tfk_trained.h5              model.save(..., save_format="h5")
    tfk_trained_weights.h5                    model.save_weights(... .h5)
    tfk_latest.h5                             its copy by h5py with libver="latest"
expected.json: for every file, each BN layer's name (and the path its weights have in
the file), epsilon, momentum, center, scale, and get_weights() as the framework gave
them (`fused` is the layer's own attribute after building); plus the evidence that
tf_keras's fused layer keeps the unbiased variance (momentum 0, one training step on a
known batch: the moving variance becomes the Bessel-corrected batch variance when fused,
the biased one when not) and that tf_keras's get_config() does not save `fused`.
"""
import json
import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import h5py  # noqa: E402
import keras  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
rng = np.random.default_rng(3)
x_train = rng.normal(size=(8, 4, 4, 2)).astype("float32")
y_train = rng.normal(size=(8, 2)).astype("float32")
expected = {
    "versions": {
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_keras": tf_keras.__version__,
        "h5py": h5py.__version__,
        "numpy": np.__version__,
    },
    "files": {},
}


def floats(a):
    return [float(v) for v in np.asarray(a, dtype=np.float64).ravel()]


def bn_report(layer, path):
    names = [w.path if hasattr(w, "path") else w.name for w in layer.weights]
    return {
        "name": layer.name,
        "path": path,
        "epsilon": float(layer.epsilon),
        "momentum": float(layer.momentum),
        "center": bool(layer.center),
        "scale": bool(layer.scale),
        "axis": layer.axis if isinstance(layer.axis, int) else list(layer.axis),
        "renorm": bool(getattr(layer, "renorm", False)),
        "fused": getattr(layer, "fused", None),
        "weight_names": names,
        "weights": [floats(w) for w in layer.get_weights()],
    }


def bn_layers(model, outer=""):
    for layer in model.layers:
        if isinstance(layer, (keras.Model, tf_keras.Model)):
            yield from bn_layers(layer, outer + layer.name + "/")
        elif type(layer).__name__ == "BatchNormalization":
            yield outer + layer.name, layer


# ----------------------------------------------------------------------------- Keras 3
def keras3_model():
    keras.utils.set_random_seed(1)
    L = keras.layers
    inp = keras.Input((4, 4, 2), name="image")
    x = L.Conv2D(3, 1, name="conv")(inp)
    x = L.BatchNormalization(name="bn_conv")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(3, name="dense")(x)
    x = L.BatchNormalization(center=False, epsilon=1e-2, momentum=0.9, name="bn_nocenter")(x)
    inner = keras.Sequential(
        [
            keras.Input((3,)),
            L.Dense(2, name="inner_dense"),
            L.BatchNormalization(scale=False, epsilon=1e-4, momentum=0.8, name="bn_noscale"),
        ],
        name="inner",
    )
    x = inner(x)
    out = L.BatchNormalization(center=False, scale=False, name="bn_plain")(x)
    model = keras.Model(inp, out, name="k3net")
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    return model


def keras3_h5_paths(path):
    """Every group holding `vars` with BN-looking contents, as written."""
    found = []
    with h5py.File(path, "r") as f:
        def visit(name, obj):
            if isinstance(obj, h5py.Group) and name.endswith("/vars") and "batch_normalization" in name:
                found.append(name[: -len("/vars")])
        f.visititems(visit)
    return sorted(found)


def report_keras3(model, file, weights_h5=None):
    layers = [bn_report(l, p) for p, l in bn_layers(model)]
    entry = {"kind": "keras3", "layers": layers}
    if weights_h5 is not None:
        entry["h5_bn_paths"] = keras3_h5_paths(weights_h5)
    expected["files"][file] = entry


m = keras3_model()
m.save(os.path.join(HERE, "k3_fresh.keras"))
report_keras3(m, "k3_fresh.keras")
m.fit(x_train, y_train, batch_size=4, epochs=1, verbose=0)  # 2 batches
m.save(os.path.join(HERE, "k3_trained.keras"))
m.save_weights(os.path.join(HERE, "k3_trained.weights.h5"))
report_keras3(m, "k3_trained.keras")
report_keras3(m, "k3_trained.weights.h5", os.path.join(HERE, "k3_trained.weights.h5"))


# A custom (subclassed) layer holding a BatchNormalization: Keras 3 stores the sublayer
# under its Python attribute name (layers/block/bn/vars) and config.json does not
# describe it, so the reader keeps its tensors but cannot recognize it as batch norm.
@keras.saving.register_keras_serializable(package="bnorm")
class Block(keras.layers.Layer):
    def __init__(self, units=2, **kw):
        super().__init__(**kw)
        self.units = units
        self.dense = keras.layers.Dense(units, name="block_dense")
        self.bn = keras.layers.BatchNormalization(momentum=0.7, name="block_bn")

    def call(self, x, training=None):
        return self.bn(self.dense(x), training=training)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


keras.utils.set_random_seed(4)
inp = keras.Input((3,), name="features")
m = keras.Model(inp, Block(name="block")(inp), name="custom")
m.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
m.fit(rng.normal(size=(8, 3)).astype("float32"), y_train, batch_size=4, epochs=1, verbose=0)
m.save(os.path.join(HERE, "k3_custom.keras"))
block = m.get_layer("block")
expected["custom_layer"] = {
    "file": "k3_custom.keras",
    "layer": bn_report(block.bn, "block/block_bn"),
    "h5_path": "layers/block/bn/vars",
}


# ---------------------------------------------------------------------------- tf_keras
def tfk_model():
    tf_keras.utils.set_random_seed(2)
    L = tf_keras.layers
    inp = tf_keras.Input((4, 4, 2), name="image")
    x = L.Conv2D(3, 1, name="conv")(inp)
    x = L.BatchNormalization(name="bn_fused")(x)  # fused=None: fused for 4-D input
    x = L.Conv2D(3, 1, name="conv2")(x)
    x = L.BatchNormalization(fused=False, epsilon=2e-3, name="bn_unfused")(x)
    x = L.GlobalAveragePooling2D(name="pool")(x)
    x = L.Dense(3, name="dense")(x)
    x = L.BatchNormalization(renorm=True, momentum=0.95, name="bn_renorm")(x)
    inner = tf_keras.Sequential(
        [
            L.Dense(2, name="inner_dense", input_shape=(3,)),
            L.BatchNormalization(center=False, scale=False, epsilon=1e-2, momentum=0.5, name="bn_inner"),
        ],
        name="inner",
    )
    out = inner(x)
    model = tf_keras.Model(inp, out, name="tfknet")
    model.compile(optimizer=tf_keras.optimizers.SGD(0.1), loss="mse")
    return model


def report_tfk(model, file):
    layers = [bn_report(l, p) for p, l in bn_layers(model)]
    expected["files"][file] = {"kind": "tf_keras", "layers": layers}


m = tfk_model()
m.save(os.path.join(HERE, "tfk_fresh.h5"), save_format="h5")
report_tfk(m, "tfk_fresh.h5")
m.fit(x_train, y_train, batch_size=4, epochs=1, verbose=0)
m.save(os.path.join(HERE, "tfk_trained.h5"), save_format="h5")
m.save_weights(os.path.join(HERE, "tfk_trained_weights.h5"))
report_tfk(m, "tfk_trained.h5")
report_tfk(m, "tfk_trained_weights.h5")

# ------------------------------------------ evidence: which variance a fused layer keeps
batch = np.arange(2 * 2 * 2 * 1, dtype="float32").reshape(2, 2, 2, 1) ** 2  # 8 values
evidence = {"batch": floats(batch), "biased_var": float(np.var(batch)), "unbiased_var": float(np.var(batch, ddof=1))}
for fused in (True, False):
    bn = tf_keras.layers.BatchNormalization(momentum=0.0, fused=fused)
    bn(tf.constant(batch), training=True)
    evidence[f"fused_{fused}_layer_fused"] = bool(bn.fused)
    evidence[f"fused_{fused}_moving_variance"] = float(bn.moving_variance.numpy()[0])
evidence["fused_argument_in_get_config"] = "fused" in tf_keras.layers.BatchNormalization(fused=False).get_config()
bn = tf_keras.layers.BatchNormalization(momentum=0.0)  # fused=None: the default
bn(tf.constant(batch), training=True)
evidence["default_4d_layer_fused"] = bool(bn.fused)
evidence["default_4d_moving_variance"] = float(bn.moving_variance.numpy()[0])
bn = keras.layers.BatchNormalization(momentum=0.0)
bn(batch, training=True)
evidence["keras3_moving_variance"] = float(np.asarray(bn.moving_variance)[0])
expected["fused_variance_evidence"] = evidence

# ------------------------------------ HDF5 layouts Keras does not write but h5py can
# The same weights copied with h5py: every dataset chunked (chunks of 2 values, so a
# 3-channel vector spans two chunks, the second one partly outside), and the file
# written with libver="latest" (superblock 3, version-2 object headers), which the
# reader refuses with advice.
def copy_h5(src, dst, **file_kw):
    with h5py.File(src, "r") as fin, h5py.File(dst, "w", **file_kw) as fout:
        def visit(name, obj):
            if isinstance(obj, h5py.Group):
                g = fout.require_group(name)
            else:
                chunks = tuple(min(2, d) for d in obj.shape) if obj.shape else None
                g = fout.create_dataset(name, data=obj[()], chunks=chunks if file_kw == {} else None)
            for k, v in obj.attrs.items():
                g.attrs[k] = v
        fin.visititems(visit)


copy_h5(os.path.join(HERE, "k3_trained.weights.h5"), os.path.join(HERE, "k3_chunked.weights.h5"))
copy_h5(os.path.join(HERE, "tfk_trained_weights.h5"), os.path.join(HERE, "tfk_latest.h5"), libver="latest")
with h5py.File(os.path.join(HERE, "tfk_trained_weights.h5"), "r") as fin, h5py.File(os.path.join(HERE, "tfk_latest.h5"), "a") as fout:
    for k, v in fin.attrs.items():
        fout.attrs[k] = v
expected["h5py_copies"] = {
    "k3_chunked.weights.h5": "k3_trained.weights.h5 with every non-scalar dataset chunked (chunks of 2)",
    "tfk_latest.h5": "tfk_trained_weights.h5 copied with libver='latest' (refused)",
}

with open(os.path.join(HERE, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1)
    f.write("\n")
print(json.dumps(evidence, indent=1))
