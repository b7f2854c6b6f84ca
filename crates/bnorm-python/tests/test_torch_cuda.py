"""bnorm.torch on CUDA tensors against torch.nn's batch norm (cuDNN) on the same GPU.

Skipped where PyTorch sees no GPU (CI); run on a GPU machine with
``BNORM_REQUIRE_GPU=1 python -m pytest crates/bnorm-python/tests/test_torch_cuda.py``
(then a missing GPU fails instead of skipping).
"""
import contextlib
import os

import pytest

torch = pytest.importorskip("torch")

import bnorm
import bnorm.torch as bt
from test_torch import Block  # the CPU tests' ResNet basic block

if not torch.cuda.is_available():
    if os.environ.get("BNORM_REQUIRE_GPU") == "1":
        raise RuntimeError("BNORM_REQUIRE_GPU=1 but torch sees no CUDA device")
    pytest.skip("no CUDA device", allow_module_level=True)

DEV = torch.device("cuda")
# (output, running statistics, gradient) tolerances, relative to the values' scale
TOL = {
    torch.float32: (2e-5, 1e-5, 1e-4),
    torch.bfloat16: (2e-2, 1e-5, 4e-2),
    torch.float16: (3e-3, 1e-5, 5e-3),
}


def close(what, got, want, tol):
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    scale = want.abs().max().item() + 1e-12
    err = (got - want).abs().max().item()
    assert err <= tol * scale, f"{what}: max |error| {err:.3g} > {tol:g} x {scale:.3g}"


def pair(cls_t, cls_b, c, **kw):
    ref = cls_t(c, **kw).to(DEV)
    ours = cls_b(c, **kw).to(DEV)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.copy_(torch.rand(c) + 0.5)
            ref.bias.copy_(torch.randn(c))
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def batch(shape, dtype, channels_last=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 3 + 2).to(DEV, dtype)
    if channels_last:
        x = x.contiguous(
            memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        )
    return x


CASES = [
    (torch.nn.BatchNorm1d, bt.BatchNorm1d, (64, 24), False),
    (torch.nn.BatchNorm1d, bt.BatchNorm1d, (16, 12, 33), False),
    (torch.nn.BatchNorm2d, bt.BatchNorm2d, (8, 16, 14, 14), False),
    (torch.nn.BatchNorm2d, bt.BatchNorm2d, (8, 16, 14, 14), True),
    (torch.nn.BatchNorm3d, bt.BatchNorm3d, (4, 8, 5, 6, 7), False),
    (torch.nn.BatchNorm3d, bt.BatchNorm3d, (4, 8, 5, 6, 7), True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[2]}{'-cl' if c[3] else ''}")
@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_eval_sequence_matches_torch(case, dtype, momentum):
    cls_t, cls_b, shape, cl = case
    ref, ours = pair(cls_t, cls_b, shape[1], momentum=momentum)
    tol_y, tol_s, _ = TOL[dtype]
    for step in range(3):
        x = batch(shape, dtype, cl, seed=step)
        # step 1 without autograd (the bare step, its statistics buffers reused)
        with torch.no_grad() if step == 1 else contextlib.nullcontext():
            y_ref, y = ref(x), ours(x)
        assert y.dtype == dtype and y.shape == x.shape
        assert y.is_contiguous(memory_format=torch.channels_last) == y_ref.is_contiguous(
            memory_format=torch.channels_last
        ) or x.dim() != 4
        close(f"y step {step}", y, y_ref, tol_y)
        close("running_mean", ours.running_mean, ref.running_mean, tol_s)
        close("running_var", ours.running_var, ref.running_var, tol_s)
        assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == step + 1
    ref.eval(), ours.eval()
    x = batch(shape, dtype, cl, seed=9)
    close("y eval", ours(x), ref(x), tol_y)
    assert ours.num_batches_tracked.item() == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("cl", [False, True])
def test_gradients_match_torch(dtype, cl):
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 16)
    _, _, tol_g = TOL[dtype]
    x = batch((8, 16, 10, 12), dtype, cl)
    dy = batch((8, 16, 10, 12), dtype, cl, seed=5)
    for train in (True, False):
        ref.train(train), ours.train(train)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        ref.zero_grad(), ours.zero_grad()
        ref(xr).backward(dy)
        ours(xo).backward(dy)
        close(f"dx (train={train})", xo.grad, xr.grad, tol_g)
        close("dweight", ours.weight.grad, ref.weight.grad, tol_g)
        close("dbias", ours.bias.grad, ref.bias.grad, tol_g)
        assert ours.weight.grad.dtype == torch.float32


