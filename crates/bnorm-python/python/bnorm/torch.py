"""A PyTorch drop-in: ``BatchNorm1d``, ``BatchNorm2d``, ``BatchNorm3d`` and ``convert``.

The classes subclass ``torch.nn.BatchNorm1d/2d/3d`` and replace only ``forward``: the
constructor, the parameters and buffers (``weight``, ``bias``, ``running_mean``,
``running_var``, ``num_batches_tracked``), ``state_dict``/``load_state_dict``, ``.train()``
/``.eval()`` and ``isinstance`` checks are torch's own. ``forward`` runs bnorm's kernels
through a ``torch.autograd.Function`` whose backward is bnorm's backward.

* Modes as torch: training uses the batch statistics and, with
  ``track_running_stats``, updates the running statistics in the module's buffers
  (``momentum=None`` is the cumulative average) and ``num_batches_tracked``; evaluation
  uses the running statistics (the batch's when the module has none).
* CPU tensors, contiguous or channels-last (``torch.channels_last``,
  ``torch.channels_last_3d``), float32, float64, bfloat16, float16. The input, output and
  gradients are read and written in place in torch's memory (the output keeps the
  input's memory format); other strides are made contiguous first. Per-channel
  parameters and statistics (C values) are widened to float64 for the kernels and the
  new running statistics rounded back into the module's buffers.
* One departure from torch, on purpose: a training batch whose statistics are NaN or
  infinite in some channel leaves that channel's running statistics unchanged (torch
  writes NaN into them) and warns (``RuntimeWarning``); the output carries the NaN as
  torch's does.
* CUDA tensors (float32, bfloat16, float16) run on bnorm's GPU kernels (``bnorm-cuda``,
  compiled by NVRTC when a process first uses a GPU: set ``BNORM_NVRTC`` to a
  ``libnvrtc.so`` or its folder when it is not on the loader path; the
  ``nvidia-cuda-nvrtc`` package's is found by itself), in place in torch's memory,
  queued after the work on torch's current stream and before anything torch queues
  next; the host does not wait. The module's float32 parameters and buffers are read
  and written on the device (others through float32 copies). Two differences from the
  CPU path: a skipped channel (non-finite batch statistics) is not warned about (that
  would make the host wait), and float64 batches are refused (kind ``"Unsupported"``).
* Threads: importing this module makes bnorm's kernels run on PyTorch's own OpenMP
  threads (``bnorm.use_openmp``), as many as ``torch.get_num_threads()``, when
  PyTorch's parallel backend is OpenMP. After each of its operations PyTorch's OpenMP
  workers keep spinning for a while; bnorm's own pool would share the cores with them
  (measured on 2 cores: evaluation calls up to 3x slower), while an OpenMP team
  started from the calling thread puts those workers to work at once. Not done when
  ``bnorm.set_num_threads`` was called before the import or ``BNORM_THREADS=own`` is
  set in the environment; ``bnorm.get_threading()`` says which threads are used.

>>> import torch, bnorm.torch
>>> model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8))
>>> model = bnorm.torch.convert(model)
>>> type(model[1]).__module__, type(model[1]).__name__
('bnorm.torch', 'BatchNorm2d')
"""

import threading
import weakref

import numpy as _np
import torch
from torch.autograd.function import once_differentiable

from . import _bnorm, _error

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]

def _share_threads():
    """Runs bnorm's kernels on PyTorch's OpenMP threads (see the module's docstring)."""
    import os

    from . import _threads_chosen, use_openmp

    if _threads_chosen or os.environ.get("BNORM_THREADS", "") == "own":
        return
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return
    try:
        use_openmp()
    except RuntimeError:
        pass  # no OpenMP runtime found: bnorm's own pool


_share_threads()

_LAYOUTS = {2: ("NC", "NC"), 3: ("NCL", "NLC"), 4: ("NCHW", "NHWC"), 5: ("NCDHW", "NDHWC")}
_TAGS = {
    torch.float32: "f32",
    torch.float64: "f64",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
}


