#!/usr/bin/env python3
"""Where the drop-in's time goes (a probe, not a test): per shape, the median of 30 calls of
torch.nn's eval and training forward, bnorm.torch's, bnorm's kernel alone into a caller
buffer (the drop-in's own Kernel object, no autograd, no allocation), torch.empty_like, and
torch.add into a preallocated output / allocating (the in-cache copy-like floor); then the
former and the current way of passing the per-channel vectors, alternated.

    pip install ./crates/bnorm-python && python3 bench/dropin_parts.py

Used for the causes of the misses in bench/README.md ("The PyTorch drop-in").
"""
import time

import torch

import bnorm
import bnorm.torch
from bnorm.torch import _numpy, _floats, _kernel
torch.set_num_threads(2)
import sys
if "--own" in sys.argv:  # bnorm's own pool; by default PyTorch's OpenMP team (bnorm.torch's choice)
    bnorm.set_num_threads(2)
print("bnorm threads:", bnorm.get_threading())
def t(f, n=30):
    f(); ts=[]
    for _ in range(n):
        a=time.perf_counter(); f(); ts.append(time.perf_counter()-a)
    return sorted(ts)[n//2]*1e3
for shape in [(32,256,14,14),(4096,1024),(32,64,56,56)]:
    C=shape[1]
    x=torch.randn(*shape)
    ref=torch.nn.BatchNorm2d(C) if len(shape)==4 else torch.nn.BatchNorm1d(C)
    ours=(bnorm.torch.BatchNorm2d if len(shape)==4 else bnorm.torch.BatchNorm1d)(C)
    ref.eval(); ours.eval()
    y=torch.empty_like(x)
    k=_kernel(C, 1e-5, 0.1, True, True, True)
    lay="NCHW" if len(shape)==4 else "NC"
    w,b,rm,rv=_floats(ours.weight),_floats(ours.bias),_floats(ours.running_mean),_floats(ours.running_var)
    xn,yn=_numpy(x),_numpy(y)
    with torch.no_grad():
        print(shape, "torch eval %.3f"%t(lambda: ref(x)), "dropin %.3f"%t(lambda: ours(x)),
          "kernel only %.3f"%t(lambda: k.forward(xn,yn,lay,"inference","f32",w,b,rm,rv,0)),
          "empty_like %.3f"%t(lambda: torch.empty_like(x)),
          "torch into-out add %.3f"%t(lambda: torch.add(x,1.0,out=y)),
          "torch add alloc %.3f"%t(lambda: x+1.0))
        ref.train(); ours.train()
        print(shape, "torch train %.3f"%t(lambda: ref(x)), "dropin %.3f"%t(lambda: ours(x)),
          "kernel only %.3f"%t(lambda: k.forward(xn,yn,lay,"train","f32",w,b,rm,rv,5)))

# Parameter passing, alternated in one process: the former path (per-channel vectors widened
# to float64 copies in Python, the new running statistics copied back with Tensor.copy_)
# against the current one (float32 views; the kernel widens them and writes the running
# statistics in place), on a tiny batch where per-call costs dominate. Median of 9 rounds
# of 3000 calls of the kernel call and its argument preparation.
import numpy as np
m = bnorm.torch.BatchNorm2d(64)
x = torch.randn(8, 64, 2, 2); y = torch.empty_like(x)
k = _kernel(64, 1e-5, 0.1, True, True, True)
xn, yn = _numpy(x), _numpy(y)
def widened(t): return np.ascontiguousarray(t.detach().numpy(), dtype=np.float64)
def former(mode):
    w, b, rm, rv = (widened(t) for t in (m.weight, m.bias, m.running_mean, m.running_var))
    _, count = k.forward(xn, yn, "NCHW", mode, "f32", w, b, rm, rv, 0)
    if count is not None:
        with torch.no_grad():
            m.running_mean.copy_(torch.from_numpy(rm)); m.running_var.copy_(torch.from_numpy(rv))
def views(mode):
    k.forward(xn, yn, "NCHW", mode, "f32", *(_floats(t) for t in (m.weight, m.bias, m.running_mean, m.running_var)), 0)
def per_call(f, mode, n=3000):
    a = time.perf_counter()
    for _ in range(n): f(mode)
    return (time.perf_counter() - a) / n * 1e6
for mode in ("inference", "train"):
    a, b = [], []
    for _ in range(9):
        a.append(per_call(former, mode)); b.append(per_call(views, mode))
    print(f"(8,64,2,2) {mode} kernel call: float64 copies {sorted(a)[4]:.1f} us, views {sorted(b)[4]:.1f} us")
