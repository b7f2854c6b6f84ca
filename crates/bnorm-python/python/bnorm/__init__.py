"""bnorm: batch normalization done completely, over Rust kernels.

Two ways in:

* ``bnorm.BatchNorm`` -- a layer over NumPy arrays, with PyTorch's, Keras' or TensorFlow's
  semantics, every layout, and float64/float32/float16 (bfloat16 with ``ml_dtypes``).
* ``bnorm.torch`` -- ``BatchNorm1d/2d/3d``, drop-in replacements of ``torch.nn``'s on CPU
  and CUDA tensors (the GPU kernels compiled by NVRTC on first use), and
  ``convert(model)`` which swaps them in place.

``python -m bnorm inspect|convert|fold|conformance ...`` runs the command-line tool.

Every call names its mode (``"train"``, ``"inference"``, ``"frozen"``); errors are
``bnorm.Error`` (a ``ValueError``) with a ``kind`` attribute, and a call that raises
changes nothing.
"""

import numpy as _np

from . import _bnorm
from ._bnorm import Error, get_num_threads, get_threading

__all__ = [
    "BatchNorm",
    "Error",
    "set_num_threads",
    "get_num_threads",
    "use_openmp",
    "get_threading",
]

# Whether the user chose bnorm's threads (then importing bnorm.torch keeps that choice).
_threads_chosen = False


def set_num_threads(threads):
    """Runs bnorm's kernels in bnorm's own pool of ``threads`` threads (0: one per CPU,
    or ``RAYON_NUM_THREADS``), like ``torch.set_num_threads``; stops sharing OpenMP's
    threads (see ``use_openmp``).

    >>> import bnorm
    >>> bnorm.set_num_threads(2); bnorm.get_num_threads(), bnorm.get_threading()
    (2, 'rayon')
    """
    global _threads_chosen
    _bnorm.set_num_threads(threads)
    _threads_chosen = True


def use_openmp(library=None):
    """Runs bnorm's kernels on the threads of the OpenMP runtime already loaded in the
    process -- PyTorch's on Linux (``libgomp``) -- and returns the runtime's path.

    A kernel call then runs as ``#pragma omp parallel`` from the calling thread: on the
    team PyTorch's own operations use, ``torch.get_num_threads()`` threads (what
    ``torch.set_num_threads`` and ``OMP_NUM_THREADS`` set), whose workers are still
    spinning from PyTorch's last operation and take the work at once. bnorm's own pool
    would instead compete with those spinning workers for the cores. ``bnorm.torch``
    calls this when imported, unless ``set_num_threads`` was called before or
    ``BNORM_THREADS=own`` is set. ``library`` names a loaded shared object (path or file
    name); by default the first loaded ``libgomp``, ``libiomp`` or ``libomp``.

    Raises ``RuntimeError`` when no OpenMP runtime is loaded (nothing changes then).
    Results are bitwise the same on any threads. bnorm's calls then follow OpenMP's rules
    as PyTorch's operations do (e.g. in a forked child, such as a ``DataLoader`` worker,
    PyTorch sets one thread, and bnorm runs on the calling thread alone).
    """
    global _threads_chosen
    path = _bnorm.use_openmp(library)
    _threads_chosen = True
    return path


def _error(kind, message):
    e = Error(message)
    e.kind = kind
    return e


def _storage(a, what):
    """The dtype tag of ``a`` and the array Rust reads: 16-bit floats viewed as uint16."""
    name = a.dtype.name
    if name == "float32":
        return "f32", a
    if name == "float64":
        return "f64", a
    if name == "float16":
        return "f16", a.view(_np.uint16)
    if name == "bfloat16":
        return "bf16", a.view(_np.uint16)
    raise _error(
        "DType",
        f"{what} has dtype {a.dtype}; bnorm takes float64, float32, float16 and "
        "bfloat16 (ml_dtypes)",
    )


