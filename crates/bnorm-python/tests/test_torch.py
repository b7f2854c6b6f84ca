"""bnorm.torch against torch.nn.BatchNorm1d/2d/3d: outputs, gradients, running statistics
and num_batches_tracked over multi-step train/eval sequences in every mode, layout and
dtype; gradcheck; state_dict round trips; convert; bad input."""

import copy
import itertools

import pytest
import torch

import bnorm
import bnorm.torch as bt

# Tolerances per dtype, as |got - want| <= atol + rtol*|want| on values of order 1 (the
# inputs are standard normal, so outputs, dx, running statistics are O(1); dweight and
# dbias are sums over m values and get their own scale below).
#  * f64: both libraries compute statistics in f64 (torch's CPU kernel accumulates in
#    double); they differ in summation order only: ~1e-15 relative; 1e-12 leaves room.
#  * f32: torch computes the statistics in double and the affine map in float; bnorm the
#    statistics in f64 and the map in f32 with the mean split in two parts: a few f32
#    ulps (6e-8 relative) apart; 2e-6 is ~30 ulps.
#  * f16 / bf16: both round a float result to the storage type; where the two float
#    results straddle a rounding boundary they differ by one ulp (f16: 2^-11 relative,
#    bf16: 2^-8), so the tolerance is 2 ulps of the storage type.
TOL = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (2 * 2.0**-10, 2 * 2.0**-10),
    torch.bfloat16: (2 * 2.0**-7, 2 * 2.0**-7),
}
CLASSES = {2: (torch.nn.BatchNorm1d, bt.BatchNorm1d), 3: (torch.nn.BatchNorm1d, bt.BatchNorm1d),
           4: (torch.nn.BatchNorm2d, bt.BatchNorm2d), 5: (torch.nn.BatchNorm3d, bt.BatchNorm3d)}
SHAPES = {2: (16, 5), 3: (4, 5, 7), 4: (3, 5, 4, 6), 5: (2, 5, 3, 4, 3)}
FORMATS = {2: [None], 3: [None], 4: [None, torch.channels_last], 5: [None, torch.channels_last_3d]}


def close(name, got, want, dtype, scale=1.0):
    rtol, atol = TOL[dtype]
    assert got.dtype == want.dtype, name
    got, want = got.double(), want.double()
    err = (got - want).abs() - rtol * want.abs()
    assert (err <= atol * scale).all(), f"{name}: worst excess {err.max().item():.3g}"


def pair(dims, dtype, **kw):
    torch_cls, bnorm_cls = CLASSES[dims]
    ref = torch_cls(5, **kw)
    ours = bnorm_cls(5, **kw)
    with torch.no_grad():
        if ref.weight is not None:
            ref.weight.uniform_(0.5, 1.5)
            ref.bias.uniform_(-0.5, 0.5)
        if ref.running_mean is not None:
            ref.running_mean.uniform_(-1, 1)
            ref.running_var.uniform_(0.5, 2)
    ours.load_state_dict(ref.state_dict())
    return ref.to(dtype), ours.to(dtype)


MODES = [
    dict(),
    dict(momentum=None),
    dict(momentum=0.3, affine=False),
    dict(track_running_stats=False),
    dict(momentum=None, track_running_stats=False, affine=False),
]


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("settings", MODES, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()) or "default")
@pytest.mark.parametrize("dims,fmt", [(d, f) for d in SHAPES for f in FORMATS[d]],
                         ids=lambda v: str(v))
def test_sequence_matches_torch(dims, fmt, settings, dtype):
    torch.manual_seed(dims * 7 + len(settings))
    ref, ours = pair(dims, dtype, **settings)
    sequence = ["train", "train", "eval", "train", "eval", "train"]
    m = torch.Size(SHAPES[dims]).numel() // 5
    for k, mode in enumerate(sequence):
        x = (torch.randn(SHAPES[dims], dtype=torch.float64) * 2 + 0.5).to(dtype)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
        dy = torch.randn(SHAPES[dims], dtype=torch.float64).to(dtype)
        for mod in (ref, ours):
            mod.train(mode == "train")
            mod.zero_grad()
        xr, xo = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yo = ref(xr), ours(xo)
        if fmt is not None:
            assert yo.is_contiguous(memory_format=fmt), "the output keeps the memory format"
        close(f"step {k} y", yo, yr, dtype)
        yr.backward(dy)
        yo.backward(dy)
        close(f"step {k} dx", xo.grad, xr.grad, dtype)
        if ref.weight is not None:
            # sums over m values of O(1) terms: the per-term rounding adds up to ~sqrt(m)
            close(f"step {k} dweight", ours.weight.grad, ref.weight.grad, dtype, m**0.5)
            close(f"step {k} dbias", ours.bias.grad, ref.bias.grad, dtype, m**0.5)
        if ref.running_mean is not None:
            close(f"step {k} running_mean", ours.running_mean, ref.running_mean, dtype)
            close(f"step {k} running_var", ours.running_var, ref.running_var, dtype)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        else:
            assert ours.running_mean is None


