#!/usr/bin/env python3
"""Generates the format-2 conformance cases (conformance/FORMAT.md) from the frameworks.

Run by hand, not in CI; each framework from its own environment:

    python conformance/generate/make_cases.py torch   # needs torch, numpy
    python conformance/generate/make_cases.py keras   # needs tensorflow, keras 3, tf_keras, numpy
    python conformance/generate/make_cases.py keras --only ghost_renorm_nhwc   # one case

With `--only NAME[,NAME...]` every case is still computed and cross-checked, but only the
named ones are written (and updated in INDEX.json); the other files stay as they are.

Every recorded output comes from the framework. Each case is also replayed by the plain
NumPy float64 model below (written from FORMAT.md, not from any framework) and the script
stops if the two disagree beyond the case's tolerance. Cases are written to
conformance/cases/ (a few KB each) and listed in conformance/cases/INDEX.json.
Last run: 2026-12-03 with torch 2.15.0, tensorflow 2.21.0, keras 3.15.1, tf_keras 2.21.0.
"""

import json
import os
import struct
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
CASES = os.path.join(HERE, "..", "cases")
FORMAT = "bnorm-conformance/2"
CHANNELS_LAST = {"NC": True, "NLC": True, "NHWC": True, "NDHWC": True,
                 "NCL": False, "NCHW": False, "NCDHW": False}
ST_DTYPE = {"f64": ("F64", np.float64), "f32": ("F32", np.float32), "f16": ("F16", np.float16)}


# --- safetensors, written by hand (no dependency) ------------------------------------

def write_safetensors(path, tensors, meta):
    """tensors: name -> (array, dtype key of ST_DTYPE)."""
    header, blobs, off = {}, [], 0
    for name in sorted(tensors):
        arr, dt = tensors[name]
        tag, npt = ST_DTYPE[dt]
        raw = np.ascontiguousarray(np.asarray(arr, dtype=npt)).astype("<" + np.dtype(npt).str[1:]).tobytes()
        header[name] = {"dtype": tag, "shape": list(np.shape(arr)), "data_offsets": [off, off + len(raw)]}
        blobs.append(raw)
        off += len(raw)
    header["__metadata__"] = {k: str(v) for k, v in meta.items()}
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


# --- the independent NumPy model (float64, from FORMAT.md) ----------------------------

def to_nc(x, layout):
    """(rows, C) view: rows = every value of a channel, sample-major."""
    x = np.asarray(x, np.float64)
    if not CHANNELS_LAST[layout]:
        x = np.moveaxis(x, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])  # (N, values per sample, C)


def from_nc(v, layout, shape):
    if CHANNELS_LAST[layout]:
        return v.reshape(shape)
    moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return np.moveaxis(v.reshape(moved), -1, 1)


