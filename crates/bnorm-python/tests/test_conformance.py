"""The conformance cases (conformance/FORMAT.md, formats 1 and 2), recorded by PyTorch,
Keras and TensorFlow, replayed through the NumPy API with each case's own tolerance.

This is the Python form of the Rust runner (crates/bnorm/src/conformance.rs): the same
configuration from the metadata, the same setup, the same steps and comparisons. A
metadata key or tensor this replay does not know fails the case rather than being
ignored."""

import re

import numpy as np
import pytest

import bnorm
from conftest import CASES, read_safetensors

CASE_FILES = sorted(CASES.glob("*.safetensors"))
# FORMAT.md's error kinds, as the Rust runner maps core errors onto them
ERROR_KINDS = {
    "batch_too_small": {"BatchTooSmall"},
    "shape_mismatch": {"ShapeMismatch", "RankMismatch", "ChannelMismatch", "LengthMismatch"},
}
CHANNELS_LAST = {"NC", "NLC", "NHWC", "NDHWC"}
FORMATS = {"bnorm-conformance/1", "bnorm-conformance/2"}
META_KEYS = {
    "format", "convention", "layout", "dtype", "param_dtype", "single_value",
    "num_batches_tracked", "steps", "momentum", "eps", "scale", "center",
    "track_running_stats", "zero_debias", "ema_num_updates", "variant", "rmax", "rmin", "dmax",
    "renorm_momentum", "virtual_batch_size", "ghost_grouping", "expect_error", "rtol",
    "atol", "reference", "description",
}
RENORM = ("renorm_mean", "renorm_stddev", "moving_stddev")
INIT = {"weight", "bias", "running_mean", "running_var", *RENORM}
STEP = {"x", "y", "dy", "dx", "dweight", "dbias", "running_mean", "running_var", "mask",
        "weight", "bias", *RENORM}
DTYPES = {"f64": "float64", "f32": "float32", "f16": "float16", "bf16": "bfloat16"}


def _flag(meta, key, default):
    value = meta.get(key)
    if value is None:
        return default
    assert value in ("true", "false"), f"metadata {key} = {value!r}"
    return value == "true"


def _known_fields(meta, t, steps):
    unknown = set(meta) - META_KEYS
    assert not unknown, f"metadata keys this replay does not handle: {sorted(unknown)}"
    assert meta["format"] in FORMATS, meta["format"]
    for name in t:
        m = re.fullmatch(r"init\.(\w+)|step(\d+)\.(\w+)", name)
        ok = m is not None and (
            m[1] in INIT if m[1] else int(m[2]) < len(steps) and m[3] in STEP
        )
        assert ok, f"tensor {name} is not one this replay handles"


def _layer(meta, t, layout):
    """The layer the metadata describe (the Rust runner's `Case::config`)."""
    convention = meta["convention"]
    settings = {
        "eps": float(meta["eps"]),
        "scale": _flag(meta, "scale", True),
        "center": _flag(meta, "center", True),
        "track_running_stats": _flag(meta, "track_running_stats", True),
    }
    if convention == "torch":
        settings["momentum"] = None if meta["momentum"] == "none" else float(meta["momentum"])
    elif convention == "keras":
        settings["momentum"] = float(meta["momentum"])
    else:
        assert convention == "tf", f"convention {convention!r}"
        # assign_moving_average's zero_debias defaults to True, as in TensorFlow
        convention = "tensorflow" if _flag(meta, "zero_debias", True) else "keras"
        settings["momentum"] = float(meta["momentum"])
        if _flag(meta, "ema_num_updates", False):
            # ExponentialMovingAverage(num_updates=...): refused with zero_debias, as in Rust
            settings["ema_num_updates"] = True
    variant = meta.get("variant", "batch_norm")
    assert variant in ("batch_norm", "batch_renorm", "ghost", "ghost_renorm"), variant
    if variant in ("ghost", "ghost_renorm"):
        assert meta["ghost_grouping"] == "strided", meta["ghost_grouping"]
        settings["virtual_batch_size"] = int(meta["virtual_batch_size"])
    if variant in ("batch_renorm", "ghost_renorm"):
        # with virtual_batch_size: renorm of ghost batches, as tf_keras
        settings["renorm"] = {k: float(meta[k]) for k in ("rmax", "rmin", "dmax")}
        settings["renorm"]["momentum"] = float(meta["renorm_momentum"])
    if "single_value" in meta:
        settings["single_value"] = meta["single_value"]
    # channels as recorded by the initial state, else by the first input
    first = next((t[f"init.{n}"] for n in ("weight", "bias", "running_mean")
                  if f"init.{n}" in t), None)
    if first is not None:
        channels = first.shape[0]
    else:
        x0 = t["step0.x"]
        channels = x0.shape[-1] if layout in CHANNELS_LAST else x0.shape[1]
    return bnorm.BatchNorm(channels, convention, layout=layout, **settings)


