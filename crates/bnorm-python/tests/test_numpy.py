"""The NumPy API against a float64 formula written here from conformance/FORMAT.md, its
settings and conventions, and bad input (which raises bnorm.Error and changes nothing)."""

import ml_dtypes
import numpy as np
import pytest

import bnorm

DTYPES = [np.float64, np.float32, np.float16, ml_dtypes.bfloat16]


def unit_roundoff(dtype):
    return {np.float64: 2.0**-53, np.float32: 2.0**-24, np.float16: 2.0**-11}.get(dtype, 2.0**-8)


def reference(x, dy, gamma, beta, eps, axes):
    """Training forward and backward in float64, straight from the formulas."""
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    mean = x.mean(axis=axes, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
    xhat = (x - mean) / np.sqrt(var + eps)
    y = gamma * xhat + beta
    dbeta = dy.sum(axis=axes)
    dgamma = (dy * xhat).sum(axis=axes)
    dx = gamma / np.sqrt(var + eps) * (
        dy - dy.mean(axis=axes, keepdims=True) - xhat * (dy * xhat).mean(axis=axes, keepdims=True)
    )
    return y, dx, dgamma.ravel(), dbeta.ravel(), mean.ravel(), var.ravel()


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout,shape,axes,bshape", [
    ("NC", (32, 3), (0,), (1, 3)),
    ("NCHW", (4, 3, 5, 6), (0, 2, 3), (1, 3, 1, 1)),
    ("NHWC", (4, 5, 6, 3), (0, 1, 2), (1, 1, 1, 3)),
    ("NCDHW", (2, 3, 2, 4, 5), (0, 2, 3, 4), (1, 3, 1, 1, 1)),
])
def test_training_step_matches_the_formula(dtype, layout, shape, axes, bshape):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) * 3 + 1).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    gamma, beta = np.array([0.5, 1.0, 2.0]), np.array([-1.0, 0.0, 0.25])
    bn = bnorm.BatchNorm(3, layout=layout)
    bn.weight, bn.bias = gamma, beta
    y = bn.forward(x, "train")
    dx, dgamma, dbeta = bn.backward(dy)
    ry, rdx, rdg, rdb, mean, var = reference(
        x, dy, gamma.reshape(bshape), beta.reshape(bshape), 1e-5, axes)
    assert y.dtype == x.dtype and dx.dtype == x.dtype and y.shape == x.shape
    # Outputs are O(1) and rounded once to the storage type: a few unit roundoffs
    # (f32: the map runs in f32, ~10 roundings; 16-bit: one rounding of an f32 value).
    u = unit_roundoff(dtype)
    tol = max(16 * u, 1e-12)
    np.testing.assert_allclose(y.astype(np.float64), ry, rtol=tol, atol=tol * 2)
    np.testing.assert_allclose(dx.astype(np.float64), rdx, rtol=tol, atol=tol * 4)
    # Parameter gradients are f64 sums over m terms of rounded inputs.
    m = x.size // 3
    np.testing.assert_allclose(dgamma, rdg, rtol=tol, atol=tol * m)
    np.testing.assert_allclose(dbeta, rdb, rtol=tol, atol=tol * m)
    # PyTorch's running update with momentum 0.1 and the unbiased variance, in f64.
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var * m / (m - 1), rtol=1e-12)
    assert bn.num_batches_tracked == 1


def test_inference_and_frozen_use_running_statistics():
    rng = np.random.default_rng(2)
    bn = bnorm.BatchNorm(2, layout="NC", eps=1e-3)
    bn.running_mean = np.array([1.0, -2.0])
    bn.running_var = np.array([4.0, 0.25])
    bn.weight = np.array([2.0, 3.0])
    x = rng.standard_normal((8, 2))
    want = (x - bn.running_mean) / np.sqrt(bn.running_var + 1e-3) * bn.weight
    for mode in ("inference", "frozen"):
        y = bn.forward(x, mode)
        np.testing.assert_allclose(y, want, rtol=1e-14, atol=1e-14)
        dy = rng.standard_normal((8, 2))
        dx, dgamma, dbeta = bn.backward(dy)
        np.testing.assert_allclose(dx, dy * bn.weight / np.sqrt(bn.running_var + 1e-3), rtol=1e-14)
        np.testing.assert_allclose(dbeta, dy.sum(0), rtol=1e-13)
        assert bn.num_batches_tracked == 0
        np.testing.assert_array_equal(bn.running_mean, [1.0, -2.0])