def model(meta, init, steps):
    """Replays a case: init = dict of init tensors; steps = list of dicts with x, mode, and
    optionally dy, weight, bias. Returns per step a dict of outputs (or the error kind)."""
    conv, layout = meta["convention"], meta["layout"]
    eps = float(meta["eps"])
    mom = meta["momentum"]
    C = None
    w = init.get("init.weight")
    b = init.get("init.bias")
    rm = init.get("init.running_mean")
    rv = init.get("init.running_var")
    rm = None if rm is None else np.array(rm, np.float64)
    rv = None if rv is None else np.array(rv, np.float64)
    t = int(meta.get("num_batches_tracked", 0))
    single = meta.get("single_value", "refuse" if conv == "torch" else "accept")
    variant = meta.get("variant", "batch_norm")
    renorm = variant in ("batch_renorm", "ghost_renorm")
    if renorm:
        rn_mean = np.array(init.get("init.renorm_mean", rm), np.float64)
        rn_sd = np.array(init.get("init.renorm_stddev", np.sqrt(rv)), np.float64)
        mv_sd = np.array(init.get("init.moving_stddev", np.sqrt(rv)), np.float64)
    hidden = None  # tf zero-debias biased averages
    out = []
    for s in steps:
        if "weight" in s:
            w = s["weight"]
        if "bias" in s:
            b = s["bias"]
        v = to_nc(s["x"], layout)
        N, P, C = v.shape
        gamma = np.ones(C) if w is None else np.asarray(w, np.float64)
        beta = np.zeros(C) if b is None else np.asarray(b, np.float64)
        train = s["mode"] == "train"
        batch = train or rm is None
        if variant in ("ghost", "ghost_renorm") and train:
            vbs = int(meta["virtual_batch_size"])
            G = N // vbs
            groups = [np.arange(N) % G == g for g in range(G)]
        else:
            groups = [np.ones(N, bool)]
        means, vars_ = [], []
        if batch and "mask" in s:
            # Keras 3: the mask has x's shape without the last axis; sums over the selected
            # values divided by (count + 1e-7)
            wfull = np.broadcast_to(np.asarray(s["mask"], bool)[..., None], s["x"].shape)
            wv = to_nc(wfull.astype(np.float64), layout)
            cnt = wv.sum((0, 1))
            if np.any(cnt == 0) or (np.any(cnt == 1) and single == "refuse"):
                out.append({"error": "batch_too_small"})
                return out
            den = cnt + 1e-7
            mu = (wv * v).sum((0, 1)) / den
            means, vars_ = [mu], [(wv * (v - mu) ** 2).sum((0, 1)) / den]
            counts = [cnt]
        elif batch:
            for g in groups:
                vals = v[g].reshape(-1, C)
                m = vals.shape[0]
                unbiased_update = train and rm is not None and conv == "torch"
                if m == 0 or (m == 1 and (single == "refuse" or unbiased_update)):
                    out.append({"error": "batch_too_small"})
                    return out
                means.append(vals.mean(0))
                vars_.append(((vals - vals.mean(0)) ** 2).mean(0))
        else:
            means, vars_ = [rm], [rv]
        r, d = np.ones(C), np.zeros(C)
        if renorm and train:
            # one r, d per channel; with ghost groups from the average of the group moments
            sd = np.sqrt(np.mean(vars_, 0) + eps)
            sr = np.maximum(rn_sd, np.sqrt(eps))
            r = np.clip(sd / sr, float(meta["rmin"]), float(meta["rmax"]))
            d = np.clip((np.mean(means, 0) - rn_mean) / sr, -float(meta["dmax"]),
                        float(meta["dmax"]))
        y = np.empty_like(v)
        gi = np.zeros(N, int)
        for k, g in enumerate(groups):
            gi[g] = k
        for n in range(N):
            xh = (v[n] - means[gi[n]]) / np.sqrt(vars_[gi[n]] + eps)
            y[n] = gamma * (xh * r + d) + beta
        res = {"y": from_nc(y, layout, s["x"].shape)}
        if "dy" in s:
            dyv = to_nc(s["dy"], layout)
            dx = np.empty_like(v)
            dw, db = np.zeros(C), np.zeros(C)
            for k, g in enumerate(groups):
                sd = np.sqrt(vars_[k] + eps)
                xh = (v[g] - means[k]) / sd
                dyg = dyv[g]
                m = xh.shape[0] * xh.shape[1]
                sdy = dyg.sum((0, 1))
                sdyx = (dyg * xh).sum((0, 1))
                db += sdy
                dw += r * sdyx + d * sdy
                if batch and "mask" in s:
                    # dx_i = Σ_j dy_j ∂y_j/∂x_i with ∂mean/∂x_i = w_i/den and
                    # ∂var/∂x_i = (2 w_i (x_i − mean) − ∂mean/∂x_i · 2 Σ_j w_j (x_j − mean))/den
                    xc = v - means[0]
                    dmean = wv / den
                    dvar = (2 * wv * xc - dmean * 2 * (wv * xc).sum((0, 1))) / den
                    dx[:] = gamma * (dyv / sd - dmean * sdy / sd
                                     - dvar * (dyv * xc).sum((0, 1)) / (2 * sd ** 3))
                elif batch:
                    dx[g] = gamma * r / sd * (dyg - sdy / m - xh * sdyx / m)
                else:
                    dx[g] = gamma * r / sd * dyg
            res["dx"] = from_nc(dx, layout, s["x"].shape)
            if w is not None:
                res["dweight"] = dw
            if b is not None:
                res["dbias"] = db
        if train and rm is not None:
            t += 1
            bm = np.mean(means, 0)
            bv = np.mean(vars_, 0)
            m = counts[0] if "mask" in s else N * P / len(groups)
            if conv == "torch":
                a = 1.0 / t if mom == "none" else float(mom)
                rm = (1 - a) * rm + a * bm
                rv = (1 - a) * rv + a * bv * m / (m - 1)
            elif conv == "tf" and meta.get("zero_debias", "true") == "true":
                dd = float(mom)
                if hidden is None:
                    hidden = [np.zeros(C), np.zeros(C)]
                hidden = [dd * hidden[0] + (1 - dd) * bm, dd * hidden[1] + (1 - dd) * bv]
                rm, rv = hidden[0] / (1 - dd ** t), hidden[1] / (1 - dd ** t)
            elif renorm:
                dd, ra = float(mom), 1 - float(meta["renorm_momentum"])
                rn_mean = rn_mean + ra * (bm - rn_mean)
                rn_sd = rn_sd + ra * (np.sqrt(bv + eps) - rn_sd)
                mv_sd = mv_sd + (1 - dd) * (np.sqrt(bv + eps) - mv_sd)
                rm = dd * rm + (1 - dd) * bm
                rv = np.maximum(mv_sd ** 2 - eps, 0)
                res.update(renorm_mean=rn_mean, renorm_stddev=rn_sd, moving_stddev=mv_sd)
            else:
                dd = float(mom)
                if meta.get("ema_num_updates") == "true":
                    n = t - 1  # updates before this one
                    dd = min(dd, (1 + n) / (10 + n))
                rm = dd * rm + (1 - dd) * bm
                rv = dd * rv + (1 - dd) * bv
        if rm is not None:
            res["running_mean"], res["running_var"] = rm, rv
        out.append(res)
    return out


