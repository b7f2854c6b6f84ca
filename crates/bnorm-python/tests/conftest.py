"""Shared helpers of the pytest suite (run by `.ci/run`; see the crate's README section in
the repository README)."""

import json
import pathlib
import struct

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[3]
CASES = REPO / "conformance" / "cases"


def _dtype(name):
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype({"F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8"}[name])


def read_safetensors(path):
    """(metadata, tensors) of a safetensors file -- the format is an 8-byte header length,
    a JSON header and raw little-endian data; read here directly so that bfloat16 needs
    only ml_dtypes."""
    raw = pathlib.Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = raw[8 + n :]
    tensors = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        a = np.frombuffer(data[start:end], dtype=_dtype(t["dtype"]))
        tensors[name] = a.reshape(t["shape"]).copy()
    return meta, tensors