def _to_last(d):
    return (0, *range(2, d), 1)


def _to_first(d):
    return (0, d - 1, *range(1, d - 1))


def _view(x):
    """``(layout, v)``: ``v`` holds ``x``'s elements in the layout's order, contiguous;
    a view of ``x`` when ``x`` is contiguous or channels-last, a copy otherwise."""
    d = x.dim()
    if d not in _LAYOUTS:
        raise _error("RankMismatch", f"bnorm takes 2- to 5-D input, got {d}-D")
    first, last = _LAYOUTS[d]
    if x.is_contiguous() or d == 2:
        return first, x.contiguous()
    v = x.permute(_to_last(d))
    if v.is_contiguous():
        return last, v
    return first, x.contiguous()


def _in_layout(t, layout):
    """``t`` (logical N, C, ... order) in ``layout``'s memory order, contiguous."""
    d = t.dim()
    if layout == _LAYOUTS[d][1] and d > 2:
        return t.permute(_to_last(d)).contiguous()
    return t.contiguous()


def _back(v, layout):
    d = v.dim()
    if layout == _LAYOUTS[d][1] and d > 2:
        return v.permute(_to_first(d))
    return v


def _numpy(t):
    """A NumPy view of a contiguous CPU tensor (16-bit floats as uint16)."""
    t = t.detach()
    if t.dtype in (torch.float16, torch.bfloat16):
        return t.view(torch.int16).numpy().view(_np.uint16)
    return t.numpy()


_kernels = threading.local()


def _kernel(channels, eps, momentum, affine_w, affine_b, tracking):
    """A kernel per configuration and thread (its workspace is reused)."""
    cache = getattr(_kernels, "cache", None)
    if cache is None:
        cache = _kernels.cache = {}
    key = (channels, eps, momentum, affine_w, affine_b, tracking)
    k = cache.get(key)
    if k is None:
        settings = {
            "eps": float(eps),
            "momentum": None if momentum is None else float(momentum),
            "scale": affine_w,
            "center": affine_b,
            "track_running_stats": tracking,
        }
        k = cache[key] = _bnorm.Kernel(channels, "torch", settings)
    return k


def _floats(t):
    """``t`` as a NumPy vector for the kernel: float32/float64 tensors viewed without a
    copy (the kernel widens what it reads and writes a buffer's new values in its type),
    16-bit ones as a float64 copy through torch (NumPy has no bfloat16)."""
    if t is None:
        return None
    t = t.detach()
    if t.dtype in (torch.float32, torch.float64):
        return t.numpy()
    return t.to(torch.float64).contiguous().numpy()


_VIEWED = (torch.float32, torch.float64)
# module -> (key, views): kept beside the modules, not in them (nothing of it is saved
# with a module, copied with it or kept alive by it)
_vector_views = weakref.WeakKeyDictionary()


def _vectors(module, weight, bias, rm, rv):
    """The per-channel vectors for the kernel, ``(weight, bias, running_mean,
    running_var)`` (``None`` for those absent): float32/float64 tensors as NumPy views,
    remembered on the module while the same tensors with the same storage are passed
    (their values may change: the views see them), 16-bit ones as float64 copies made
    on each call."""
    tensors = (weight, bias, rm, rv)
    if not all(t is None or t.dtype in _VIEWED for t in tensors):
        return tuple(_floats(t) for t in tensors)
    key = tuple(None if t is None else (id(t), t.data_ptr(), t.dtype) for t in tensors)
    cached = _vector_views.get(module)
    if cached is not None and cached[0] == key:
        return cached[1]
    views = tuple(None if t is None else t.detach().numpy() for t in tensors)
    _vector_views[module] = (key, views)
    return views