# --- assembling a case ----------------------------------------------------------------

INDEX = []
ONLY = None  # with --only: the names of the cases to write


def case(name, meta, init, steps, recorded, param_dtype=None, reference="", description=""):
    """recorded: per step, the framework's outputs (dict; empty for the refused step).
    Cross-checks against the model, then writes the file."""
    dtype = meta["dtype"]
    pdt = param_dtype or dtype
    meta = dict(meta, format=FORMAT, reference=reference, description=description)
    if param_dtype:
        meta["param_dtype"] = param_dtype
    want = model(meta, init, steps)
    rtol, atol = float(meta["rtol"]), float(meta["atol"])
    expect = meta.get("expect_error")
    for k, (got, ref) in enumerate(zip(recorded, want)):
        if "error" in ref:
            assert expect == ref["error"] and k == len(steps) - 1 and not got, (name, k, ref)
            continue
        for key, val in got.items():
            g, r = np.asarray(val, np.float64), np.asarray(ref[key], np.float64)
            assert g.shape == r.shape, (name, k, key, g.shape, r.shape)
            bad = np.abs(g - r) > atol + rtol * np.abs(r)
            assert not bad.any(), (name, k, key, np.max(np.abs(g - r)), g[bad][:3], r[bad][:3])
    if expect:
        assert "error" in want[-1], (name, "the model does not refuse the last step")
    else:
        assert len(want) == len(steps) and all("error" not in s for s in want), name
    tensors = {}
    for key, val in init.items():
        tensors[key] = (val, pdt)
    for k, s in enumerate(steps):
        tensors[f"step{k}.x"] = (s["x"], dtype)
        for p in ("weight", "bias"):
            if p in s:
                tensors[f"step{k}.{p}"] = (s[p], pdt)
        if "dy" in s:
            tensors[f"step{k}.dy"] = (s["dy"], dtype)
        if "mask" in s:
            tensors[f"step{k}.mask"] = (np.asarray(s["mask"], np.float64), dtype)
        for key, val in recorded[k].items():
            tensors[f"step{k}.{key}"] = (val, dtype if key in ("y", "dx") else pdt)
    meta["steps"] = ",".join(s["mode"] for s in steps)
    if ONLY is not None and name not in ONLY:
        print(f"{name}: checked, not written (--only)")
        return
    path = os.path.join(CASES, name + ".safetensors")
    write_safetensors(path, tensors, meta)
    entry = {"case": name, "convention": meta["convention"], "layout": meta["layout"],
             "dtype": dtype, "steps": meta["steps"], "variant": meta.get("variant", "batch_norm")}
    for key in ("expect_error", "param_dtype", "single_value", "num_batches_tracked",
                "ema_num_updates"):
        if key in meta:
            entry[key] = meta[key]
    INDEX.append(entry)
    print(f"{name}: {os.path.getsize(path)} bytes")


def save_index():
    path = os.path.join(CASES, "INDEX.json")
    with open(path) as f:
        index = json.load(f)
    names = {e["case"] for e in INDEX}
    index = [e for e in index if e["case"] not in names] + INDEX
    with open(path, "w") as f:
        json.dump(index, f, indent=1)
        f.write("\n")


def rng(seed):
    return np.random.default_rng(seed)


# --- PyTorch ----------------------------------------------------------------------------

