"""Writes the seed corpora of the `read_flax` and `read_onnx` fuzz targets
(corpus/read_flax/, corpus/read_onnx/): the committed fixtures of tests/data/flax and
tests/data/onnx, and a handful of deterministic mutations of them (truncations, bit flips,
a huge claimed length, deep nesting). Plain Python 3, no packages:

    python3 make_seeds_flax_onnx.py
"""
import glob
import os
import random


def seeds(fmt, pattern, extra):
    out = f"corpus/read_{fmt}"
    os.makedirs(out, exist_ok=True)
    rng = random.Random(0)

    def write(name, data):
        with open(os.path.join(out, f"seed-{name}"), "wb") as f:
            f.write(data)

    for path in sorted(glob.glob(pattern)):
        base = os.path.basename(path).split(".")[0]
        data = open(path, "rb").read()
        write(base, data)
        write(base + "-half", data[: len(data) // 2])
        flipped = bytearray(data)
        for _ in range(4):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        write(base + "-flips", bytes(flipped))
    for name, data in extra.items():
        write(name, data)


# A map of one entry whose value claims 2^32 - 1 elements; deep nesting.
seeds("flax", "../tests/data/flax/*.msgpack", {
    "huge-map": b"\x81\xa1a\xdf\xff\xff\xff\xff" + b"\0" * 8,
    "deep": b"\x81\xa1a" + b"\x91" * 200 + b"\x01",
})
# ir_version then a graph claiming 2^35 bytes; nested graphs in attributes.
seeds("onnx", "../tests/data/onnx/*.onnx", {
    "huge-graph": b"\x08\x07\x3a\xff\xff\xff\xff\x7f" + b"\0" * 8,
    "empty-graph": b"\x08\x07\x3a\x00",
})