@pytest.mark.parametrize("training,settings", [
    (True, dict()), (False, dict()), (True, dict(affine=False)),
    (False, dict(track_running_stats=False)),
])
@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=str)
def test_gradcheck_float64(training, settings, fmt):
    torch.manual_seed(3)
    bn = bt.BatchNorm2d(3, **settings).double().train(training)
    if bn.weight is not None:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64)
    if fmt is not None:
        x = x.contiguous(memory_format=fmt)
    x.requires_grad_()
    inputs = (x,) if bn.weight is None else (x, bn.weight, bn.bias)

    def f(*args):
        return bt._Function.apply(args[0], *(args[1:] if len(args) > 1 else (None, None)), bn, False)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8, rtol=1e-6)


def test_state_dict_round_trips():
    torch.manual_seed(5)
    ref = torch.nn.BatchNorm2d(4, momentum=None)
    for _ in range(3):
        ref(torch.randn(6, 4, 3, 3))
    ours = bt.BatchNorm2d(4, momentum=None)
    ours.load_state_dict(ref.state_dict())  # torch -> bnorm, strict
    x = torch.randn(6, 4, 3, 3)
    ours(x), ref(x)
    back = torch.nn.BatchNorm2d(4, momentum=None)
    back.load_state_dict(ours.state_dict())  # bnorm -> torch, strict
    assert list(ours.state_dict()) == list(ref.state_dict())
    for name, value in back.state_dict().items():
        close(name, value.float() if value.is_floating_point() else value.float(),
              ref.state_dict()[name].float(), torch.float32)
    assert int(back.num_batches_tracked) == 4


class Block(torch.nn.Module):
    """A ResNet basic block: conv-bn-relu-conv-bn plus the identity, then relu."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = torch.nn.BatchNorm2d(c)

    def forward(self, x):
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + x)


@pytest.mark.parametrize("fmt", [None, torch.channels_last], ids=str)
def test_convert_resnet_block(fmt):
    torch.manual_seed(11)
    ref = torch.nn.Sequential(Block(8), Block(8), torch.nn.Flatten(), torch.nn.LazyLinear(3))
    ref(torch.randn(2, 8, 6, 6))  # materialize the lazy layer
    ours = copy.deepcopy(ref)
    bn1 = ours[0].bn1
    assert bt.convert(ours) is ours
    assert ours[0].bn1 is bn1 and type(bn1) is bt.BatchNorm2d
    assert sum(isinstance(m, bt.BatchNorm2d) for m in ours.modules()) == 4
    # Differences are float32 rounding (bnorm's kernels and torch's round differently,
    # ~1e-7 relative) carried through 3 SGD steps: compared relative to each tensor's
    # largest magnitude with 1e-4.
    def near(name, a, b):
        a, b = a.double(), b.double()
        assert (a - b).abs().max() <= 1e-4 * max(a.abs().max(), 1e-3), name

    opt_r = torch.optim.SGD(ref.parameters(), lr=0.01)
    opt_o = torch.optim.SGD(ours.parameters(), lr=0.01)
    for step in range(3):
        x = torch.randn(4, 8, 6, 6)
        if fmt is not None:
            x = x.contiguous(memory_format=fmt)
            ref, ours = ref.to(memory_format=fmt), ours.to(memory_format=fmt)
        outs = []
        for model, opt in ((ref, opt_r), (ours, opt_o)):
            model.train()
            opt.zero_grad()
            y = model(x)
            y.square().mean().backward()
            outs.append(y.detach())
        near(f"step {step} output", *outs)
        for (name, p), q in zip(ref.named_parameters(), ours.parameters()):
            near(f"step {step} grad {name}", p.grad, q.grad)
        opt_r.step(), opt_o.step()
        for (name, a), b in zip(ref.state_dict().items(), ours.state_dict().values()):
            near(f"step {step} {name}", a, b)
    ref.eval(), ours.eval()
    x = torch.randn(5, 8, 6, 6)
    near("eval output", ref(x).detach(), ours(x).detach())


def unchanged(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def assert_same(module, before):
    for k, v in module.state_dict().items():
        same = v.equal(before[k]) if not v.is_floating_point() else torch.allclose(
            v, before[k], rtol=0, atol=0, equal_nan=True)
        assert same, f"{k} changed by a failed call"


def test_bad_input_raises_and_updates_nothing():
    bn = bt.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    before = unchanged(bn)
    cases = [
        (torch.randn(4, 5, 2, 2), "ChannelMismatch"),  # wrong channel count
        (torch.randn(1, 3, 1, 1), "BatchTooSmall"),  # one value per channel in training
        (torch.randn(4, 3, 2, 2).to(torch.int32), "DType"),
    ]
    for x, kind in cases:
        with pytest.raises(bnorm.Error) as err:
            bn(x)
        assert err.value.kind == kind, err.value
        assert isinstance(err.value, ValueError)
        assert_same(bn, before)
    with torch.no_grad():
        bn.weight[1] = float("nan")
    before = unchanged(bn)
    with pytest.raises(bnorm.Error) as err:
        bn(torch.randn(4, 3, 2, 2))
    assert err.value.kind == "NonFiniteParameter"
    assert_same(bn, before)


@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_running_statistics_are_written_in_place(dtype):
    """A training step writes the module's running statistics into the same buffers, on
    the same storage, as torch.nn does (float32/float64 buffers directly by the kernel,
    16-bit ones through a copy), holding torch's values; an evaluation step leaves them."""
    ref, ours = pair(4, dtype)
    buffers = (ours.running_mean, ours.running_var)
    storage = tuple(b.data_ptr() for b in buffers)
    x = torch.randn(*SHAPES[4]).to(dtype)
    for _ in range(2):
        ref(x)
        ours(x)
    assert ours.running_mean is buffers[0] and ours.running_var is buffers[1]
    assert tuple(b.data_ptr() for b in buffers) == storage
    close("running_mean", ours.running_mean, ref.running_mean, dtype)
    close("running_var", ours.running_var, ref.running_var, dtype)
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item() == 2
    ours.eval()
    before = [b.clone() for b in buffers]
    ours(x)
    assert all(torch.equal(a, b) for a, b in zip(before, buffers))