def torch_cases():
    import torch

    ref = f"torch {torch.__version__}"

    def run(bn, steps, dtype=torch.float64, x_dtype=None):
        rec = []
        for s in steps:
            if "weight" in s:
                with torch.no_grad():
                    bn.weight.copy_(torch.tensor(s["weight"], dtype=bn.weight.dtype))
                    bn.bias.copy_(torch.tensor(s["bias"], dtype=bn.bias.dtype))
            bn.train(s["mode"] == "train")
            x = torch.tensor(s["x"], dtype=x_dtype or dtype, requires_grad=True)
            try:
                y = bn(x)
            except ValueError as e:
                assert "more than 1 value per channel" in str(e), e
                rec.append({})
                return rec
            out = {"y": y.detach().numpy()}
            if "dy" in s:
                bn.zero_grad()
                y.backward(torch.tensor(s["dy"], dtype=x_dtype or dtype))
                out["dx"] = x.grad.numpy()
                if bn.affine:
                    out["dweight"] = bn.weight.grad.numpy().copy()
                    out["dbias"] = bn.bias.grad.numpy().copy()
            if bn.track_running_stats:
                out["running_mean"] = bn.running_mean.numpy().copy()
                out["running_var"] = bn.running_var.numpy().copy()
            rec.append(out)
        return rec

    def init_of(bn):
        d = {"init.weight": bn.weight.detach().numpy().copy(), "init.bias": bn.bias.detach().numpy().copy()}
        d["init.running_mean"] = bn.running_mean.numpy().copy()
        d["init.running_var"] = bn.running_var.numpy().copy()
        return d

    def loaded(bn, g, C):
        with torch.no_grad():
            bn.weight.copy_(torch.tensor(g.normal(1, 0.3, C)))
            bn.bias.copy_(torch.tensor(g.normal(0, 0.5, C)))
            bn.running_mean.copy_(torch.tensor(g.normal(0, 1, C)))
            bn.running_var.copy_(torch.tensor(g.uniform(0.5, 2, C)))

    base = {"convention": "torch", "eps": "1e-05", "scale": "true", "center": "true",
            "track_running_stats": "true", "variant": "batch_norm"}

    # 1. a loaded num_batches_tracked drives the cumulative average: a = 1/6, 1/7
    g, C = rng(101), 3
    bn = torch.nn.BatchNorm2d(C, momentum=None).double()
    loaded(bn, g, C)
    bn.num_batches_tracked.fill_(5)
    init = init_of(bn)
    steps = [{"mode": m, "x": g.normal(0.5, 2, (4, C, 2, 2)), "dy": g.normal(0, 1, (4, C, 2, 2))}
             for m in ("train", "train", "eval")]
    rec = run(bn, steps)
    case("torch_loaded_num_batches_tracked",
         dict(base, layout="NCHW", dtype="f64", momentum="none", num_batches_tracked="5",
              rtol="1e-10", atol="1e-12"),
         init, steps, rec, reference=ref + " float64",
         description="momentum=None resumed from num_batches_tracked = 5: the new batch weighs 1/6, then 1/7")

    # 2. parameters changed between steps (an SGD step with the recorded gradients)
    g, C = rng(102), 4
    bn = torch.nn.BatchNorm1d(C).double()
    loaded(bn, g, C)
    init = init_of(bn)
    steps, rec = [], []
    wt, bt = init["init.weight"].copy(), init["init.bias"].copy()
    for k, m in enumerate(("train", "train", "train", "eval")):
        s = {"mode": m, "x": g.normal(-1, 1.5, (6, C)), "dy": g.normal(0, 1, (6, C))}
        if k > 0:
            s["weight"], s["bias"] = wt, bt
        steps.append(s)
        out = run(bn, [s])[0]
        rec.append(out)
        wt = wt - 0.5 * out["dweight"]
        bt = bt - 0.5 * out["dbias"]
    case("torch_params_change",
         dict(base, layout="NC", dtype="f64", momentum="0.1", rtol="1e-10", atol="1e-12"),
         init, steps, rec, reference=ref + " float64",
         description="gamma and beta change between steps (SGD, lr 0.5, on the recorded gradients)")

    # 3. mixed precision: f16 x, f32 parameters and statistics (PyTorch's CPU mixed kernel)
    g, C = rng(103), 3
    bn = torch.nn.BatchNorm2d(C)
    loaded(bn, g, C)
    init = {k: v.astype(np.float32) for k, v in init_of(bn).items()}
    steps = [{"mode": m, "x": g.normal(1, 2, (4, C, 3, 3)).astype(np.float16),
              "dy": g.normal(0, 1, (4, C, 3, 3)).astype(np.float16)}
             for m in ("train", "train", "eval")]
    rec = run(bn, steps, dtype=torch.float32, x_dtype=torch.float16)
    case("torch_mixed_f16",
         dict(base, layout="NCHW", dtype="f16", momentum="0.1", rtol="2e-3", atol="2e-3"),
         init, steps, rec, param_dtype="f32", reference=ref + " float16 input, float32 module",
         description="16-bit x, y, dy, dx with f32 parameters and running statistics")

    # 4. an error case that records the steps before the refused one
    g, C = rng(104), 3
    bn = torch.nn.BatchNorm1d(C).double()
    loaded(bn, g, C)
    init = init_of(bn)
    steps = [{"mode": "train", "x": g.normal(0, 1, (5, C)), "dy": g.normal(0, 1, (5, C))},
             {"mode": "train", "x": g.normal(0, 1, (1, C))}]
    rec = run(bn, steps)
    case("error_torch_single_value_after_a_step",
         dict(base, layout="NC", dtype="f64", momentum="0.1", rtol="1e-10", atol="1e-12",
              expect_error="batch_too_small"),
         init, steps, rec, reference=ref + " float64",
         description="a good training step (compared), then one value per channel: PyTorch refuses")


# --- Keras 3, tf_keras, TensorFlow ----------------------------------------------------

