"""Writes the seed corpus of the `read_layers` fuzz target (corpus/read_layers/seed-*).

    python3 make_seeds.py   # needs numpy and safetensors
"""
import json, os, struct
import numpy as np
from safetensors.numpy import save

out = "corpus/read_layers"
os.makedirs(out, exist_ok=True)
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def write(name, data):
    with open(os.path.join(out, "seed-" + name), "wb") as f:
        f.write(data)


c = 3
write("torch", save({"bn.weight": f32(c), "bn.bias": f32(c), "bn.running_mean": f32(c),
                     "bn.running_var": np.abs(f32(c)),
                     "bn.num_batches_tracked": np.array(7, dtype=np.int64),
                     "conv.weight": f32(c, 2, 3, 3)}, metadata={"format": "pt"}))
write("torch_f16", save({"bn.running_mean": f32(c).astype(np.float16),
                         "bn.running_var": np.abs(f32(c)).astype(np.float16)}))
write("keras", save({"bn/gamma": f32(c), "bn/beta": f32(c), "bn/moving_mean": f32(c),
                     "bn/moving_variance": np.abs(f32(c)), "bn/renorm_mean": f32(c),
                     "bn/renorm_stddev": np.abs(f32(c)), "bn/moving_stddev": np.abs(f32(c))}))
write("keras_tf", save({"m/bn/gamma:0": f32(c), "m/bn/moving_mean:0": f32(c),
                        "m/bn/moving_variance:0": f32(c).astype(np.float64)}))
write("flax", save({"params/BatchNorm_0/scale": f32(c), "params/BatchNorm_0/bias": f32(c),
                    "batch_stats/BatchNorm_0/mean": f32(c),
                    "batch_stats/BatchNorm_0/var": np.abs(f32(c))}))
write("meta", save({"bn.weight": f32(2), "bn.bias": f32(2)},
                   metadata={"bnorm.layer.bn.format": "torch", "bnorm.layer.bn.eps": "1e-3",
                             "bnorm.layer.bn.momentum": "decay:9.9e-1",
                             "bnorm.layer.bn.variance": "biased"}))


def raw(header, data=b""):
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


write("overflow", raw({"a.running_mean": {"dtype": "F32", "shape": [2**32, 2**32, 16],
                                          "data_offsets": [0, 4]}}, b"\0" * 4))
write("past_end", raw({"a.running_mean": {"dtype": "F32", "shape": [2],
                                          "data_offsets": [0, 8]}}, b"\0" * 4))
write("int_stats", raw({"a.running_mean": {"dtype": "I32", "shape": [1], "data_offsets": [0, 4]},
                        "a.running_var": {"dtype": "I32", "shape": [1], "data_offsets": [4, 8]}},
                       b"\0" * 8))
write("neg_count", raw({"a.num_batches_tracked": {"dtype": "I64", "shape": [],
                                                  "data_offsets": [0, 8]}},
                       struct.pack("<q", -3)))
write("huge_len", struct.pack("<Q", 2**63) + b"{}")
write("truncated", save({"bn.running_mean": f32(4), "bn.running_var": f32(4)})[:-5])
