"""The Python half of bnorm.torch's CUDA path, without a GPU.

``bnorm.torch`` hands a CUDA step to the extension as raw device addresses (input,
output, parameters, running statistics, ``num_batches_tracked``), a shape in the layout's
memory order and a stream. Here that extension class is replaced by ``HostKernel``: bnorm's
CPU kernel reading and writing host memory at the same addresses, so the Python glue —
layouts and channels-last shapes, alignment copies, float32 views or copies of the
module's tensors, the update count and its cache, the autograd ``Function``, the
no-grad path, the device checks — runs on CPU tensors in CI and is compared with
``torch.nn``. The extension's own GPU step is tested on a GPU
(``test_torch_cuda.py``, ``bnorm-cuda``'s GPU tests).
"""
import ctypes

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import bnorm
import bnorm.torch as bt
from bnorm import _bnorm

_NP = {"f32": np.float32, "f16": np.uint16, "bf16": np.uint16}
_WIDTH = {"f32": 4, "f16": 2, "bf16": 2}


def at(address, count, dtype, itemsize):
    """A NumPy array over ``count`` elements of host memory at ``address``."""
    buf = (ctypes.c_char * max(count * itemsize, 1)).from_address(address)
    return np.frombuffer(buf, dtype=dtype, count=count)


class HostKernel:
    """``_bnorm.CudaKernel``'s interface over bnorm's CPU kernel and host memory."""

    def __init__(self, channels, settings):
        self.channels = channels
        self.kernel = _bnorm.Kernel(channels, "torch", settings)

    def vec(self, address):
        return at(address, self.channels, np.float32, 4)

    def forward(self, x, y, shape, layout, dtype, stream, mode, params, running, updates, counter, keep):
        assert stream == 0
        # the extension's contract (ForeignTensor refuses anything else)
        assert x % 16 == 0 and y % 16 == 0, "batches start on 16-byte boundaries"
        n = int(np.prod(shape))
        xa = at(x, n, _NP[dtype], _WIDTH[dtype]).reshape(shape)
        ya = at(y, n, _NP[dtype], _WIDTH[dtype]).reshape(shape)
        w, b = (self.vec(params[0]), self.vec(params[1])) if params else (None, None)
        m, v = (self.vec(running[0]), self.vec(running[1])) if running else (None, None)
        step, count = self.kernel.forward(xa, ya, layout, mode, dtype, w, b, m, v, updates)
        if count is not None and counter is not None:
            at(counter, 1, np.int64, 8)[0] += 1
        kept = (step, list(shape), layout, dtype) if keep else None
        return kept, count is not None

    def backward(self, step, x, dy, dx, stream, grads):
        step, shape, _, dtype = step
        assert x % 16 == 0 and dy % 16 == 0 and dx % 16 == 0, "batches start on 16-byte boundaries"
        n = int(np.prod(shape))
        arr = lambda a: at(a, n, _NP[dtype], _WIDTH[dtype]).reshape(shape)
        dw, db = self.kernel.backward(step, arr(x), arr(dy), arr(dx))
        if grads is not None:
            self.vec(grads[0])[:] = dw
            self.vec(grads[1])[:] = db


@pytest.fixture
def host(monkeypatch):
    """Routes the CUDA path to ``HostKernel``s (one per configuration, as the real cache)."""
    kernels = {}

    def kernel(device, channels, eps, momentum, affine, tracking):
        key = (channels, eps, momentum, affine, tracking)
        if key not in kernels:
            settings = {
                "eps": float(eps),
                "momentum": None if momentum is None else float(momentum),
                "affine": affine,
                "track_running_stats": tracking,
            }
            kernels[key] = HostKernel(channels, settings)
        return kernels[key]

    monkeypatch.setattr(bt, "_cuda_kernel", kernel)
    monkeypatch.setattr(bt, "_stream", lambda device: 0)
    return kernels


def cuda_call(module, x):
    """What ``forward`` does for a CUDA tensor, on a CPU one."""
    if bt._needs_grad(x, module.weight, module.bias):
        return bt._Function.apply(x, module.weight, module.bias, module, True)
    return bt._cuda_step(x, module.weight, module.bias, module, False)[0]


def close(what, got, want, tol):
    got, want = got.detach().double(), want.detach().double()
    err = (got - want).abs().max().item()
    scale = want.abs().max().item() + 1e-12
    assert err <= tol * scale, f"{what}: max |error| {err:.3g} > {tol:g} x {scale:.3g}"


def pair(cls_t, cls_b, c, **kw):
    ref, ours = cls_t(c, **kw), cls_b(c, **kw)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(c) + 0.5)
            ref.bias.copy_(torch.randn(c))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


