#!/usr/bin/env python3
"""Where one bnorm.torch call on a CUDA tensor spends its time (a probe, not a test).

Times, per call (back-to-back calls between two synchronizations, as a training loop
issues them): the module call of bnorm.torch.BatchNorm2d and of torch.nn.BatchNorm2d in
training and evaluation under no_grad, the extension's forward alone (the step's driver
calls and kernels, no Python around it), the torch operations the Python layer adds
around it, and a forward + backward through autograd (then its Python functions under
cProfile). The shape is S2 (32, 256, 14, 14)
float32 unless given: small enough that the host, not the GPU, sets the pace.

    python3 bench/gpu/dropin_parts.py [N C H W]
"""
import sys
import time

import torch

import bnorm.torch as bt


def per_call(f, n=300):
    for _ in range(20):
        f()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        f()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e6


def main():
    shape = tuple(int(v) for v in sys.argv[1:5]) if len(sys.argv) >= 5 else (32, 256, 14, 14)
    dev = torch.device("cuda", torch.cuda.current_device())
    x = torch.randn(shape, device=dev)
    c = shape[1]
    ours, ref = bt.BatchNorm2d(c).to(dev), torch.nn.BatchNorm2d(c).to(dev)
    print(f"# {torch.cuda.get_device_name(dev)}, torch {torch.__version__}, shape {shape} float32; us per call")
    with torch.no_grad():
        print(f"train, bnorm module      {per_call(lambda: ours(x)):8.1f}")
        print(f"train, torch module      {per_call(lambda: ref(x)):8.1f}")
        ours.eval(), ref.eval()
        print(f"eval, bnorm module       {per_call(lambda: ours(x)):8.1f}")
        print(f"eval, torch module       {per_call(lambda: ref(x)):8.1f}")
        ours.train()
        kernel = bt._cuda_kernel(dev.index, c, ours.eps, ours.momentum, True, True)
        y = torch.empty_like(x)
        args = (
            x.data_ptr(), y.data_ptr(), list(x.shape), "NCHW", "f32", bt._stream(dev), "train",
            (ours.weight.data_ptr(), ours.bias.data_ptr()),
            (ours.running_mean.data_ptr(), ours.running_var.data_ptr()), 5, None, False,
        )
        print(f"train, extension alone   {per_call(lambda: kernel.forward(*args)):8.1f}")
        print(f"torch.empty_like         {per_call(lambda: torch.empty_like(x)):8.1f}")
        print(f"a one-element add_       {per_call(lambda: ours.num_batches_tracked.add_(1)):8.1f}")
    xg, dy = x.clone().requires_grad_(), torch.randn_like(x)
    ref.train()
    print(f"fwd + bwd, bnorm module  {per_call(lambda: ours(xg).backward(dy), 100):8.1f}")
    print(f"fwd + bwd, torch module  {per_call(lambda: ref(xg).backward(dy), 100):8.1f}")
    # the Python functions of the forward + backward, by their own time
    import cProfile
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    per_call(lambda: ours(xg).backward(dy), 100)
    profile.disable()
    pstats.Stats(profile).sort_stats("tottime").print_stats(14)


if __name__ == "__main__":
    main()
