"""Writes the seed corpus of the `read_tf` fuzz target (`corpus/read_tf/`) from the
TensorFlow fixtures in `../tests/data/tf`: each seed is a 4-byte little-endian index
length, the `.index` bytes and the shard's bytes; plus a few mutations of them
(truncations, bit flips, a swapped shard). Run: `python3 make_seeds_tf.py` (no packages)."""
import os
import random
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "tests", "data", "tf")
OUT = os.path.join(HERE, "corpus", "read_tf")
FIXTURES = {
    "classic_run": "classic_run/model.ckpt-3",
    "classic_norun": "classic_norun/model.ckpt-0",
    "classic_two": "classic_two/model.ckpt",
    "layers_v1": "layers_v1/model.ckpt",
    "tf2_checkpoint": "tf2_checkpoint/ckpt-1",
    "keras_weights": "keras_weights/weights.ckpt",
    "keras3_checkpoint": "keras3_checkpoint/ckpt-1",
    "keras3_sequential": "keras3_sequential/ckpt-1",
}


def seed(index, shard):
    return struct.pack("<I", len(index)) + index + shard


def main():
    os.makedirs(OUT, exist_ok=True)
    rnd = random.Random(0)
    pairs = {}
    for name, prefix in FIXTURES.items():
        p = os.path.join(DATA, prefix)
        index = open(p + ".index", "rb").read()
        shard = open(p + ".data-00000-of-00001", "rb").read()
        pairs[name] = (index, shard)
        open(os.path.join(OUT, f"seed-{name}"), "wb").write(seed(index, shard))
    index, shard = pairs["classic_run"]
    mutants = {
        "trunc_index": seed(index[: len(index) // 2], shard),
        "trunc_shard": seed(index, shard[:20]),
        "no_shard": seed(index, b""),
        "swapped_shard": seed(index, pairs["layers_v1"][1]),
        "index_only": index,
    }
    for i in range(4):
        b = bytearray(index)
        b[rnd.randrange(len(b) - 48)] ^= 1 << rnd.randrange(8)
        mutants[f"flip_index_{i}"] = seed(bytes(b), shard)
        s = bytearray(shard)
        s[rnd.randrange(len(s))] ^= 1 << rnd.randrange(8)
        mutants[f"flip_shard_{i}"] = seed(index, bytes(s))
    for name, b in mutants.items():
        open(os.path.join(OUT, f"seed-{name}"), "wb").write(b)


if __name__ == "__main__":
    main()
