"""``python -m bnorm``: the command-line tool's own code through the package -- its exit
statuses, conformance replay, and ``fold``/``inspect`` on a checkpoint written by torch,
checked against torch's own arithmetic."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import CASES, read_safetensors


def bnorm_cli(*args):
    return subprocess.run([sys.executable, "-m", "bnorm", *map(str, args)],
                          capture_output=True, text=True, timeout=300)


def test_help_and_usage_errors():
    r = bnorm_cli("--help")
    assert r.returncode == 0
    for command in ("inspect", "fold", "convert", "conformance"):
        assert command in r.stdout
    r = bnorm_cli("frobnicate")
    assert r.returncode == 2 and "frobnicate" in r.stderr


def test_conformance_replay():
    r = bnorm_cli("conformance", CASES)
    assert r.returncode == 0, r.stdout + r.stderr
    n = len(list(CASES.glob("*.safetensors")))
    assert r.stdout.strip().splitlines()[-1] == f"{n} passed, 0 failed"


def test_unreadable_checkpoint(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    r = bnorm_cli("inspect", bad)
    assert r.returncode == 2 and r.stderr.startswith("bnorm: ")


@pytest.fixture
def trained(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=True), torch.nn.BatchNorm2d(4))
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 2 + 1)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    return model.eval(), path


def test_inspect_a_torch_checkpoint(trained):
    model, path = trained
    r = bnorm_cli("inspect", path, "--json")
    assert r.returncode == 0, r.stderr
    layers = json.loads(r.stdout)
    assert [layer["name"] for layer in layers] == ["1"]
    assert layers[0]["channels"] == 4


def test_fold_matches_torch(trained, tmp_path):
    model, path = trained
    out = tmp_path / "folded.safetensors"
    r = bnorm_cli("fold", path, out, "--pairs", "0:1")
    assert r.returncode == 0, r.stderr
    _, t = read_safetensors(out)
    conv = torch.nn.Conv2d(3, 4, 3)
    with torch.no_grad():
        conv.weight.copy_(torch.from_numpy(t["0.weight"]))
        conv.bias.copy_(torch.from_numpy(t["0.bias"]))
    x = torch.randn(5, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(conv(x), model(x), rtol=1e-5, atol=1e-5)