def test_gradcheck_against_finite_differences_in_float32():
    # float64 is CPU-only for bnorm's GPU kernels: the check runs float32 gradients against
    # torch's own float64 reference of the same module instead.
    ours = bt.BatchNorm2d(5).to(DEV)
    ref = torch.nn.BatchNorm2d(5).to(DEV).double()
    ref.load_state_dict(ours.state_dict())
    x = batch((6, 5, 4, 3), torch.float32)
    dy = batch((6, 5, 4, 3), torch.float32, seed=3)
    xo, xr = x.clone().requires_grad_(), x.double().requires_grad_()
    ours(xo).backward(dy)
    ref(xr).backward(dy.double())
    close("dx vs float64", xo.grad, xr.grad, 1e-5)
    close("dweight vs float64", ours.weight.grad, ref.weight.grad, 1e-5)


@pytest.mark.parametrize("affine,track", [(False, True), (True, False), (False, False)])
def test_without_parameters_or_running_statistics(affine, track):
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 6, affine=affine, track_running_stats=track)
    x = batch((5, 6, 7, 7), torch.float32)
    close("train", ours(x), ref(x), 2e-5)
    ref.eval(), ours.eval()
    close("eval", ours(x), ref(x), 2e-5)
    if track:
        close("running_var", ours.running_var, ref.running_var, 1e-5)


def test_a_side_stream_and_no_host_wait_in_between():
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 32)
    side = torch.cuda.Stream()
    xs = [batch((16, 32, 28, 28), torch.float32, seed=s) for s in range(4)]
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        # each step's input is made on the side stream right before the call, and its
        # output consumed by torch right after: a missing wait or release would read
        # unwritten memory or stale statistics
        outs = []
        for x in xs:
            x2 = x * 1.5 - 0.25
            outs.append(ours(x2).sum(dim=(0, 2, 3)))
        ref_outs = [ref(x * 1.5 - 0.25).sum(dim=(0, 2, 3)) for x in xs]
    side.synchronize()
    for k, (a, b) in enumerate(zip(outs, ref_outs)):
        close(f"step {k}", a, b, 1e-4)
    close("running_mean", ours.running_mean, ref.running_mean, 1e-5)


def test_misaligned_and_strided_inputs():
    ref, ours = pair(torch.nn.BatchNorm1d, bt.BatchNorm1d, 7)
    flat = batch((1 + 40 * 7,), torch.float32)
    x = flat[1:].view(40, 7)  # starts 4 bytes into the allocation
    assert x.data_ptr() % 16 != 0
    close("misaligned", ours(x), ref(x), 2e-5)
    big = batch((12, 16, 9, 9), torch.float32)
    x = big[:, ::2]  # neither contiguous nor channels-last
    ref2, ours2 = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 8)
    close("strided", ours2(x), ref2(x), 2e-5)


