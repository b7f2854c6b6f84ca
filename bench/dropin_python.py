#!/usr/bin/env python3
"""The Python layer's own time per call of bnorm.torch, with the extension stubbed out.

A probe, not a test. The kernels are replaced by objects that return at once, so what is
timed is what the drop-in's Python does around them: for the CPU path `_step` (views of
the module's tensors, the output, the layout) in evaluation, and the module call that
wraps it; for the CUDA path `_cuda_step` (addresses, copies, the update count, the device
checks) in training, on CPU tensors (its Python does not touch the device). Median of
five runs of 20000 calls each, microseconds per call, S2's shape (32, 256, 14, 14).

    pip install ./crates/bnorm-python          # from the repository root
    python3 bench/dropin_python.py
"""
import statistics
import time

import torch

import bnorm.torch as bt


class _Stub:
    """A kernel that does nothing: `forward` returns `result` (CPU: no step, no update;
    CUDA: no step, the running statistics updated, as after a training step)."""

    def __init__(self, result):
        self.result = result

    def forward(self, *args):
        return self.result


def per_call(f, n=20000):
    runs = []
    for _ in range(5):
        for _ in range(200):
            f()
        t = time.perf_counter()
        for _ in range(n):
            f()
        runs.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(runs)


def main():
    cpu_stub, cuda_stub = _Stub((None, None)), _Stub((None, True))
    bt._kernel = lambda *args: cpu_stub
    bt._cuda_kernel = lambda *args: cuda_stub
    bt._stream = lambda device: 0
    x = torch.randn(32, 256, 14, 14)
    m = bt.BatchNorm2d(256)
    with torch.no_grad():
        m.eval()
        print(f"CPU _step, evaluation        {per_call(lambda: bt._step(x, m.weight, m.bias, m)):6.1f} us")
        print(f"CPU module call, evaluation  {per_call(lambda: m(x)):6.1f} us")
        m.train()
        step = lambda: bt._cuda_step(x, m.weight, m.bias, m, False)  # noqa: E731
        print(f"CUDA _cuda_step, training    {per_call(step):6.1f} us")


if __name__ == "__main__":
    main()