def keras_cases():
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import keras
    import tf_keras

    ref3 = f"keras {keras.__version__} (TensorFlow {tf.__version__})"
    reftk = f"tf_keras {tf_keras.__version__} (TensorFlow {tf.__version__})"

    def run(bn, steps, x_dtype, renorm=False):
        rec = []
        for s in steps:
            x = tf.Variable(tf.constant(s["x"], dtype=x_dtype))
            with tf.GradientTape() as tape:
                if "mask" in s:
                    y = bn(x, training=s["mode"] == "train", mask=tf.constant(s["mask"]))
                else:
                    y = bn(x, training=s["mode"] == "train")
                loss = tf.reduce_sum(y * tf.constant(s["dy"], y.dtype))
            vs = [x] + ([bn.gamma] if bn.scale else []) + ([bn.beta] if bn.center else [])
            grads = tape.gradient(loss, vs)
            out = {"y": np.asarray(y), "dx": np.asarray(grads[0])}
            i = 1
            if bn.scale:
                out["dweight"] = np.asarray(grads[i]).reshape(-1)
                i += 1
            if bn.center:
                out["dbias"] = np.asarray(grads[i]).reshape(-1)
            out["running_mean"] = np.asarray(bn.moving_mean).reshape(-1)
            out["running_var"] = np.asarray(bn.moving_variance).reshape(-1)
            if renorm and s["mode"] == "train":
                out["renorm_mean"] = np.asarray(bn.renorm_mean).reshape(-1)
                out["renorm_stddev"] = np.asarray(bn.renorm_stddev).reshape(-1)
                out["moving_stddev"] = np.asarray(bn.moving_stddev).reshape(-1)
            rec.append(out)
        return rec

    def load(bn, g, C, dtype=np.float64):
        vals = {"init.weight": g.normal(1, 0.3, C), "init.bias": g.normal(0, 0.5, C),
                "init.running_mean": g.normal(0, 1, C), "init.running_var": g.uniform(0.5, 2, C)}
        vals = {k: v.astype(dtype) for k, v in vals.items()}
        # (tf_keras's ghost batches keep the variables as [1, 1, C])
        bn.gamma.assign(vals["init.weight"].reshape(bn.gamma.shape))
        bn.beta.assign(vals["init.bias"].reshape(bn.beta.shape))
        bn.moving_mean.assign(vals["init.running_mean"].reshape(bn.moving_mean.shape))
        bn.moving_variance.assign(vals["init.running_var"].reshape(bn.moving_variance.shape))
        return vals

    base = {"convention": "keras", "eps": "0.001", "scale": "true", "center": "true",
            "track_running_stats": "true", "variant": "batch_norm"}

    # 5. Keras 3 with one value per channel: y = beta, dx = 0, moving variance toward 0
    g, C = rng(201), 3
    bn = keras.layers.BatchNormalization(momentum=0.9, dtype="float64")
    bn.build((None, C))
    init = load(bn, g, C)
    steps = [{"mode": "train", "x": g.normal(0, 2, (1, C)), "dy": g.normal(0, 1, (1, C))},
             {"mode": "train", "x": g.normal(0, 2, (4, C)), "dy": g.normal(0, 1, (4, C))},
             {"mode": "train", "x": g.normal(0, 2, (1, C)), "dy": g.normal(0, 1, (1, C))},
             {"mode": "eval", "x": g.normal(0, 2, (2, C)), "dy": g.normal(0, 1, (2, C))}]
    rec = run(bn, steps, tf.float64)
    assert np.all(rec[0]["dx"] == 0) and np.allclose(rec[0]["y"], init["init.bias"])
    case("keras_single_value",
         dict(base, layout="NC", dtype="f64", momentum="0.9", rtol="1e-10", atol="1e-12"),
         init, steps, rec, reference=ref3 + " float64",
         description="one value per channel in training is accepted: y = beta, dx = 0, "
                     "the moving variance decays toward 0")

    # tf_keras rounds 1 - momentum to float32 whatever the variables' dtype: its cases use
    # momenta that float32 holds exactly (0.875, 0.75).

    # 9, 10. Keras 3 masked batch norm: padded channels-last sequences (mask [N, L]) and
    # channels-first sequences (axis=1: Keras's mask is then [N, C], x's shape without its
    # last axis)
    g, C, L = rng(205), 2, 5
    bn = keras.layers.BatchNormalization(momentum=0.9, dtype="float64")
    bn.build((None, L, C))
    init = load(bn, g, C)
    lengths = [[5, 2, 3], [1, 4, 5], [3, 3, 2]]
    steps = [{"mode": m, "x": g.normal(0.5, 2, (3, L, C)), "dy": g.normal(0, 1, (3, L, C)),
              "mask": np.arange(L)[None, :] < np.array(n)[:, None]}
             for m, n in zip(("train", "train", "eval"), lengths)]
    rec = run(bn, steps, tf.float64)
    case("keras_masked_nlc",
         dict(base, layout="NLC", dtype="f64", momentum="0.9", rtol="1e-10", atol="1e-12"),
         init, steps, rec, reference=ref3 + " float64",
         description="mask=[N, L] (padded sequences): statistics, moving update and "
                     "gradient over the unmasked steps; the eval step ignores the mask")
    g, C, L = rng(206), 3, 4
    bn = keras.layers.BatchNormalization(axis=1, momentum=0.9, dtype="float64")
    bn.build((None, C, L))
    init = load(bn, g, C)
    masks = [[[1, 0, 1], [1, 1, 0], [0, 1, 1], [1, 1, 1]],
             [[1, 1, 1], [0, 0, 1], [1, 0, 1], [1, 1, 0]]]
    steps = [{"mode": "train", "x": g.normal(-1, 1.5, (4, C, L)),
              "dy": g.normal(0, 1, (4, C, L)), "mask": np.array(mk, bool)} for mk in masks]
    rec = run(bn, steps, tf.float64)
    case("keras_masked_ncl",
         dict(base, layout="NCL", dtype="f64", momentum="0.9", rtol="1e-10", atol="1e-12"),
         init, steps, rec, reference=ref3 + " float64",
         description="axis=1 with mask=[N, C]: each (sample, channel) row in or out")

    # 11. TensorFlow's low-level recipe in graph mode with one value per channel:
    # tf.nn.moments (variance 0), assign_moving_average (zero-debiased), beta only
    from tensorflow.python.training import moving_averages

    g, C, decay, eps = rng(207), 3, 0.875, 1e-3  # (1 - decay is rounded to float32)
    init = {"init.bias": g.normal(0, 0.5, C), "init.running_mean": g.normal(0, 1, C),
            "init.running_var": g.uniform(0.5, 2, C)}
    tf1 = tf.compat.v1
    steps = [{"mode": "train", "x": g.normal(0, 2, (1, C)), "dy": g.normal(0, 1, (1, C))},
             {"mode": "train", "x": g.normal(0, 2, (3, C)), "dy": g.normal(0, 1, (3, C))},
             {"mode": "train", "x": g.normal(0, 2, (1, C)), "dy": g.normal(0, 1, (1, C))},
             {"mode": "eval", "x": g.normal(0, 2, (2, C)), "dy": g.normal(0, 1, (2, C))}]
    with tf.Graph().as_default():
        xph = tf1.placeholder(tf.float64, (None, C))
        dyph = tf1.placeholder(tf.float64, (None, C))
        beta = tf1.Variable(init["init.bias"])
        mm = tf1.Variable(init["init.running_mean"], trainable=False)
        mv = tf1.Variable(init["init.running_var"], trainable=False)
        mean, var = tf.nn.moments(xph, axes=[0])
        y = tf.nn.batch_normalization(xph, mean, var, beta, None, eps)
        dx, db = tf.gradients(tf.reduce_sum(y * dyph), [xph, beta])
        with tf.control_dependencies([y, dx, db]):
            upd = [moving_averages.assign_moving_average(mm, mean, decay),
                   moving_averages.assign_moving_average(mv, var, decay)]
        ye = tf.nn.batch_normalization(xph, mm, mv, beta, None, eps)
        dxe, dbe = tf.gradients(tf.reduce_sum(ye * dyph), [xph, beta])
        with tf1.Session() as sess:
            sess.run(tf1.global_variables_initializer())
            rec = []
            for s in steps:
                feed = {xph: s["x"], dyph: s["dy"]}
                if s["mode"] == "train":
                    yv, dxv, dbv, _ = sess.run([y, dx, db, upd], feed)
                else:
                    yv, dxv, dbv = sess.run([ye, dxe, dbe], feed)
                rm, rv = sess.run([mm, mv])
                rec.append({"y": yv, "dx": dxv, "dbias": dbv, "running_mean": rm,
                            "running_var": rv})
    assert np.all(rec[0]["dx"] == 0)
    case("tf_recipe_single_value",
         {"convention": "tf", "eps": "0.001", "scale": "false", "center": "true",
          "track_running_stats": "true", "variant": "batch_norm", "zero_debias": "true",
          "layout": "NC", "dtype": "f64", "momentum": "0.875", "rtol": "1e-10", "atol": "1e-12"},
         init, steps, rec, reference=f"TensorFlow {tf.__version__} graph mode float64",
         description="tf.nn.moments of one value per channel (variance 0): y = beta, dx = 0; "
                     "zero-debiased moving averages")

    # 12, 13. tf.train.ExponentialMovingAverage(decay, num_updates=step) in graph mode: the
    # running statistics are the EMA's shadows of two variables that hold each step's
    # batch moments (a variable's shadow starts at its initial value, without
    # zero-debiasing); `step` counts the updates before the current one
    for name, n0, seed in (("tf_ema_num_updates", 0, 208), ("tf_ema_num_updates_cap", 60, 209)):
        g, C, decay, eps = rng(seed), 3, 0.875, 1e-3
        init = {"init.weight": g.normal(1, 0.3, C), "init.bias": g.normal(0, 0.5, C),
                "init.running_mean": g.normal(0, 1, C), "init.running_var": g.uniform(0.5, 2, C)}
        steps = [{"mode": m, "x": g.normal(0.5, 2, (4, C)), "dy": g.normal(0, 1, (4, C))}
                 for m in ("train",) * 4 + ("eval",)]
        with tf.Graph().as_default():
            xph = tf1.placeholder(tf.float64, (None, C))
            dyph = tf1.placeholder(tf.float64, (None, C))
            gamma = tf1.Variable(init["init.weight"])
            beta = tf1.Variable(init["init.bias"])
            step = tf1.Variable(n0, dtype=tf.int64, trainable=False)
            bm = tf1.Variable(init["init.running_mean"], trainable=False)
            bv = tf1.Variable(init["init.running_var"], trainable=False)
            ema = tf1.train.ExponentialMovingAverage(decay, num_updates=step)
            apply = ema.apply([bm, bv])
            mm, mv = ema.average(bm), ema.average(bv)
            mean, var = tf.nn.moments(xph, axes=[0])
            y = tf.nn.batch_normalization(xph, mean, var, beta, gamma, eps)
            dx, dg, db = tf.gradients(tf.reduce_sum(y * dyph), [xph, gamma, beta])
            hold = [bm.assign(mean), bv.assign(var)]
            inc = step.assign_add(1)
            ye = tf.nn.batch_normalization(xph, mm, mv, beta, gamma, eps)
            dxe, dge, dbe = tf.gradients(tf.reduce_sum(ye * dyph), [xph, gamma, beta])
            with tf1.Session() as sess:
                sess.run(tf1.global_variables_initializer())
                rec = []
                for s in steps:
                    feed = {xph: s["x"], dyph: s["dy"]}
                    if s["mode"] == "train":
                        # one run per stage: the moments, then the average, then the counter
                        yv, dxv, dgv, dbv, _ = sess.run([y, dx, dg, db, hold], feed)
                        sess.run(apply)
                        sess.run(inc)
                    else:
                        yv, dxv, dgv, dbv = sess.run([ye, dxe, dge, dbe], feed)
                    rm, rv = sess.run([mm, mv])
                    rec.append({"y": yv, "dx": dxv, "dweight": dgv, "dbias": dbv,
                                "running_mean": rm, "running_var": rv})
        meta = {"convention": "tf", "eps": "0.001", "scale": "true", "center": "true",
                "track_running_stats": "true", "variant": "batch_norm", "zero_debias": "false",
                "ema_num_updates": "true", "layout": "NC", "dtype": "f64", "momentum": "0.875",
                "rtol": "1e-6", "atol": "1e-6"}
        if n0:
            meta["num_batches_tracked"] = str(n0)
        case(name, meta, init, steps, rec,
             reference=f"TensorFlow {tf.__version__} graph mode float64 (the decay in float32)",
             description=f"ExponentialMovingAverage(0.875, num_updates=step) from step {n0}: "
                         f"decay min(0.875, (1 + n)/(10 + n)) for n = {n0}..{n0 + 3}; "
                         "TensorFlow rounds the decay to float32, hence the tolerance")

    # 6. tf_keras virtual_batch_size=1 on NC input: every ghost group holds one value
    g, C = rng(202), 3
    bn = tf_keras.layers.BatchNormalization(momentum=0.875, virtual_batch_size=1, dtype="float64")
    bn.build((None, C))
    init = load(bn, g, C)
    steps = [{"mode": m, "x": g.normal(1, 2, (4, C)), "dy": g.normal(0, 1, (4, C))}
             for m in ("train", "train", "eval")]
    rec = run(bn, steps, tf.float64)
    for r in rec:  # tf_keras keeps the ghost axis on the gradients of gamma and beta
        r["dweight"], r["dbias"] = r["dweight"].reshape(-1), r["dbias"].reshape(-1)
    assert np.all(rec[0]["dx"] == 0)
    case("ghost_groups_of_one",
         dict(base, layout="NC", dtype="f64", momentum="0.875", variant="ghost",
              virtual_batch_size="1", ghost_grouping="strided", rtol="1e-10", atol="1e-12"),
         init, steps, rec, reference=reftk + " float64",
         description="virtual_batch_size=1 on NC input: groups of one value, y = beta, dx = 0")

    # 7. tf_keras renorm whose renorm state does not start from the running statistics
    g, C = rng(203), 3
    bn = tf_keras.layers.BatchNormalization(
        momentum=0.875, renorm=True, renorm_momentum=0.75,
        renorm_clipping={"rmax": 1.5, "rmin": 0.5, "dmax": 0.7})  # float32 only
    bn.build((None, C))
    init = load(bn, g, C, np.float32)
    extra = {"init.renorm_mean": g.normal(0, 1, C), "init.renorm_stddev": g.uniform(0.5, 2, C),
             "init.moving_stddev": g.uniform(0.5, 2, C)}
    extra = {k: v.astype(np.float32) for k, v in extra.items()}
    bn.renorm_mean.assign(extra["init.renorm_mean"])
    bn.renorm_stddev.assign(extra["init.renorm_stddev"])
    bn.moving_stddev.assign(extra["init.moving_stddev"])
    init.update(extra)
    steps = [{"mode": m, "x": g.normal(0.5, 1.5, (6, C)).astype(np.float32),
              "dy": g.normal(0, 1, (6, C)).astype(np.float32)}
             for m in ("train", "train", "eval")]
    rec = run(bn, steps, tf.float32, renorm=True)
    case("renorm_loaded_state",
         dict(base, layout="NC", dtype="f32", momentum="0.875", variant="batch_renorm",
              rmax="1.5", rmin="0.5", dmax="0.7", renorm_momentum="0.75",
              rtol="2e-5", atol="2e-6"),
         init, steps, rec, reference=reftk + " float32",
         description="renorm_mean, renorm_stddev and moving_stddev loaded apart from the "
                     "running statistics; the limits bind")

    # 9. tf_keras renorm of ghost batches (renorm=True, virtual_batch_size=2): each strided
    # group normalized with its own moments, one r and d per channel from their averages
    g, C = rng(205), 3
    bn = tf_keras.layers.BatchNormalization(
        momentum=0.875, renorm=True, renorm_momentum=0.75, virtual_batch_size=2,
        renorm_clipping={"rmax": 1.25, "rmin": 0.8, "dmax": 0.3})  # float32 only
    bn.build((None, 2, 2, C))
    init = load(bn, g, C, np.float32)
    # renorm stddev below the groups' and renorm mean away from theirs: the limits bind
    extra = {"init.renorm_mean": g.normal(-0.5, 0.3, C), "init.renorm_stddev": g.uniform(0.6, 1, C),
             "init.moving_stddev": g.uniform(0.8, 1.5, C)}
    extra = {k: v.astype(np.float32) for k, v in extra.items()}
    bn.renorm_mean.assign(extra["init.renorm_mean"].reshape(bn.renorm_mean.shape))
    bn.renorm_stddev.assign(extra["init.renorm_stddev"].reshape(bn.renorm_stddev.shape))
    bn.moving_stddev.assign(extra["init.moving_stddev"].reshape(bn.moving_stddev.shape))
    init.update(extra)
    steps = [{"mode": m, "x": g.normal(0.5, 2, (6, 2, 2, C)).astype(np.float32),
              "dy": g.normal(0, 1, (6, 2, 2, C)).astype(np.float32)}
             for m in ("train", "train", "train", "eval")]
    rec = run(bn, steps, tf.float32, renorm=True)
    # the clipping binds in the first step: unclipped r or d beyond a limit in some channel
    v = steps[0]["x"].astype(np.float64).reshape(6, -1, C)
    grp = [v[np.arange(6) % 3 == k].reshape(-1, C) for k in range(3)]
    bm, bv = np.mean([q.mean(0) for q in grp], 0), np.mean([q.var(0) for q in grp], 0)
    sr = np.maximum(extra["init.renorm_stddev"], np.sqrt(1e-3))
    r0, d0 = np.sqrt(bv + 1e-3) / sr, (bm - extra["init.renorm_mean"]) / sr
    assert np.any((r0 > 1.25) | (r0 < 0.8) | (np.abs(d0) > 0.3)), (r0, d0)
    case("ghost_renorm_nhwc",
         dict(base, layout="NHWC", dtype="f32", momentum="0.875", variant="ghost_renorm",
              virtual_batch_size="2", ghost_grouping="strided", rmax="1.25", rmin="0.8",
              dmax="0.3", renorm_momentum="0.75", rtol="2e-5", atol="2e-6"),
         init, steps, rec, reference=reftk + " float32",
         description="renorm=True with virtual_batch_size=2: strided groups normalized with "
                     "their own moments, r and d from the averages over groups; the limits "
                     "bind; renorm and moving statistics updated once per step")

    # 8. Keras 3 mixed precision: f16 x and y, f32 variables
    g, C = rng(204), 3
    bn = keras.layers.BatchNormalization(momentum=0.9, dtype="mixed_float16")
    bn.build((None, 2, 2, C))
    init = load(bn, g, C, np.float32)
    steps = [{"mode": m, "x": g.normal(1, 2, (3, 2, 2, C)).astype(np.float16),
              "dy": g.normal(0, 1, (3, 2, 2, C)).astype(np.float16)}
             for m in ("train", "train", "eval")]
    rec = run(bn, steps, tf.float16)
    for r in rec:
        r["y"] = r["y"].astype(np.float16)
        r["dx"] = r["dx"].astype(np.float16)
    case("keras_mixed_f16",
         dict(base, layout="NHWC", dtype="f16", momentum="0.9", rtol="2e-3", atol="2e-3"),
         init, steps, rec, param_dtype="f32", reference=ref3 + " mixed_float16",
         description="16-bit x, y, dy, dx with f32 parameters and moving statistics")


if __name__ == "__main__":
    args = sys.argv[1:]
    if "--only" in args:
        i = args.index("--only")
        ONLY = set(args[i + 1].split(","))
        del args[i:i + 2]
    which = args or ["torch"]
    for w in which:
        {"torch": torch_cases, "keras": keras_cases}[w]()
    if ONLY is not None and ONLY - {e["case"] for e in INDEX}:
        sys.exit(f"--only: no such case {sorted(ONLY - {e['case'] for e in INDEX})}")
    save_index()
