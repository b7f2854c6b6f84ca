"""Writes the ONNX fixtures of bnorm-interop's ONNX reader and the values the onnx package
(and PyTorch) reported for them (expected.json).

Run by hand (CI does not have the frameworks), from this folder:

    python3 -m venv /work/venv-flaxonnx
    /work/venv-flaxonnx/bin/pip install onnx==1.23.2 numpy==2.4.6 torch==2.15.0 onnxscript
    /work/venv-flaxonnx/bin/python make_onnx.py

Files:

* helper_bn.onnx: built with onnx.helper: BatchNormalization nodes with custom epsilon and
  momentum ("bn_a"), the defaults ("bn_b", float_data instead of raw_data), an unnamed
  node (prefix from its scale initializer "blk.norm.weight"), one whose inputs are Constant
  nodes ("bn_const"), one with training_mode=1 ("bn_train", three outputs) and a float64
  one ("bn_f64"); plus a Conv weight initializer that is not batch norm.
* external_bn.onnx: helper_bn.onnx saved with its tensors as external data (the data file
  is deleted: the reader refuses such a model with a clear error).
* torch_bn.onnx (when torch imports): a small torch model (Conv2d -> BatchNorm2d ->
  Flatten -> Linear -> BatchNorm1d) after a few training steps, exported in eval mode with
  do_constant_folding=False so the BatchNormalization nodes survive; torch_bn_train.onnx
  the same model exported with training=TrainingMode.TRAINING (training_mode=1 nodes).
  PyTorch's own values (eps, momentum, running statistics) are in expected.json too.
"""

import json
import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def f32(*v):
    return np.array(v, dtype=np.float32)


def main():
    expected = {"versions": {"onnx": onnx.__version__, "numpy": np.__version__}}
    inits, nodes = [], []
    rng = np.random.default_rng(0)

    def init(name, arr, raw=True):
        if raw:
            t = numpy_helper.from_array(arr, name)
        else:
            t = helper.make_tensor(name, TensorProto.FLOAT, arr.shape, arr.flatten().tolist())
        inits.append(t)
        return name

    def bn_inits(p, c, dtype=np.float32, raw=True):
        names = []
        for leaf, arr in [("weight", rng.uniform(0.5, 1.5, c)), ("bias", rng.normal(0, 0.1, c)),
                          ("mean", rng.normal(0, 1, c)), ("var", rng.uniform(0.2, 3, c))]:
            names.append(init(f"{p}.{leaf}", arr.astype(dtype), raw))
        return names

    conv_w = rng.normal(0, 0.3, (3, 2, 3, 3)).astype(np.float32)
    init("conv.weight", conv_w)
    nodes.append(helper.make_node("Conv", ["x", "conv.weight"], ["c"], name="conv"))
    nodes.append(helper.make_node("BatchNormalization", ["c"] + bn_inits("a", 3), ["y_a"],
                                  name="bn_a", epsilon=1e-3, momentum=0.99))
    nodes.append(helper.make_node("BatchNormalization", ["y_a"] + bn_inits("b", 3, raw=False),
                                  ["y_b"], name="bn_b"))
    nodes.append(helper.make_node("BatchNormalization", ["y_b"] + bn_inits("blk.norm", 3),
                                  ["y_c"], epsilon=2e-5))
    consts = []
    for leaf, arr in [("scale", f32(1.5, 0.5, 2.0)), ("bias", f32(0.1, -0.2, 0.3)),
                      ("mean", f32(0.25, -0.5, 1.0)), ("var", f32(4.0, 0.25, 1.0))]:
        out = f"const_{leaf}"
        nodes.append(helper.make_node("Constant", [], [out], name=f"Constant_{leaf}",
                                      value=numpy_helper.from_array(arr, f"const_{leaf}_value")))
        consts.append(out)
    nodes.append(helper.make_node("BatchNormalization", ["y_c"] + consts, ["y_d"],
                                  name="bn_const", epsilon=1e-4, momentum=0.8))
    nodes.append(helper.make_node("BatchNormalization", ["y_d"] + bn_inits("t", 3),
                                  ["y_e", "t_rm", "t_rv"], name="bn_train", training_mode=1,
                                  momentum=0.95))
    nodes.append(helper.make_node("Cast", ["y_e"], ["y_e64"], to=TensorProto.DOUBLE))
    nodes.append(helper.make_node("BatchNormalization", ["y_e64"] + bn_inits("d", 3, np.float64),
                                  ["y"], name="bn_f64", epsilon=1e-6))
    graph = helper.make_graph(
        nodes, "bn_graph",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [1, 3, 4, 4])], initializer=inits)
    model = helper.make_model(graph, producer_name="bnorm-make_onnx",
                              opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    onnx.save(model, "helper_bn.onnx")
    expected["helper_bn.onnx"] = describe(model)
    # The same model with its tensors in a separate file (which is not kept: the reader
    # must refuse before it would need it).
    onnx.save_model(model, "external_bn.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="external_bn.data",
                    size_threshold=0)
    os.remove("external_bn.data")

    try:
        import torch
    except ImportError as e:
        expected["torch_bn.onnx"] = {"skipped": repr(e)}
    else:
        expected["versions"]["torch"] = torch.__version__
        expected["torch_bn.onnx"] = torch_export(torch)
    with open("expected.json", "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


def describe(model):
    """Each BatchNormalization node: its name, attributes (ONNX defaults when absent) and
    the four parameter tensors as onnx.numpy_helper.to_array gives them."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            values[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    out = {"producer_name": model.producer_name, "nodes": []}
    for n in model.graph.node:
        if n.op_type != "BatchNormalization":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        entry = {"name": n.name, "inputs": list(n.input), "outputs": list(n.output),
                 "epsilon": attrs.get("epsilon", 1e-5), "momentum": attrs.get("momentum", 0.9),
                 "training_mode": attrs.get("training_mode", 0)}
        for leaf, inp in zip(["scale", "B", "input_mean", "input_var"], n.input[1:5]):
            arr = values[inp]
            entry[leaf] = arr.tolist()
            entry["dtype"] = str(arr.dtype)
        out["nodes"].append(entry)
    return out


def torch_export(torch):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3, eps=1e-3, momentum=0.2),
        torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 4), torch.nn.BatchNorm1d(4))
    model.train()
    for _ in range(3):
        model(torch.randn(8, 2, 6, 6) * 2 + 1)
    model.eval()
    torch.onnx.export(model, (torch.randn(1, 2, 6, 6),), "torch_bn.onnx", dynamo=False,
                      do_constant_folding=False, input_names=["x"], output_names=["y"])
    m = onnx.load("torch_bn.onnx")
    bn = [n for n in m.graph.node if n.op_type == "BatchNormalization"]
    assert len(bn) == 2, [n.op_type for n in m.graph.node]
    out = describe(m)
    out["torch_modules"] = {
        name: {"eps": mod.eps, "momentum": mod.momentum,
               "running_var": mod.running_var.tolist(), "running_mean": mod.running_mean.tolist()}
        for name, mod in model.named_modules() if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm)}
    # Training mode: BatchNormalization nodes with training_mode=1 (and running outputs).
    torch.onnx.export(model, (torch.randn(2, 2, 6, 6),), "torch_bn_train.onnx", dynamo=False,
                      training=torch.onnx.TrainingMode.TRAINING, do_constant_folding=False,
                      input_names=["x"], output_names=["y"])
    model.eval()
    out["train_export"] = describe(onnx.load("torch_bn_train.onnx"))
    return out


if __name__ == "__main__":
    main()