def _step(x, weight, bias, module):
    """One forward step of ``module`` on ``x``: the running statistics and
    ``num_batches_tracked`` updated in the module's buffers after a training step;
    returns ``(y, xv, kernel, step, layout)`` (``y`` in ``x``'s memory format, ``xv``
    the input as the kernels read it, ``step`` what backward needs)."""
    tag = _TAGS.get(x.dtype)
    if tag is None:
        raise _error("DType", f"bnorm takes float32/64 and bfloat16/float16, got {x.dtype}")
    buffers = module._buffers
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    if module.training:
        mode = "train"
        use_state = module.track_running_stats and rm is not None
    else:
        mode = "inference"
        use_state = rm is not None
    kernel = _kernel(
        module.num_features,
        module.eps,
        module.momentum,
        weight is not None,
        bias is not None,
        use_state,
    )
    layout, xv = _view(x.detach())
    yv = torch.empty_like(xv)
    nbt = buffers.get("num_batches_tracked")
    # the kernel writes the running statistics in place after a training step: float32 and
    # float64 buffers through NumPy views (as PyTorch's own kernel writes them), 16-bit
    # ones through the float64 copies written back below
    if not use_state:
        rm = rv = None
    w, b, m, v = _vectors(module, weight, bias, rm, rv)
    step, count = kernel.forward(
        _numpy(xv),
        _numpy(yv),
        layout,
        mode,
        tag,
        w,
        b,
        m,
        v,
        int(nbt) if (use_state and nbt is not None) else 0,
    )
    if count is not None:
        with torch.no_grad():
            for buffer, values in ((rm, m), (rv, v)):
                if buffer.dtype not in _VIEWED:
                    buffer.copy_(torch.from_numpy(values))
            if nbt is not None:
                nbt.fill_(count)
    return _back(yv, layout), xv, kernel, step, layout


class _Function(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, module, cuda):
        if cuda:
            y, xv, kernel, step, layout = _cuda_step(x, weight, bias, module, True)
        else:
            y, xv, kernel, step, layout = _step(x, weight, bias, module)
        # saved through autograd, so that changing x in place before backward is an error
        # (as with torch's own batch norm) rather than a wrong gradient
        ctx.save_for_backward(xv)
        ctx.kernel, ctx.step, ctx.layout, ctx.cuda = kernel, step, layout, cuda
        ctx.param_dtypes = (
            None if weight is None else weight.dtype,
            None if bias is None else bias.dtype,
        )
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        (xv,), layout = ctx.saved_tensors, ctx.layout
        if ctx.cuda:
            dxv, dweight, dbias = _cuda_backward(ctx, xv, dy, layout)
        else:
            dyv = _in_layout(dy, layout)
            dxv = torch.empty_like(xv)
            dw, db = ctx.kernel.backward(ctx.step, _numpy(xv), _numpy(dyv), _numpy(dxv))
            wdt, bdt = ctx.param_dtypes
            dweight = None if dw is None or not ctx.needs_input_grad[1] else torch.from_numpy(dw).to(wdt)
            dbias = None if db is None or not ctx.needs_input_grad[2] else torch.from_numpy(db).to(bdt)
        dx = _back(dxv, layout) if ctx.needs_input_grad[0] else None
        return dx, dweight, dbias, None, None


def _needs_grad(x, weight, bias):
    """Whether autograd would record this call (grad mode on and an input requiring it)."""
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in (weight, bias))


# ─── CUDA tensors ──────────────────────────────────────────────────────────────────────

_cuda_kernels = {}
_cuda_lock = threading.Lock()
_GPU_TAGS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}


def _find_nvrtc():
    """Points ``BNORM_NVRTC`` at the ``nvidia-cuda-nvrtc`` package's library folder (the
    one PyTorch's CUDA wheels install) when the variable is not set."""
    import os

    if os.environ.get("BNORM_NVRTC"):
        return
    try:
        import nvidia
    except ImportError:
        return
    for root in getattr(nvidia, "__path__", []):
        for sub in ("cu13/lib", "cuda_nvrtc/lib", "cu12/lib"):
            folder = os.path.join(root, sub)
            if os.path.isdir(folder) and any(
                f.startswith("libnvrtc.so") for f in os.listdir(folder)
            ):
                os.environ["BNORM_NVRTC"] = folder
                return


