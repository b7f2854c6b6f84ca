"""Writes real torch.save files for bnorm's PyTorch reader tests
(crates/bnorm-interop/tests/read_torch.rs), and expected.json: what torch itself reports
about every batch-norm layer and tensor it saved.

    python3 -m venv /work/venv-torch
    /work/venv-torch/bin/pip install torch==2.15.0 numpy   # (2.15.0+cu132 wheel from PyPI)
    cd crates/bnorm-interop/tests/data/torch
    /work/venv-torch/bin/python make_torch.py

Written on 2026-12-03 with Python 3.11.7, torch 2.15.0 (CPU only used).

Files (all torch.save of the default zip format unless said otherwise):
  trained.pt      model.state_dict() after 3 SGD steps in .train(): BatchNorm1d/2d/3d with
                  defaults, non-default eps, momentum=None (cumulative), momentum=0.3,
                  affine=False, track_running_stats=False, and one nested in a Sequential
  untrained.pt    the same model never trained (statistics at their initial values)
  checkpoint.pt   {'model': sd, 'optimizer': Adam.state_dict(), 'epoch': 3, 'loss': 0.5}
  dataparallel.pt nn.DataParallel(model).state_dict() (every name starts with `module.`)
  compiled.pt     torch.compile(model).state_dict() (every name starts with `_orig_mod.`)
  half.pt         model.half().state_dict()
  lone_bn.pt      a lone nn.BatchNorm2d(3)'s state_dict (names without a prefix)
  protocol4.pt    trained.pt's dict saved with pickle_protocol=4 (FRAME, MEMOIZE, ...)
  views.pt        tensors that are views: a transpose (strided) and a row (offset) of one
                  storage, besides a batch norm
  forbidden.pt    {'x': os.system}: a pickle that calls something a state dict never needs
  full_model.pt   torch.save(lone) of a whole nn.BatchNorm2d module (not its state_dict):
                  the pickle rebuilds torch.nn.modules.batchnorm.BatchNorm2d, refused
  legacy.pt       trained.pt's dict with _use_new_zipfile_serialization=False (pre-1.6)
"""
import json
import os
import platform

import torch
from torch import nn

torch.manual_seed(3)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bn_default = nn.BatchNorm2d(4)
        self.bn_cumulative = nn.BatchNorm2d(4, momentum=None)
        self.bn_noaffine = nn.BatchNorm2d(4, affine=False, eps=1e-3)
        self.bn_nostats = nn.BatchNorm2d(4, track_running_stats=False)
        self.block = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2, eps=1e-4))
        self.fc = nn.Linear(2, 3)
        self.bn1d = nn.BatchNorm1d(3, eps=1e-4, momentum=0.3)
        self.bn3d = nn.BatchNorm3d(2, eps=2e-5)

    def forward(self, x, x3):
        h = self.bn_default(self.conv(x))
        h = self.bn_cumulative(h)
        h = self.bn_noaffine(h)
        h = self.bn_nostats(h)
        h = self.block(h)
        h = self.bn1d(self.fc(h.mean(dim=(2, 3))))
        return h.square().mean() + self.bn3d(x3).square().mean()


def train(model, steps):
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        x = torch.randn(4, 3, 3, 3) * 2.0 + 0.5
        x3 = torch.randn(3, 2, 2, 2, 2) * 0.5 - 1.0
        opt.zero_grad()
        model(x, x3).backward()
        opt.step()
    return opt


def layers(model, strip=""):
    """What torch says about each batch-norm layer."""
    out = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        d = {
            "name": name[len(strip):] if name.startswith(strip) else name,
            "kind": type(m).__name__,
            "channels": m.num_features,
            "eps": m.eps,
            "momentum": m.momentum,
            "affine": m.affine,
            "track_running_stats": m.track_running_stats,
        }
        for attr in ["weight", "bias", "running_mean", "running_var"]:
            t = getattr(m, attr)
            d[attr] = None if t is None else t.detach().double().tolist()
        nbt = m.num_batches_tracked
        d["num_batches_tracked"] = None if nbt is None else int(nbt)
        out.append(d)
    return out


def tensors(sd):
    return {
        k: {"dtype": str(v.dtype), "shape": list(v.shape), "values": v.double().flatten().tolist()}
        for k, v in sd.items()
    }


expected = {
    "generator": "make_torch.py",
    "python": platform.python_version(),
    "torch": torch.__version__,
    "files": {},
}


def save(name, obj, report, **kw):
    torch.save(obj, name, **kw)
    expected["files"][name] = report
    print(name, os.path.getsize(name), "bytes")


model = Net()
untrained = Net()
untrained.load_state_dict(model.state_dict())
opt = train(model, 3)
model.eval()
sd = model.state_dict()

save("trained.pt", sd, {"layers": layers(model), "tensors": tensors(sd)})
save("untrained.pt", untrained.state_dict(),
     {"layers": layers(untrained), "tensors": tensors(untrained.state_dict())})
save("checkpoint.pt", {"model": sd, "optimizer": opt.state_dict(), "epoch": 3, "loss": 0.5},
     {"layers_as": "trained.pt", "tensors_as": "trained.pt",
      "optimizer_state_keys": sorted(str(k) for k in opt.state_dict()["state"])})

dp = nn.DataParallel(model)
dp_sd = dp.state_dict()
assert all(k.startswith("module.") for k in dp_sd)
save("dataparallel.pt", dp_sd, {"layers_as": "trained.pt", "tensors_as": "trained.pt",
                                "saved_names": list(dp_sd)})

compiled = torch.compile(model)
c_sd = compiled.state_dict()
assert all(k.startswith("_orig_mod.") for k in c_sd)
save("compiled.pt", c_sd, {"layers_as": "trained.pt", "tensors_as": "trained.pt",
                           "saved_names": list(c_sd)})

half = Net()
half.load_state_dict(sd)
half = half.half().eval()
save("half.pt", half.state_dict(), {"layers": layers(half), "tensors": tensors(half.state_dict())})

torch.manual_seed(5)
lone = nn.BatchNorm2d(3)
lone.train()
for _ in range(2):
    lone(torch.randn(2, 3, 2, 2) + 1.0)
lone.eval()
save("lone_bn.pt", lone.state_dict(), {"layers": layers(lone), "tensors": tensors(lone.state_dict())})

save("protocol4.pt", sd, {"layers_as": "trained.pt", "tensors_as": "trained.pt"},
     pickle_protocol=4)

base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
views = {
    "bn.weight": torch.tensor([1.5, 2.5]),
    "bn.bias": torch.tensor([-0.5, 0.25]),
    "bn.running_mean": torch.tensor([0.125, -2.0]),
    "bn.running_var": torch.tensor([4.0, 0.5]),
    "bn.num_batches_tracked": torch.tensor(7),
    "transposed": base.t(),
    "row": base[1],
}
assert not views["transposed"].is_contiguous() and views["row"].storage_offset() == 4
save("views.pt", views, {"tensors": tensors(views)})

save("forbidden.pt", {"x": os.system}, {"refused_global": "posix.system"})

save("full_model.pt", lone,
     {"refused_global": "torch.nn.modules.batchnorm.BatchNorm2d"})

save("legacy.pt", sd, {"legacy": True}, _use_new_zipfile_serialization=False)

with open("expected.json", "w") as f:
    json.dump(expected, f, separators=(",", ":"))
    f.write("\n")