def test_conventions_and_settings():
    x = np.array([[1.0], [2.0], [3.0], [6.0]])
    keras = bnorm.BatchNorm(1, "keras", layout="NC")  # decay 0.99, biased variance
    keras.forward(x)
    np.testing.assert_allclose(keras.running_mean, [0.01 * 3.0], rtol=1e-15)
    np.testing.assert_allclose(keras.running_var, [0.99 + 0.01 * 3.5], rtol=1e-15)
    cumulative = bnorm.BatchNorm(1, layout="NC", momentum=None)
    cumulative.forward(x)
    cumulative.forward(x + 2)
    np.testing.assert_allclose(cumulative.running_mean, [(3.0 + 5.0) / 2], rtol=1e-15)
    tf = bnorm.BatchNorm(1, "tensorflow", layout="NC")
    assert tf.weight is None and tf.bias is not None  # beta but no gamma
    plain = bnorm.BatchNorm(1, layout="NC", affine=False, track_running_stats=False)
    assert plain.weight is None and plain.running_mean is None
    y = plain.forward(x, "inference")  # no running statistics: the batch's
    np.testing.assert_allclose(y.mean(), 0.0, atol=1e-15)


def test_non_contiguous_input_is_accepted():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 4, 3, 3)).astype(np.float32)
    a, b = bnorm.BatchNorm(4), bnorm.BatchNorm(4)
    ya = a.forward(x)
    yb = b.forward(x.transpose(0, 1, 3, 2).copy().transpose(0, 1, 3, 2))  # same values, F-order inner
    np.testing.assert_array_equal(ya, yb)


def test_threads_do_not_change_results():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((64, 8, 32, 32)).astype(np.float32)  # above the parallel threshold
    outs = []
    for n in (1, 2):
        bnorm.set_num_threads(n)
        assert bnorm.get_num_threads() == n
        bn = bnorm.BatchNorm(8)
        outs.append((bn.forward(x), bn.running_var))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def snapshot(bn):
    v = lambda a: None if a is None else a.tolist()
    return v(bn.weight), v(bn.bias), v(bn.running_mean), v(bn.running_var), bn.num_batches_tracked


def test_bad_input_raises_and_changes_nothing():
    rng = np.random.default_rng(5)
    bn = bnorm.BatchNorm(3)
    x = rng.standard_normal((4, 3, 2, 2))
    y = bn.forward(x)
    before = snapshot(bn)
    bad = [
        (lambda: bn.forward(rng.standard_normal((4, 5, 2, 2))), "ChannelMismatch"),
        (lambda: bn.forward(rng.standard_normal((4, 3, 2))), "RankMismatch"),
        (lambda: bn.forward(rng.standard_normal((1, 3, 1, 1))), "BatchTooSmall"),
        (lambda: bn.forward(np.ones((4, 3, 2, 2), dtype=np.int32)), "DType"),
        (lambda: bn.forward(x, "training"), "InvalidConfig"),
        (lambda: bn.backward(np.ones((4, 3, 2, 2), dtype=np.float32)), "DType"),
        (lambda: setattr(bn, "weight", np.array([1.0, np.nan, 1.0])), "NonFiniteParameter"),
        (lambda: setattr(bn, "bias", np.zeros(4)), "ShapeMismatch"),
        (lambda: setattr(bn, "running_var", np.array([1.0, -1.0, 1.0])), "NegativeVariance"),
    ]
    for call, kind in bad:
        with pytest.raises(bnorm.Error) as err:
            call()
        assert err.value.kind == kind, (kind, err.value)
        assert isinstance(err.value, ValueError)
        assert snapshot(bn) == before
    # backward still differentiates the last successful forward
    dx, _, _ = bn.backward(np.ones_like(y))
    np.testing.assert_allclose(dx.sum(axis=(0, 2, 3)), 0.0, atol=1e-12)


def test_bad_construction():
    with pytest.raises(bnorm.Error) as err:
        bnorm.BatchNorm(3, eps=-1.0)
    assert err.value.kind == "InvalidConfig"
    with pytest.raises(bnorm.Error):
        bnorm.BatchNorm(3, "caffe")
    with pytest.raises(TypeError):
        bnorm.BatchNorm(3, epsilon=1e-3)
    with pytest.raises(bnorm.Error) as err:
        bnorm.BatchNorm(3).backward(np.ones((2, 3, 1, 1)))
    assert err.value.kind == "NoForward"


def test_non_finite_batch_statistics_warn_and_keep_running_statistics():
    x = np.random.default_rng(6).standard_normal((8, 2))
    x[3, 1] = np.nan
    bn = bnorm.BatchNorm(2, layout="NC")
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        y = bn.forward(x)
    assert np.isnan(y[:, 1]).all() and np.isfinite(y[:, 0]).all()
    assert bn.running_mean[1] == 0.0 and bn.running_var[1] == 1.0
    assert bn.running_mean[0] != 0.0


