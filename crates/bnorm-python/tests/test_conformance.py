"""The conformance cases (conformance/FORMAT.md), recorded by PyTorch, Keras and
TensorFlow, replayed through the NumPy API with each case's own tolerance."""

import numpy as np
import pytest

import bnorm
from conftest import CASES, read_safetensors

CASE_FILES = sorted(CASES.glob("*.safetensors"))
ERROR_KINDS = {
    "batch_too_small": {"BatchTooSmall"},
    "shape_mismatch": {"ShapeMismatch", "ChannelMismatch"},
}
CHANNELS_LAST = {"NC", "NLC", "NHWC", "NDHWC"}


def _layer(meta, channels):
    convention = {"torch": "torch", "keras": "keras", "tf": "keras"}[meta["convention"]]
    if meta["convention"] == "tf" and meta.get("zero_debias") == "true":
        convention = "tensorflow"
    momentum = None if meta["momentum"] == "none" else float(meta["momentum"])
    variant = {}
    if meta["variant"] == "ghost":
        assert meta["ghost_grouping"] == "strided"
        variant["virtual_batch_size"] = int(meta["virtual_batch_size"])
    elif meta["variant"] == "batch_renorm":
        variant["renorm"] = {k: float(meta[k]) for k in ("rmax", "rmin", "dmax")}
        variant["renorm"]["momentum"] = float(meta["renorm_momentum"])
    return bnorm.BatchNorm(
        channels,
        convention,
        layout=meta["layout"],
        eps=float(meta["eps"]),
        momentum=momentum,
        scale=meta["scale"] == "true",
        center=meta["center"] == "true",
        track_running_stats=meta["track_running_stats"] == "true",
        **variant,
    )


def _close(name, got, want, rtol, atol):
    got = np.asarray(got, dtype=np.float64)
    want = np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, name
    bad = np.abs(got - want) > atol + rtol * np.abs(want)
    if bad.any():
        i = np.argmax(np.abs(got - want) - rtol * np.abs(want))
        pytest.fail(f"{name}: {bad.sum()} values off, worst {got.flat[i]} vs {want.flat[i]}")


def _setup(bn, t):
    # Parameters are set one by one; a wrong length raises here (shape_mismatch cases).
    if "init.weight" in t:
        bn.weight = t["init.weight"]
    if "init.bias" in t:
        bn.bias = t["init.bias"]
    if "init.running_mean" in t:
        bn.running_mean = t["init.running_mean"]
        bn.running_var = t["init.running_var"]


def _state(bn):
    as_list = lambda a: None if a is None else a.tolist()
    return (as_list(bn.running_mean), as_list(bn.running_var), bn.num_batches_tracked,
            as_list(bn.weight), as_list(bn.bias))


@pytest.mark.parametrize("path", CASE_FILES, ids=lambda p: p.stem)
def test_case(path):
    meta, t = read_safetensors(path)
    layout = meta["layout"]
    x0 = t["step0.x"]
    channels = x0.shape[-1] if layout in CHANNELS_LAST else x0.shape[1]
    bn = _layer(meta, channels)
    rtol, atol = float(meta["rtol"]), float(meta["atol"])
    steps = meta["steps"].split(",")
    if "expect_error" in meta:
        kinds = ERROR_KINDS[meta["expect_error"]]
        with pytest.raises(bnorm.Error) as err:
            _setup(bn, t)
            before = _state(bn)
            for k, step in enumerate(steps):
                try:
                    bn.forward(t[f"step{k}.x"], "train" if step == "train" else "inference")
                except bnorm.Error:
                    assert _state(bn) == before, "a failed step changed the layer"
                    raise
        assert err.value.kind in kinds, err.value
        return
    _setup(bn, t)
    for k, step in enumerate(steps):
        mode = "train" if step == "train" else "inference"
        y = bn.forward(t[f"step{k}.x"], mode)
        assert y.dtype == x0.dtype
        _close(f"step{k}.y", y, t[f"step{k}.y"], rtol, atol)
        if f"step{k}.dy" in t:
            dx, dw, db = bn.backward(t[f"step{k}.dy"])
            _close(f"step{k}.dx", dx, t[f"step{k}.dx"], rtol, atol)
            if f"step{k}.dweight" in t:
                _close(f"step{k}.dweight", dw, t[f"step{k}.dweight"], rtol, atol)
            else:
                assert dw is None
            if f"step{k}.dbias" in t:
                _close(f"step{k}.dbias", db, t[f"step{k}.dbias"], rtol, atol)
            else:
                assert db is None
        if f"step{k}.running_mean" in t:
            _close(f"step{k}.running_mean", bn.running_mean, t[f"step{k}.running_mean"], rtol, atol)
            _close(f"step{k}.running_var", bn.running_var, t[f"step{k}.running_var"], rtol, atol)
