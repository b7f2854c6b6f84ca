"""Writes the Flax msgpack fixtures of bnorm-interop's Flax reader and the values Flax
reported for them (expected.json).

Run by hand (CI does not have the frameworks), from this folder:

    python3 -m venv /work/venv-flaxonnx
    /work/venv-flaxonnx/bin/pip install flax==0.12.8 'jax[cpu]==0.10.2' numpy==2.4.6 optax==0.2.8
    /work/venv-flaxonnx/bin/python make_flax.py

Files (each written by `flax.serialization.to_bytes`):

* linen_init.msgpack: the variables of a linen CNN with three BatchNorm layers (one
  plain, one with use_scale=False, one with use_bias=False), as initialized (never
  updated): {'params': ..., 'batch_stats': ...}.
* linen_trained.msgpack: the same model after three training steps with
  mutable=['batch_stats'], stored as a TrainState-like dict {'step', 'params',
  'batch_stats', 'opt_state'} nested under {'state': ...}.
* linen_partitioned.msgpack: a Dense -> BatchNorm model whose scale and bias are
  partitioned (nn.with_partitioning: saved as {'value': array} boxes), after one
  training-mode call.
* nnx_pure.msgpack: an NNX model's state as a pure dict (nnx.to_pure_dict) after two
  training-mode calls.
* nnx_value_leaves.msgpack: the same NNX state with every variable as a {'value': array}
  dict (the layout of older NNX state dicts; Flax 0.12 refuses to serialize an nnx.State
  directly).
"""

import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx
from flax.serialization import to_bytes, to_state_dict


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = nn.Conv(3, (3, 3))(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3)(x)
        x = nn.relu(x)
        x = nn.Conv(2, (1, 1))(x)
        x = nn.BatchNorm(use_running_average=not train, use_scale=False)(x)
        return x


class Cnn(nn.Module):
    @nn.compact
    def __call__(self, x, train):
        x = Block()(x, train)
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(4)(x)
        x = nn.BatchNorm(use_running_average=not train, use_bias=False, name="head_bn")(x)
        return x


def linen_layers(variables):
    """{prefix: {scale?, bias?, mean, var}} as Flax stores them."""
    out = {}
    def walk(stats, params, path):
        for k, v in stats.items():
            p = path + [k]
            if "mean" in v:
                entry = {"mean": np.asarray(v["mean"]).tolist(), "var": np.asarray(v["var"]).tolist()}
                pv = params
                for s in p:
                    pv = pv.get(s, {}) if isinstance(pv, dict) else {}
                for leaf in ("scale", "bias"):
                    if leaf in pv:
                        entry[leaf] = np.asarray(pv[leaf]).tolist()
                out["/".join(p)] = entry
            else:
                walk(v, params, p)
    walk(to_state_dict(variables["batch_stats"]), to_state_dict(variables["params"]), [])
    return out


def main():
    rng = jax.random.PRNGKey(0)
    x = jax.random.normal(rng, (4, 5, 5, 2))
    model = Cnn()
    variables = model.init(rng, x, train=False)
    expected = {"versions": {"flax": flax.__version__, "jax": jax.__version__, "numpy": np.__version__}}
    with open("linen_init.msgpack", "wb") as f:
        f.write(to_bytes(variables))
    expected["linen_init.msgpack"] = {"layers": linen_layers(variables)}

    params, batch_stats = variables["params"], variables["batch_stats"]
    tx = optax.sgd(0.1)
    opt_state = tx.init(params)

    def loss_fn(params, batch_stats, xb):
        y, upd = model.apply({"params": params, "batch_stats": batch_stats}, xb, train=True,
                             mutable=["batch_stats"])
        return jnp.mean(y ** 2), upd["batch_stats"]

    for step in range(3):
        xb = jax.random.normal(jax.random.PRNGKey(step + 1), (4, 5, 5, 2)) * 2.0 + 0.5
        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, xb)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
    state = {"state": {"step": np.int64(3), "params": params, "batch_stats": batch_stats,
                       "opt_state": opt_state}}
    with open("linen_trained.msgpack", "wb") as f:
        f.write(to_bytes(state))
    expected["linen_trained.msgpack"] = {
        "layers": linen_layers({"params": params, "batch_stats": batch_stats})}

    # Partitioned (boxed) scale and bias: saved as {'value': array} dicts.
    class Part(nn.Module):
        @nn.compact
        def __call__(self, x, train):
            x = nn.Dense(3)(x)
            return nn.BatchNorm(
                use_running_average=not train,
                scale_init=nn.with_partitioning(nn.initializers.ones, ("c",)),
                bias_init=nn.with_partitioning(nn.initializers.zeros, ("c",)), name="bn")(x)

    part = Part()
    xp = jax.random.normal(jax.random.PRNGKey(5), (6, 4)) + 2.0
    pvars = part.init(rng, xp, train=False)
    _, upd = part.apply(pvars, xp, train=True, mutable=["batch_stats"])
    pvars = {"params": pvars["params"], "batch_stats": upd["batch_stats"]}
    with open("linen_partitioned.msgpack", "wb") as f:
        f.write(to_bytes(pvars))
    expected["linen_partitioned.msgpack"] = {"layers": linen_layers(nn.unbox(pvars))}

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, 3, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(3, momentum=0.8, epsilon=1e-4, rngs=rngs)
            self.blocks = nnx.List([nnx.BatchNorm(3, use_bias=False, rngs=rngs)]) if hasattr(nnx, "List") else [nnx.BatchNorm(3, use_bias=False, rngs=rngs)]

        def __call__(self, x):
            return self.blocks[0](self.bn1(self.conv(x)))

    net = Net(nnx.Rngs(0))
    net.train()
    for step in range(2):
        net(jax.random.normal(jax.random.PRNGKey(10 + step), (4, 5, 5, 2)) + 1.0)
    state = nnx.state(net)
    pure = nnx.to_pure_dict(state)
    with open("nnx_pure.msgpack", "wb") as f:
        f.write(to_bytes(pure))
    nnx_layers = {}
    for path, mod in [("bn1", net.bn1), ("blocks/0", net.blocks[0])]:
        entry = {"mean": np.asarray(mod.mean[...]).tolist(), "var": np.asarray(mod.var[...]).tolist()}
        if mod.scale is not None:
            entry["scale"] = np.asarray(mod.scale[...]).tolist()
        if mod.bias is not None:
            entry["bias"] = np.asarray(mod.bias[...]).tolist()
        nnx_layers[path] = entry
    expected["nnx_pure.msgpack"] = {"layers": nnx_layers}
    # Flax 0.12 cannot serialize an nnx.State itself ("can not serialize 'State'
    # object"); older NNX checkpoints (and orbax ones) kept each variable as a
    # {'value': array} dict: the same state in that layout.
    wrapped = jax.tree.map(lambda v: {"value": v}, pure)
    with open("nnx_value_leaves.msgpack", "wb") as f:
        f.write(to_bytes(wrapped))
    expected["nnx_value_leaves.msgpack"] = {"layers": nnx_layers}
    with open("expected.json", "w") as f:
        json.dump(expected, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    main()