def test_the_gil_is_released_while_kernels_run():
    """While one thread runs a long forward, another thread keeps running Python: the
    largest pause it sees is well below the forward's duration (with the GIL held it
    would see a pause at least as long as one kernel, every time)."""
    import threading
    import time

    bnorm.set_num_threads(1)
    bn = bnorm.BatchNorm(16)

    def batch(h):
        return np.random.default_rng(7).standard_normal((64, 16, h, 128)).astype(np.float32)

    def fastest_of_three(x):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            bn.forward(x)
            times.append(time.perf_counter() - t)
        return min(times)

    # An input whose forward takes at least 60 ms on one thread, judged by the fastest of
    # three calls (one call can be slowed by a busy machine and mislead the choice): long
    # beside the interpreter's 5 ms switch interval, whatever the machine's speed.
    h, largest_h = 64, 1024  # 32 MB .. 512 MB of float32 input
    x = batch(h)
    bn.forward(x)  # one-time costs
    while fastest_of_three(x) < 0.06 and h < largest_h:
        h *= 2
        x = batch(h)
    span = {}

    def work():
        t = time.perf_counter()
        for _ in range(3):
            bn.forward(x)
        span["kernel"] = (time.perf_counter() - t) / 3

    def largest_pause():
        stamps = []
        worker = threading.Thread(target=work)
        worker.start()
        while worker.is_alive():
            stamps.append(time.perf_counter())
        worker.join()
        return np.diff(stamps).max()

    # With the GIL held every attempt would pause at least one kernel's duration. A busy
    # 2-core machine may deschedule this thread for a while, or speed the kernel up or
    # slow it down between minutes: up to five attempts, and an attempt whose kernels ran
    # shorter than 20 ms tells nothing (the input grows for the next one).
    tries = []
    for _ in range(5):
        pause = largest_pause()
        tries.append((pause, span["kernel"]))
        if span["kernel"] > 0.02 and pause < span["kernel"] / 2:
            break
        if span["kernel"] < 0.04 and h < largest_h:
            h *= 2
            x = batch(h)
    bnorm.set_num_threads(0)
    assert any(k > 0.02 and p < k / 2 for p, k in tries), tries


@pytest.mark.parametrize("layout,shape", [("NC", (1, 3)), ("NCHW", (1, 3, 1, 1)),
                                          ("NHWC", (1, 1, 1, 3))])
def test_one_value_per_channel_keras_accepts_torch_refuses(layout, shape):
    """FORMAT.md, "Single values": Keras (and TensorFlow) normalize one value per channel
    with variance 0 -- y = beta, dx = 0, dweight = 0, dbias = dy, running variance
    toward 0 --; PyTorch refuses the step. `single_value` overrides the preset."""
    rng = np.random.default_rng(11)
    x = rng.standard_normal(shape)
    dy = rng.standard_normal(shape)
    gamma, beta = np.array([2.0, 3.0, 4.0]), np.array([0.5, -1.0, 2.0])
    for convention in ("keras", "tensorflow"):
        bn = bnorm.BatchNorm(3, convention, layout=layout, scale=True)  # tf: no scale
        bn.weight, bn.bias = gamma, beta
        y = bn.forward(x, "train")
        np.testing.assert_array_equal(y.reshape(3), beta)
        dx, dw, db = bn.backward(dy)
        np.testing.assert_array_equal(dx, np.zeros(shape))
        np.testing.assert_array_equal(dw, np.zeros(3))
        np.testing.assert_array_equal(db, dy.reshape(3))
        if convention == "keras":  # decay 0.99 from mean 0, variance 1
            np.testing.assert_allclose(bn.running_mean, 0.01 * x.reshape(3), rtol=1e-12)
            np.testing.assert_allclose(bn.running_var, np.full(3, 0.99), rtol=1e-12)
    refusing = [("torch", {}), ("keras", {"single_value": "refuse"}),
                # accepted, but torch's unbiased running variance of one value is 0/0
                ("torch", {"single_value": "accept"})]
    for convention, settings in refusing:
        bn = bnorm.BatchNorm(3, convention, layout=layout, **settings)
        bn.forward(rng.standard_normal((4,) + shape[1:]), "train")
        before = snapshot(bn)
        with pytest.raises(bnorm.Error) as err:
            bn.forward(x, "train")
        assert err.value.kind == "BatchTooSmall", (convention, settings)
        assert snapshot(bn) == before
        bn.forward(x, "inference")  # running statistics: one value is fine
    bn = bnorm.BatchNorm(3, "torch", layout=layout, single_value="accept",
                         track_running_stats=False)
    bn.bias = beta
    np.testing.assert_array_equal(bn.forward(x, "train").reshape(3), beta)
    with pytest.raises(bnorm.Error) as err:
        bnorm.BatchNorm(3, "keras", single_value="sometimes")
    assert err.value.kind == "InvalidConfig"