class BatchNorm:
    """A batch-norm layer over NumPy arrays.

    ``BatchNorm(channels, convention="torch"|"keras"|"tensorflow", layout="NCHW",
    **settings)``; settings are the Rust ``Config`` setters by name: ``eps``,
    ``momentum`` (a float in the convention's meaning -- torch: the new batch's weight,
    keras: the decay, tensorflow: the zero-debiased decay -- or ``None`` for the
    cumulative average), ``affine``, ``scale``, ``center``, ``track_running_stats``,
    ``running_variance`` (``"biased"``/``"unbiased"``), ``non_finite``
    (``"skip_channel"``/``"error"``), ``cold_statistics`` (``"allow"``/``"report"``/
    ``"error"``), ``single_value`` (``"refuse"``/``"accept"``: a training step with one
    value per channel -- per ghost group -- is refused with kind ``"BatchTooSmall"``, as
    PyTorch does, or normalized with variance 0, as Keras and TensorFlow do; the default
    is the convention's); the variants ``virtual_batch_size`` (ghost batches, tf_keras's strided
    groups) and ``renorm`` (batch renormalization: ``True`` for tf_keras's clipping
    ``rmax=3, dmax=5``, or a dict of ``rmax``, ``rmin``, ``dmax``, ``momentum``); both
    together renormalize ghost batches as tf_keras's ``renorm=True, virtual_batch_size=v``
    does (one ``r``, ``d`` per channel from the averages over the groups).

    ``layout`` is the order of the arrays in memory: ``NC``, ``NCL``, ``NCHW``,
    ``NCDHW`` (channels first) or ``NLC``, ``NHWC``, ``NDHWC`` (channels last).
    C-contiguous arrays are not copied (others are made contiguous first); outputs are
    new arrays of the input's dtype. Parameters, gradients of parameters and running
    statistics are float64.

    >>> import numpy as np, bnorm
    >>> bn = bnorm.BatchNorm(3, layout="NC")
    >>> y = bn.forward(np.arange(12, dtype=np.float32).reshape(4, 3), mode="train")
    >>> dx, dgamma, dbeta = bn.backward(np.ones_like(y))
    >>> int(bn.num_batches_tracked)
    1
    """

    def __init__(self, channels, convention="torch", layout="NCHW", **settings):
        self._layer = _bnorm.Layer(channels, convention, settings)
        self.layout = layout
        self._x = None

    @staticmethod
    def _input(a, what):
        a = _np.ascontiguousarray(a)
        tag, view = _storage(a, what)
        return a, tag, view

    def forward(self, x, mode="train", mask=None):
        """Normalizes ``x`` (``mode``: ``"train"``, ``"inference"`` or ``"frozen"``) and
        returns ``y``. A training step updates the running statistics.

        ``mask`` (Keras 3's masked batch norm): a bool array of ``x``'s shape without its
        last axis, broadcast along that axis -- one flag per position for channels-last
        data, per (sample, channel) for ``NCL``. A step normalized with batch statistics
        computes them, and updates the running statistics, from the selected values only
        (dividing by their count plus Keras' ``1e-7``) and normalizes every value with
        them; the next ``backward`` is the derivative of that map. A step normalized with
        running statistics ignores the mask. A channel with no selected value is refused
        (kind ``"BatchTooSmall"``).

        >>> import numpy as np, bnorm
        >>> bn = bnorm.BatchNorm(1, "keras", layout="NLC")
        >>> x = np.array([1.0, 2.0, 3.0, 5.0, 0.0, 0.0]).reshape(2, 3, 1)
        >>> mask = np.array([[True, True, True], [True, False, False]])
        >>> y = bn.forward(x, "train", mask=mask)
        >>> round(float(bn.running_mean[0]), 6)  # 0.01 of the selected values' mean 2.75
        0.0275
        """
        x, tag, xs = self._input(x, "x")
        if mask is not None:
            mask = _np.ascontiguousarray(mask)
            if mask.dtype != _np.bool_:
                raise _error("DType", f"mask has dtype {mask.dtype}; it must be bool")
            if mask.shape != x.shape[:-1]:
                raise _error(
                    "ShapeMismatch",
                    f"mask has shape {mask.shape}; x of shape {x.shape} needs "
                    f"{x.shape[:-1]} (x's shape without its last axis)",
                )
        y = _np.empty_like(x)
        self._layer.forward(xs, _storage(y, "y")[1], self.layout, mode, tag, mask)
        self._x = x
        return y

    def backward(self, dy):
        """Backward of the last forward step: returns ``(dx, dweight, dbias)`` (``None``
        for a parameter the layer does not have). It reads that step's ``x``, kept by
        reference (not copied): change ``x`` in between and the gradient is of the new
        values."""
        if self._x is None:
            raise _error("NoForward", "backward needs a forward step first")
        x = self._x
        dy, tag, dys = self._input(dy, "dy")
        if dy.dtype != x.dtype:
            raise _error("DType", f"dy has dtype {dy.dtype}, x had {x.dtype}")
        dx = _np.empty_like(x)
        dw, db = self._layer.backward(
            _storage(x, "x")[1], dys, _storage(dx, "dx")[1], self.layout, tag
        )
        return dx, dw, db

    @property
    def weight(self):
        """gamma (float64), ``None`` without scale."""
        return self._layer.weight

    @weight.setter
    def weight(self, value):
        self._layer.set_params(_f64(value), self._layer.bias)

    @property
    def bias(self):
        """beta (float64), ``None`` without center."""
        return self._layer.bias

    @bias.setter
    def bias(self, value):
        self._layer.set_params(self._layer.weight, _f64(value))

    @property
    def running_mean(self):
        """The running mean (float64), ``None`` when not tracked."""
        return self._layer.running_mean

    @running_mean.setter
    def running_mean(self, value):
        self._layer.set_running(
            _f64(value), self._layer.running_var, self._layer.num_batches_tracked
        )

    @property
    def running_var(self):
        """The running variance (float64), ``None`` when not tracked."""
        return self._layer.running_var

    @running_var.setter
    def running_var(self, value):
        self._layer.set_running(
            self._layer.running_mean, _f64(value), self._layer.num_batches_tracked
        )

    @property
    def num_batches_tracked(self):
        """Training steps folded into the running statistics."""
        return self._layer.num_batches_tracked

    @num_batches_tracked.setter
    def num_batches_tracked(self, value):
        self._layer.set_running(
            self._layer.running_mean, self._layer.running_var, int(value)
        )

    @property
    def renorm_state(self):
        """Batch renormalization's state ``(renorm_mean, renorm_stddev, moving_stddev)``
        (float64, tf_keras' names), ``None`` without renorm or running statistics.
        Setting the running statistics resets it to theirs (``running_mean``,
        ``sqrt(running_var)``, ``sqrt(running_var + eps)`` once trained); set it after
        them to load a saved one."""
        return self._layer.renorm_state

    @renorm_state.setter
    def renorm_state(self, value):
        mean, stddev, moving_stddev = value
        self._layer.set_renorm_state(_f64(mean), _f64(stddev), _f64(moving_stddev))

    def __repr__(self):
        return f"bnorm.BatchNorm({self._layer.config()}, layout={self.layout!r})"


def _f64(value):
    return None if value is None else _np.ascontiguousarray(value, dtype=_np.float64)