def _setup(bn, meta, t):
    """The initial state (a wrong length raises here: shape_mismatch cases)."""
    if "init.weight" in t:
        bn.weight = t["init.weight"]
    if "init.bias" in t:
        bn.bias = t["init.bias"]
    if "init.running_mean" in t:
        bn.running_mean = t["init.running_mean"]
        bn.running_var = t["init.running_var"]
        if "num_batches_tracked" in meta:
            bn.num_batches_tracked = int(meta["num_batches_tracked"])
        renorm = [f"init.{n}" in t for n in RENORM]
        assert all(renorm) or not any(renorm), "init.renorm_*: all three or none"
        if all(renorm):
            # last: setting the running statistics resets the renorm state to theirs
            bn.renorm_state = tuple(t[f"init.{n}"] for n in RENORM)
    else:
        assert "num_batches_tracked" not in meta or meta["num_batches_tracked"] == "0"


def _state(bn):
    as_list = lambda a: None if a is None else a.tolist()
    renorm = bn.renorm_state
    return (as_list(bn.running_mean), as_list(bn.running_var), bn.num_batches_tracked,
            as_list(bn.weight), as_list(bn.bias),
            None if renorm is None else [as_list(a) for a in renorm])


def _close(name, got, want, rtol, atol):
    assert got is not None, f"{name}: bnorm has no such value"
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, name
    bad = ~(np.abs(got - want) <= atol + rtol * np.abs(want)) & ~(np.isnan(got) & np.isnan(want))
    if bad.any():
        i = np.argmax(np.where(bad, np.abs(got - want) - rtol * np.abs(want), -np.inf))
        pytest.fail(f"{name}: {bad.sum()} values off, worst {got.flat[i]} vs {want.flat[i]}")


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_case(path):
    meta, t = read_safetensors(path)
    steps = meta["steps"].split(",")
    _known_fields(meta, t, steps)
    layout = meta["layout"]
    rtol, atol = float(meta["rtol"]), float(meta["atol"])
    dtype = DTYPES[meta["dtype"]]
    param_dtype = DTYPES[meta.get("param_dtype", meta["dtype"])]
    assert t["step0.x"].dtype.name == dtype
    expect = meta.get("expect_error")
    kinds = ERROR_KINDS[expect] if expect is not None else set()
    bn = _layer(meta, t, layout)
    try:
        _setup(bn, meta, t)
    except bnorm.Error as e:
        assert e.kind in kinds, f"setup failed: {e!r} (kind {e.kind})"
        return
    for k, step in enumerate(steps):
        assert step in ("train", "eval"), step
        mode = "train" if step == "train" else "inference"
        s = f"step{k}."
        # format 2: parameters changed before this step (an optimizer step)
        if s + "weight" in t:
            assert t[s + "weight"].dtype.name == param_dtype
            bn.weight = t[s + "weight"]
        if s + "bias" in t:
            bn.bias = t[s + "bias"]
        mask = t[s + "mask"] != 0 if s + "mask" in t else None
        before = _state(bn)
        try:
            y = bn.forward(t[s + "x"], mode, mask=mask)
        except bnorm.Error as e:
            assert e.kind in kinds, f"step {k}: {e!r} (kind {e.kind})"
            assert _state(bn) == before, f"step {k}: the refused step changed the layer"
            # FORMAT.md, "Errors": the refused step is the last and records no outputs
            assert k + 1 == len(steps), f"step {k} refused ({expect}) but later steps exist"
            assert s + "y" not in t, f"step {k} refused ({expect}) but records an output"
            return
        assert y.dtype == t[s + "x"].dtype
        _close(s + "y", y, t[s + "y"], rtol, atol)
        if s + "dy" in t:
            dx, dw, db = bn.backward(t[s + "dy"])
            _close(s + "dx", dx, t[s + "dx"], rtol, atol)
            for name, got in (("dweight", dw), ("dbias", db)):
                if s + name in t:
                    assert t[s + name].dtype.name == param_dtype
                    _close(s + name, got, t[s + name], rtol, atol)
                else:
                    assert got is None, f"{s}{name}: not recorded, but bnorm has it"
        for name in ("running_mean", "running_var"):
            if s + name in t:
                _close(s + name, getattr(bn, name), t[s + name], rtol, atol)
        renorm = bn.renorm_state
        for i, name in enumerate(RENORM):
            if s + name in t:
                _close(s + name, None if renorm is None else renorm[i], t[s + name], rtol, atol)
    assert expect is None, f"expected error {expect}, but every step succeeded"