def test_bad_input_raises_and_changes_nothing():
    ours = bt.BatchNorm2d(4).to(DEV)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(bnorm.Error) as err:
        ours(torch.randn(3, 4, 5, 5, device=DEV, dtype=torch.float64))
    assert err.value.kind == "DType"
    with pytest.raises(ValueError):
        ours(torch.randn(1, 4, 1, 1, device=DEV))  # one value per channel in training
    with pytest.raises(ValueError):
        ours(torch.randn(3, 5, 2, 2, device=DEV))  # wrong channel count
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_state_dict_changes_are_seen():
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 8, momentum=None)
    x = batch((4, 8, 6, 6), torch.float32)
    ref(x), ours(x)
    # a checkpoint loaded between steps: the cumulative average must restart from its count
    sd = ref.state_dict()
    sd["num_batches_tracked"] = torch.tensor(10)
    ref.load_state_dict(sd), ours.load_state_dict(sd)
    x = batch((4, 8, 6, 6), torch.float32, seed=1)
    ref(x), ours(x)
    close("running_mean", ours.running_mean, ref.running_mean, 1e-5)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 11


def test_convert_a_resnet_block_on_the_gpu(monkeypatch):
    # full float32 convolutions: with TF32 (PyTorch's default for cuDNN convolutions) the
    # two models' gradients drift apart by ~1e-3 of their scale through the convolutions'
    # rounding alone, whichever batch norm feeds them
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    torch.manual_seed(0)
    ref = Block(16).to(DEV)
    ours = bt.convert(Block(16).to(DEV))
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours.bn1, bt.BatchNorm2d)
    x = batch((8, 16, 12, 12), torch.float32)
    for train in (True, False):
        ref.train(train), ours.train(train)
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        close(f"y (train={train})", yo, yr, 1e-4)
        yr.sum().backward(), yo.sum().backward()
        close(f"dx (train={train})", xo.grad, xr.grad, 1e-3)
        close(f"conv1 grad (train={train})", ours.conv1.weight.grad, ref.conv1.weight.grad, 1e-3)


def test_a_module_applied_twice_in_one_graph():
    # each application keeps its own statistics for its backward (two steps alive at once,
    # their buffers then reused by the steps after)
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 12)
    for step in range(3):
        x1, x2 = batch((6, 12, 5, 5), torch.float32, seed=step), batch((6, 12, 5, 5), torch.float32, seed=10 + step)
        xs_r = [x1.clone().requires_grad_(), x2.clone().requires_grad_()]
        xs_o = [x1.clone().requires_grad_(), x2.clone().requires_grad_()]
        ref.zero_grad(), ours.zero_grad()
        (ref(xs_r[0]) * ref(xs_r[1] * 2)).sum().backward()
        (ours(xs_o[0]) * ours(xs_o[1] * 2)).sum().backward()
        for k in range(2):
            close(f"dx{k} step {step}", xs_o[k].grad, xs_r[k].grad, 1e-4)
        close("dweight", ours.weight.grad, ref.weight.grad, 1e-4)
        close("running_var", ours.running_var, ref.running_var, 1e-5)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 6


def test_half_modules_through_float32_copies():
    # a module converted with .half(): its parameters and buffers are float16, read through
    # float32 copies and the new running statistics written back in float16
    ref, ours = pair(torch.nn.BatchNorm2d, bt.BatchNorm2d, 8)
    ref.half(), ours.half()
    for step in range(2):
        x = batch((6, 8, 5, 5), torch.float16, seed=step)
        close(f"y step {step}", ours(x), ref(x), 3e-3)
        assert ours.running_mean.dtype == torch.float16
        close("running_mean", ours.running_mean, ref.running_mean, 1e-3)
        close("running_var", ours.running_var, ref.running_var, 1e-3)
    assert ours.num_batches_tracked.item() == 2


def test_parameters_on_another_device_are_refused():
    ours = bt.BatchNorm2d(4)  # left on the CPU
    x = torch.randn(3, 4, 5, 5, device=DEV)
    with pytest.raises(bnorm.Error) as err:
        ours(x)
    assert err.value.kind == "WrongDevice"
    assert ours.num_batches_tracked.item() == 0
    ours.to(DEV)
    ours(x)  # checked again once the addresses change
    assert ours.num_batches_tracked.item() == 1
