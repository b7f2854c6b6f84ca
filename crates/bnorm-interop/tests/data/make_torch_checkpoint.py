"""Writes a small real PyTorch checkpoint with batch-norm layers and PyTorch's own eval
outputs, for bnorm's interop tests (crates/bnorm/tests/interop.rs).

    pip install torch safetensors
    python3 make_torch_checkpoint.py   # writes torch_bn.safetensors, torch_bn_io.safetensors

torch_bn.safetensors    the model's state_dict (safetensors.torch.save_file)
torch_bn_io.safetensors for each batch-norm layer, its input `<bn>.x` and PyTorch's eval
                        output `<bn>.y`; and PyTorch's own conv1+bn1 fusion
                        (torch.nn.utils.fusion.fuse_conv_bn_weights) as `fused1.weight/bias`.
"""
import torch
from torch import nn
from safetensors.torch import save_file

torch.manual_seed(7)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)                              # defaults
        self.bn2 = nn.BatchNorm2d(4, track_running_stats=False)   # batch stats in eval too
        self.bn3 = nn.BatchNorm2d(4, affine=False, momentum=0.3)  # no gamma/beta
        self.fc = nn.Linear(4, 5)
        self.bn4 = nn.BatchNorm1d(5, eps=1e-3)                    # non-default eps

    def forward(self, x, record=None):
        def bn(name, layer, h):
            if record is not None:
                record[name + ".x"] = h.detach().clone()
            out = layer(h)
            if record is not None:
                record[name + ".y"] = out.detach().clone()
            return out

        h = bn("bn1", self.bn1, self.conv1(x))
        h = torch.relu(h)
        h = bn("bn2", self.bn2, h)
        h = bn("bn3", self.bn3, h)
        h = h.mean(dim=(2, 3))
        return bn("bn4", self.bn4, self.fc(h))


net = Net()
opt = torch.optim.SGD(net.parameters(), lr=0.1)
net.train()
for step in range(5):
    x = torch.randn(8, 3, 6, 6) * 2.0 + 0.5
    loss = (net(x) - 1.0).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()

net.eval()
state = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
save_file(state, "torch_bn.safetensors", metadata={"format": "pt"})

record = {}
with torch.no_grad():
    x = torch.randn(3, 3, 6, 6) * 2.0 + 0.5
    net(x, record)
    w, b = torch.nn.utils.fusion.fuse_conv_bn_weights(
        net.conv1.weight, net.conv1.bias, net.bn1.running_mean, net.bn1.running_var,
        net.bn1.eps, net.bn1.weight, net.bn1.bias)
record["fused1.weight"] = w.detach().contiguous()
record["fused1.bias"] = b.detach().contiguous()
record = {k: v.contiguous() for k, v in record.items()}
save_file(record, "torch_bn_io.safetensors",
          metadata={"torch": torch.__version__, "note": "eval outputs of each batch-norm layer"})
print(sorted(state), torch.__version__)