def test_wrong_rank_is_torchs_error():
    with pytest.raises(ValueError):
        bt.BatchNorm2d(3)(torch.randn(4, 3, 2))


def test_other_devices_get_a_clear_error():
    bn = bt.BatchNorm2d(3)
    x = torch.empty(4, 3, 2, 2, device="meta")
    with pytest.raises(bnorm.Error, match="CPU") as err:
        bn(x)
    assert err.value.kind == "Device"


def test_threads_setting():
    bnorm.set_num_threads(2)
    assert bnorm.get_num_threads() == 2
    assert bnorm.get_threading() == "rayon"
    bnorm.use_openmp()


def _train_step(x, dy):
    bn = bt.BatchNorm2d(x.shape[1])
    x = x.clone().requires_grad_()
    y = bn(x)
    y.backward(dy)
    return [t.detach().clone() for t in (y, x.grad, bn.weight.grad, bn.bias.grad,
                                         bn.running_mean, bn.running_var)]


def test_openmp_threads_give_the_same_bits():
    """bnorm's kernels on PyTorch's OpenMP team (what importing bnorm.torch chooses), on
    one OpenMP thread, and in bnorm's own pool give bitwise the same results."""
    path = bnorm.use_openmp()
    assert bnorm.get_threading() == "openmp:" + path
    torch.manual_seed(5)
    x = torch.randn(16, 8, 32, 32) * 3 + 1  # above the parallel threshold
    dy = torch.randn_like(x)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert bnorm.get_num_threads() == 2  # PyTorch's setting is the team's size
        team = _train_step(x, dy)
        torch.set_num_threads(1)
        assert bnorm.get_num_threads() == 1
        one = _train_step(x, dy)
    finally:
        torch.set_num_threads(before)
    bnorm.set_num_threads(2)
    own = _train_step(x, dy)
    bnorm.use_openmp()
    for a, b, c in zip(team, one, own):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_use_openmp_refuses_what_is_not_an_openmp_runtime():
    before = bnorm.get_threading()
    with pytest.raises(RuntimeError, match="no loaded shared object"):
        bnorm.use_openmp("libnothing.so.1")
    with pytest.raises(RuntimeError, match="not an OpenMP runtime"):
        bnorm.use_openmp("libc.so.6")
    assert bnorm.get_threading() == before


@pytest.mark.parametrize(
    "setup, env, want",
    [
        ("", {}, "openmp:"),
        ("", {"BNORM_THREADS": "own"}, "rayon"),
        ("bnorm.set_num_threads(2); ", {}, "rayon"),
    ],
)
def test_importing_the_drop_in_shares_pytorchs_threads(setup, env, want):
    import os
    import subprocess
    import sys

    code = f"import torch, bnorm; {setup}import bnorm.torch; print(bnorm.get_threading())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=os.environ | env, check=True).stdout
    assert out.startswith(want), out