def masked_reference(x, mask, gamma, beta, eps):
    """Keras 3's masked batch norm on NLC data in float64 (FORMAT.md, "Masks")."""
    m = mask[..., None].astype(np.float64)
    n = m.sum(axis=(0, 1)) + 1e-7
    mean = (x * m).sum(axis=(0, 1)) / n
    var = (((x - mean) ** 2) * m).sum(axis=(0, 1)) / n
    return gamma * (x - mean) / np.sqrt(var + eps) + beta, mean, var


def test_masked_forward_and_backward():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((3, 5, 2))
    dy = rng.standard_normal(x.shape)
    mask = rng.random((3, 5)) < 0.6
    mask[0, 0] = True
    gamma, beta, eps = np.array([1.5, 0.5]), np.array([0.1, -0.2]), 1e-3
    bn = bnorm.BatchNorm(2, "keras", layout="NLC", eps=eps, momentum=0.9)
    bn.weight, bn.bias = gamma, beta
    y = bn.forward(x, "train", mask=mask)
    want, mean, var = masked_reference(x, mask, gamma, beta, eps)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_mean, 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, 0.9 + 0.1 * var, rtol=1e-12)
    # backward after the masked forward: the derivative of the masked map, by central
    # differences of sum(dy * y) (the reference is the formula above, not bnorm)
    dx, dw, db = bn.backward(dy)
    h, num = 1e-6, np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp, xm = x.copy(), x.copy()
        xp[i] += h
        xm[i] -= h
        num[i] = ((dy * masked_reference(xp, mask, gamma, beta, eps)[0]).sum()
                  - (dy * masked_reference(xm, mask, gamma, beta, eps)[0]).sum()) / (2 * h)
    np.testing.assert_allclose(dx, num, rtol=1e-6, atol=1e-8)
    xhat = (x - mean) / np.sqrt(var + eps)
    np.testing.assert_allclose(dw, (dy * xhat).sum(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(db, dy.sum(axis=(0, 1)), rtol=1e-12)
    # values left out do not move the statistics
    x2 = np.where(mask[..., None], x, 1e3)
    bn2 = bnorm.BatchNorm(2, "keras", layout="NLC", eps=eps, momentum=0.9)
    bn2.weight, bn2.bias = gamma, beta
    y2 = bn2.forward(x2, "train", mask=mask)
    np.testing.assert_allclose(y2[mask], y[mask], rtol=1e-12)
    np.testing.assert_allclose(bn2.running_var, bn.running_var, rtol=1e-12)
    # inference ignores the mask
    np.testing.assert_array_equal(bn.forward(x, "inference", mask=mask),
                                  bn.forward(x, "inference"))


def test_bad_mask_raises_and_changes_nothing():
    x = np.random.default_rng(13).standard_normal((3, 5, 2))
    bn = bnorm.BatchNorm(2, "keras", layout="NLC")
    before = snapshot(bn)
    for mask, kind in [(np.ones((3, 5)), "DType"), (np.ones((3, 4), bool), "ShapeMismatch"),
                       (np.ones((3, 5, 2), bool), "ShapeMismatch"),
                       (np.zeros((3, 5), bool), "BatchTooSmall")]:
        with pytest.raises(bnorm.Error) as err:
            bn.forward(x, "train", mask=mask)
        assert err.value.kind == kind, (kind, err.value)
        assert snapshot(bn) == before


def test_renorm_state_loads_and_bad_state_changes_nothing():
    """A loaded renorm state is the one the next step corrects toward: r = s / sr and
    d = (mean - renorm_mean) / sr (FORMAT.md, batch_renorm), clipped."""
    x = np.array([[1.0, 10.0], [3.0, 14.0]])  # batch means 2, 12; std sqrt(1 + eps), ...
    eps = 1e-3
    bn = bnorm.BatchNorm(2, "keras", layout="NC", eps=eps,
                         renorm={"rmax": 10.0, "rmin": 0.1, "dmax": 10.0})
    assert bnorm.BatchNorm(2, "keras").renorm_state is None
    np.testing.assert_array_equal(bn.renorm_state[1], [1.0, 1.0])
    bn.renorm_state = (np.array([1.0, 12.0]), np.array([2.0, 4.0]), np.array([1.0, 1.0]))
    y = bn.forward(x, "train")
    s = np.sqrt(np.array([1.0, 4.0]) + eps)
    r, d = s / np.array([2.0, 4.0]), np.array([0.5, 0.0])
    xhat = (x - np.array([2.0, 12.0])) / s
    np.testing.assert_allclose(y, xhat * r + d, rtol=1e-12, atol=1e-12)
    before = (snapshot(bn), [a.tolist() for a in bn.renorm_state])
    bad = [((np.zeros(3), np.ones(3), np.ones(3)), "ShapeMismatch"),
           ((np.zeros(2), -np.ones(2), np.ones(2)), "NegativeVariance"),
           ((np.zeros(2), np.ones(2), np.array([1.0, np.nan])), "NonFiniteParameter")]
    for state, kind in bad:
        with pytest.raises(bnorm.Error) as err:
            bn.renorm_state = state
        assert err.value.kind == kind
        assert (snapshot(bn), [a.tolist() for a in bn.renorm_state]) == before
    with pytest.raises(bnorm.Error) as err:
        bnorm.BatchNorm(2, "keras").renorm_state = (np.zeros(2), np.ones(2), np.ones(2))
    assert err.value.kind == "StateMismatch"


@pytest.mark.parametrize("order", ["renorm first", "ghost first"])
def test_renorm_with_virtual_batch_size_renormalizes_ghost_batches(order):
    """Both settings together, in either order: tf_keras's renorm of ghost batches
    (FORMAT.md, ghost_renorm) -- strided groups {0, 2}, {1, 3}, each normalized with its own
    moments, one r and d from their averages."""
    x = np.array([[1.0], [10.0], [3.0], [14.0]])
    eps = 1e-3
    rn = {"rmax": 10.0, "rmin": 0.1, "dmax": 10.0}
    both = {"renorm": rn, "virtual_batch_size": 2}
    if order == "ghost first":
        both = {"virtual_batch_size": 2, "renorm": rn}
    bn = bnorm.BatchNorm(1, "keras", layout="NC", eps=eps, **both)
    bn.renorm_state = (np.array([5.0]), np.array([2.0]), np.array([1.0]))
    y = bn.forward(x, "train")
    means, var = np.array([2.0, 12.0]), np.array([1.0, 4.0])  # groups {1, 3}, {10, 14}
    r = np.sqrt(var.mean() + eps) / 2.0
    d = (means.mean() - 5.0) / 2.0
    xhat = (x[:, 0] - means[[0, 1, 0, 1]]) / np.sqrt(var[[0, 1, 0, 1]] + eps)
    np.testing.assert_allclose(y[:, 0], xhat * r + d, rtol=1e-12, atol=1e-12)
    # the renorm state moved toward the averaged moments (renorm momentum 0.99)
    np.testing.assert_allclose(bn.renorm_state[0], 5.0 + 0.01 * (7.0 - 5.0), rtol=1e-12)


def test_ema_num_updates_caps_the_decay():
    """keras convention + ema_num_updates: the decay of step n (n updates before it) is
    min(d, (1 + n)/(10 + n)), as tf.train.ExponentialMovingAverage(d, num_updates=n)."""
    rng = np.random.default_rng(7)
    d = 0.99
    bn = bnorm.BatchNorm(2, "keras", layout="NC", momentum=d, ema_num_updates=True)
    plain = bnorm.BatchNorm(2, "keras", layout="NC", momentum=d)
    mean, var = np.zeros(2), np.ones(2)
    for n in range(4):
        x = rng.normal(3.0, 2.0, size=(16, 2))
        bn.forward(x, "train")
        plain.forward(x, "train")
        decay = min(d, (1 + n) / (10 + n))
        mean = decay * mean + (1 - decay) * x.mean(axis=0)
        var = decay * var + (1 - decay) * x.var(axis=0)  # keras: biased variance
        np.testing.assert_allclose(bn.running_mean, mean, rtol=1e-12)
        np.testing.assert_allclose(bn.running_var, var, rtol=1e-12)
    # the cap binds here: the plain decay moves the statistics far less
    assert np.abs(plain.running_mean - mean).max() > 0.5
    for convention in ("torch", "tensorflow"):
        with pytest.raises(bnorm.Error) as err:
            bnorm.BatchNorm(2, convention, momentum=0.9, ema_num_updates=True)
        assert err.value.kind == "InvalidConfig"