CASES = [
    (torch.nn.BatchNorm1d, bt.BatchNorm1d, (32, 6), None),
    (torch.nn.BatchNorm2d, bt.BatchNorm2d, (4, 6, 5, 7), None),
    (torch.nn.BatchNorm2d, bt.BatchNorm2d, (4, 6, 5, 7), torch.channels_last),
    (torch.nn.BatchNorm3d, bt.BatchNorm3d, (3, 6, 2, 3, 4), torch.channels_last_3d),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{len(c[2])}d-{c[3]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_steps_through_the_glue_match_torch(host, case, dtype):
    cls_t, cls_b, shape, fmt = case
    ref, ours = pair(cls_t, cls_b, shape[1], momentum=None)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    g = torch.Generator().manual_seed(0)
    for step in range(4):
        ref.train(step < 3), ours.train(step < 3)
        x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        with torch.no_grad() if step == 1 else torch.enable_grad():
            yr, yo = ref(xr), cuda_call(ours, xo)
        assert yo.dtype == dtype and yo.shape == x.shape
        if fmt is not None:
            assert yo.is_contiguous(memory_format=fmt)
        close(f"y step {step}", yo, yr, tol)
        if step != 1:
            dy = torch.randn(shape, generator=g).to(dtype)
            yr.backward(dy), yo.backward(dy)
            close("dx", xo.grad, xr.grad, 10 * tol)
            close("dweight", ours.weight.grad, ref.weight.grad, 10 * tol)
            ref.zero_grad(), ours.zero_grad()
        close("running_var", ours.running_var, ref.running_var, 1e-6)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()
    assert ours.num_batches_tracked.item() == 3


def test_counter_cache_and_state_dict(host):
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 3, momentum=None)
    x = torch.randn(4, 3, 2, 2)
    for _ in range(2):
        ref(x), cuda_call(ours, x)
    # the count the glue remembers follows the kernel's increments without re-reading
    nbt = ours.num_batches_tracked
    assert nbt._bnorm_value[1] == nbt.item() == 2
    # a checkpoint loaded in between (the tensor's version moves) is read again
    sd = ref.state_dict()
    sd["num_batches_tracked"] = torch.tensor(7)
    ref.load_state_dict(sd), ours.load_state_dict(sd)
    ref(x), cuda_call(ours, x)
    close("running_mean", ours.running_mean, ref.running_mean, 1e-6)
    assert ours.num_batches_tracked.item() == 8


def test_misaligned_and_strided_inputs_are_copied(host):
    ref, ours = pair(torch.nn.BatchNorm1d, bt.BatchNorm1d, 7)
    flat = torch.randn(1 + 10 * 7)
    x = flat[1:].view(10, 7)
    assert x.data_ptr() % 16 != 0
    close("misaligned", cuda_call(ours, x), ref(x), 1e-5)
    ref2, ours2 = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 4)
    x = torch.randn(5, 8, 3, 3)[:, ::2]
    close("strided", cuda_call(ours2, x), ref2(x), 1e-5)


def test_half_modules_are_read_and_written_through_copies(host):
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 5)
    ref.double(), ours.double()  # float64 buffers: not the kernel's float32
    x = torch.randn(6, 5, 3, 3, dtype=torch.float32)
    with torch.no_grad():
        yr = torch.nn.functional.batch_norm(
            x.double(), ref.running_mean, ref.running_var, ref.weight, ref.bias, True, 0.1, ref.eps
        )
        yo = cuda_call(ours, x)
    close("y", yo, yr.float(), 1e-5)
    assert ours.running_mean.dtype == torch.float64
    close("running_mean", ours.running_mean, ref.running_mean, 1e-6)


def test_without_parameters_or_tracking(host):
    for kw in ({"affine": False}, {"track_running_stats": False}):
        ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 4, **kw)
        x = torch.randn(3, 4, 2, 2)
        close(f"train {kw}", cuda_call(ours, x), ref(x), 1e-5)
        ref.eval(), ours.eval()
        close(f"eval {kw}", cuda_call(ours, x), ref(x), 1e-5)


def test_bad_input_is_refused_before_the_kernel(host):
    ours = bt.BatchNorm2d(4)
    with pytest.raises(bnorm.Error) as err:
        bt._cuda_step(torch.randn(2, 4, 3, 3, dtype=torch.float64), ours.weight, ours.bias, ours, False)
    assert err.value.kind == "DType"
    assert not host  # no kernel was even made
    # a module whose parameters are on another device than the input
    ours.weight = torch.nn.Parameter(torch.ones(4, device="meta"))
    with pytest.raises(bnorm.Error) as err:
        bt._cuda_step(torch.randn(2, 4, 3, 3), ours.weight, ours.bias, ours, False)
    assert err.value.kind == "WrongDevice"
    assert ours.num_batches_tracked.item() == 0