def test_non_finite_batch_keeps_running_statistics():
    """Where bnorm departs from torch on purpose: torch writes NaN into the running
    statistics of a channel whose batch holds a NaN; bnorm keeps them and warns."""
    bn = bt.BatchNorm1d(2)
    x = torch.randn(8, 2)
    x[3, 1] = float("nan")
    with pytest.warns(RuntimeWarning, match=r"channels \[1\]"):
        y = bn(x)
    assert y[:, 1].isnan().all()
    assert bn.running_mean[1] == 0 and bn.running_var[1] == 1
    assert int(bn.num_batches_tracked) == 1


def test_changing_x_in_place_before_backward_is_an_error():
    for fmt in (torch.contiguous_format, torch.channels_last):
        bn = bt.BatchNorm2d(3)
        x = torch.randn(4, 3, 2, 2).contiguous(memory_format=fmt).requires_grad_()
        h = x * 1.0
        y = bn(h)
        with torch.no_grad():
            h.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


@pytest.mark.parametrize("dims,shape", [(1, (1, 3)), (1, (1, 3, 1)), (2, (1, 3, 1, 1)),
                                        (3, (1, 3, 1, 1, 1))])
def test_one_value_per_channel_is_refused_like_torch(dims, shape):
    """torch.nn.BatchNorm*d refuses a training batch of one value per channel ("Expected
    more than 1 value per channel when training", a ValueError); so does the drop-in
    (bnorm.Error, a ValueError, kind BatchTooSmall), changing nothing; in evaluation
    both normalize it with the running statistics."""
    ref = getattr(torch.nn, f"BatchNorm{dims}d")(3).double()
    ours = getattr(bt, f"BatchNorm{dims}d")(3).double()
    warm = torch.randn((4,) + shape[1:], dtype=torch.float64)
    ref(warm), ours(warm)
    x = torch.randn(shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        ref(x)
    before = unchanged(ours)
    with pytest.raises(bnorm.Error) as err:
        ours(x)
    assert err.value.kind == "BatchTooSmall"
    assert isinstance(err.value, ValueError)
    assert_same(ours, before)
    ref.eval(), ours.eval()
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-12, atol=1e-12)


def test_calls_without_gradients_match_torch():
    """Under no_grad / inference_mode, or with nothing requiring a gradient, the drop-in
    runs the bare step instead of its autograd.Function: outputs, running statistics and
    num_batches_tracked still equal torch's, in training and evaluation, with no autograd
    node; a call that needs gradients records one and delivers them."""
    torch.manual_seed(7)
    ref, ours = torch.nn.BatchNorm2d(5), bt.BatchNorm2d(5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 5, 4, 6)
    for ctx in (torch.no_grad, torch.inference_mode):
        for training in (True, False):
            ref.train(training)
            ours.train(training)
            with ctx():
                want, got = ref(x), ours(x)
            assert got.grad_fn is None
            close("y", got, want, torch.float32)
            close("running_mean", ours.running_mean, ref.running_mean, torch.float32)
            close("running_var", ours.running_var, ref.running_var, torch.float32)
            assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
    # frozen parameters on a constant input: nothing to differentiate either
    ours.weight.requires_grad_(False)
    ours.bias.requires_grad_(False)
    assert ours(x).grad_fn is None
    # a parameter that needs its gradient: an autograd node, and the gradient arrives
    ours.weight.requires_grad_(True)
    y = ours(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert ours.weight.grad is not None and ours.bias.grad is None


def test_parameter_changes_between_calls_are_seen():
    # the drop-in remembers NumPy views of a module's tensors between calls: every way of
    # changing them must show in the next call
    ref = torch.nn.BatchNorm2d(3)
    ours = bt.BatchNorm2d(3)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(4, 3, 2, 2)
    changes = [
        lambda m: m.weight.data.mul_(2.0),
        lambda m: setattr(m.weight, "data", torch.full((3,), 0.5)),
        lambda m: setattr(m, "bias", torch.nn.Parameter(torch.ones(3))),
        lambda m: m.running_mean.add_(1.0),
        lambda m: m.load_state_dict({**m.state_dict(), "running_var": torch.full((3,), 4.0)}),
        lambda m: m.double(),
    ]
    for train in (False, True):
        ref.train(train), ours.train(train)
        for k, change in enumerate(changes):
            with torch.no_grad():
                ours(x.to(ours.weight.dtype)), ref(x.to(ref.weight.dtype))  # views remembered
                change(ref), change(ours)
                xs = x.to(ref.weight.dtype)
                assert torch.allclose(ours(xs), ref(xs), atol=1e-6), (train, k)
            assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
        ref.float(), ours.float()