def _cuda_kernel(device, channels, eps, momentum, affine, tracking):
    """A GPU layer per device and configuration (shared by threads: its calls are
    serialized and stream-ordered)."""
    if device is None:
        device = torch.cuda.current_device()
    key = (device, channels, eps, momentum, affine, tracking)
    with _cuda_lock:
        k = _cuda_kernels.get(key)
        if k is None:
            _find_nvrtc()
            settings = {
                "eps": float(eps),
                "momentum": None if momentum is None else float(momentum),
                "affine": affine,
                "track_running_stats": tracking,
            }
            k = _cuda_kernels[key] = _bnorm.CudaKernel(device, channels, "torch", settings)
        return k


# torch's current stream of a device as a raw handle, without building a Stream object (a
# private function of torch's, present since 1.x, that Triton uses too; the public route
# otherwise)
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def _stream(device):
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _raw_stream is not None:
        return _raw_stream(index)
    return torch.cuda.current_stream(index).cuda_stream


def _aligned(t):
    """``t`` itself when its data starts on a 16-byte boundary (the kernels' vector
    loads), else an aligned copy in the same memory order."""
    if t.data_ptr() % 16 == 0:
        return t
    return t.clone()


def _updates(nbt):
    """``num_batches_tracked`` as an int without reading the device on every call: the
    value is remembered with the tensor's version counter (which bnorm's own increment,
    made by its kernel, leaves unchanged) and read again (one wait for the device) only
    when something else changed the tensor (``load_state_dict``, ``fill_``)."""
    key = (nbt.data_ptr(), nbt._version)
    cached = getattr(nbt, "_bnorm_value", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    value = int(nbt)
    nbt._bnorm_value = (key, value)
    return value


def _f32_in_place(t):
    """``t`` itself when the kernel can read and write it as float32 (contiguous float32),
    else ``None``."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else None


def _check_devices(module, device, tensors, pointers):
    """Raises unless every tensor of the module that the step addresses lives on
    ``device``; checked again only when their addresses change (a tensor moved to another
    device, or replaced, has a new one)."""
    key = (device, pointers)
    if getattr(module, "_bnorm_checked", None) == key:
        return
    for name, t in tensors:
        if t is not None and t.device != device:
            raise _error("WrongDevice", f"{name} is on {t.device}, the input on {device}")
    module._bnorm_checked = key


def _cuda_step(x, weight, bias, module, keep):
    """``_step`` on the GPU: returns ``(y, xv, kernel, step, layout)`` (``step`` None
    unless ``keep``: a backward will follow)."""
    tag = _GPU_TAGS.get(x.dtype)
    if tag is None:
        raise _error(
            "DType", f"bnorm's GPU kernels take float32, bfloat16 and float16, got {x.dtype}"
        )
    buffers = module._buffers
    rm, rv = buffers.get("running_mean"), buffers.get("running_var")
    if module.training:
        mode = "train"
        use_state = module.track_running_stats and rm is not None
    else:
        mode = "inference"
        use_state = rm is not None
    affine = weight is not None
    if affine != (bias is not None):
        raise _error("MissingParameter", "bnorm's GPU path takes weight and bias together")
    device = x.device
    nbt = buffers.get("num_batches_tracked") if use_state else None
    params, running, copies, counter, updates = None, None, None, None, 0
    if affine:
        # parameters are only read: a float32 copy when they are not float32
        w = _f32_in_place(weight)
        w = weight.detach().float().contiguous() if w is None else w
        b = _f32_in_place(bias)
        b = bias.detach().float().contiguous() if b is None else b
        params = (w.data_ptr(), b.data_ptr())
    if use_state:
        # float32 buffers are read and written in place; others through float32 copies,
        # written back after an update
        m, v = _f32_in_place(rm), _f32_in_place(rv)
        if m is None or v is None:
            copies = (rm.float().contiguous(), rv.float().contiguous())
            m, v = copies
        running = (m.data_ptr(), v.data_ptr())
        if nbt is not None:
            updates = _updates(nbt)
            counter = nbt.data_ptr() if nbt.dtype == torch.int64 else None
    _check_devices(
        module,
        device,
        (("weight", weight), ("bias", bias), ("running_mean", rm), ("running_var", rv),
         ("num_batches_tracked", nbt)),
        (params, running, counter),
    )
    kernel = _cuda_kernel(device.index, module.num_features, module.eps, module.momentum, affine, use_state)
    layout, xv = _view(x.detach())
    xv = _aligned(xv)
    yv = torch.empty_like(xv)
    step, updated = kernel.forward(
        xv.data_ptr(), yv.data_ptr(), list(xv.shape), layout, tag, _stream(device),
        mode, params, running, updates, counter, keep,
    )
    if updated:
        if copies is not None:
            with torch.no_grad():
                rm.copy_(copies[0])
                rv.copy_(copies[1])
        if nbt is not None:
            if counter is None:
                with torch.no_grad():
                    nbt.add_(1)
            # the kernel counted the update in the tensor (its version is unchanged)
            nbt._bnorm_value = ((nbt.data_ptr(), nbt._version), updates + 1)
    return _back(yv, layout), xv, kernel, step, layout


def _cuda_backward(ctx, xv, dy, layout):
    """``(dx, dweight, dbias)`` of a step on CUDA tensors (``_Function.backward``)."""
    dyv = _aligned(_in_layout(dy, layout))
    dxv = torch.empty_like(xv)
    wdt, bdt = ctx.param_dtypes
    want_w = wdt is not None and ctx.needs_input_grad[1]
    want_b = bdt is not None and ctx.needs_input_grad[2]
    grads, dw, db = None, None, None
    if want_w or want_b:
        c = xv.shape[1] if layout in ("NC", "NCL", "NCHW", "NCDHW") else xv.shape[-1]
        dw, db = torch.empty((2, c), dtype=torch.float32, device=xv.device)
        grads = (dw.data_ptr(), db.data_ptr())
    stream = _stream(xv.device)
    ctx.kernel.backward(ctx.step, xv.data_ptr(), dyv.data_ptr(), dxv.data_ptr(), stream, grads)
    return dxv, dw.to(wdt) if want_w else None, db.to(bdt) if want_b else None


class _BnormForward:
    def forward(self, input):
        self._check_input_dim(input)
        cuda = input.device.type == "cuda"
        if not cuda and input.device.type != "cpu":
            raise _error(
                "Device", f"bnorm.torch runs on CPU and CUDA tensors; got one on {input.device}"
            )
        if not _needs_grad(input, self.weight, self.bias):
            # nothing to differentiate (evaluation under no_grad, inference_mode, frozen
            # parameters on a constant input): the step alone, without autograd's
            # bookkeeping
            if cuda:
                return _cuda_step(input, self.weight, self.bias, self, False)[0]
            return _step(input, self.weight, self.bias, self)[0]
        return _Function.apply(input, self.weight, self.bias, self, cuda)


class BatchNorm1d(_BnormForward, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` with bnorm's kernels (2-D ``(N, C)`` or 3-D ``(N, C, L)``)."""


class BatchNorm2d(_BnormForward, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` with bnorm's kernels (contiguous or channels-last)."""


class BatchNorm3d(_BnormForward, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` with bnorm's kernels (contiguous or channels-last-3d)."""


_REPLACE = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


def convert(module):
    """Makes every ``torch.nn.BatchNorm1d/2d/3d`` in ``module`` (``module`` included) a
    bnorm one, in place, and returns ``module``. The modules keep their identity, their
    parameters, buffers and hooks (only their class changes), so optimizers built before
    still hold the right parameters. Subclasses (``SyncBatchNorm``, ...) are left alone."""
    for m in module.modules():
        cls = _REPLACE.get(type(m))
        if cls is not None:
            m.__class__ = cls
    return module
