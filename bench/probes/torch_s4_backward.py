"""Same-minute probe of PyTorch's S4 (NHWC 32x56x56x64, f32, 2 threads) backward: median and best
of 100 calls of aten::native_batch_norm_backward. Alternate it with
`cargo run --release -p bnorm --example step_time -- S4 bwd` (quoted in bench/RESULTS.md)."""
import torch, time, statistics, sys
torch.set_num_threads(2)
x = torch.randn(32,64,56,56).contiguous(memory_format=torch.channels_last)
dy = torch.randn_like(x)
c=64
w=torch.ones(c); b=torch.zeros(c); rm=torch.zeros(c); rv=torch.ones(c)
_, sm, si = torch.ops.aten.native_batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5)
def bwd(): torch.ops.aten.native_batch_norm_backward(dy, x, w, rm, rv, sm, si, True, 1e-5, [True, True, True])
bwd()
ts=[]
with torch.no_grad():
    for _ in range(100):
        t=time.perf_counter(); bwd(); ts.append(time.perf_counter()-t)
ts.sort()
print(f"torch S4 bwd median {ts[50]*1e3:.3f} ms min {ts[0]*1e3:.3f} ms")
