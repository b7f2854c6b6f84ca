"""Writes the seed corpus of the `read_torch` fuzz target (corpus/read_torch/): the real
torch.save fixtures of tests/data/torch (seed-*) and a handful of mutations of them
(mut-*), leaving the fuzz-* inputs sampled from recorded runs: a cut pickle, a cut storage, a big-endian byteorder, a forbidden global swapped
in, a stride of 0, a huge storage size, a deflated zip.

    python3 make_torch_seeds.py   # standard library only
"""
import io
import os
import shutil
import zipfile

src = "../tests/data/torch"
out = "corpus/read_torch"
os.makedirs(out, exist_ok=True)
for name in os.listdir(out):  # the fuzz-* inputs of recorded runs stay
    if name.startswith(("seed-", "mut-")):
        os.remove(os.path.join(out, name))
for name in sorted(os.listdir(src)):
    if name.endswith(".pt"):
        shutil.copy(os.path.join(src, name), os.path.join(out, "seed-" + name[:-3]))


def entries(name):
    with zipfile.ZipFile(os.path.join(src, name)) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def write(name, items, method=zipfile.ZIP_STORED):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", method) as z:
        for n, b in items:
            z.writestr(n, b)
    with open(os.path.join(out, "mut-" + name), "wb") as f:
        f.write(buf.getvalue())


def mutate(name, fn, method=zipfile.ZIP_STORED, base="lone_bn.pt"):
    write(name, [(n, fn(n, b)) for n, b in entries(base)], method)


pkl = lambda f: (lambda n, b: f(b) if n.endswith("data.pkl") else b)
mutate("cut_pickle", pkl(lambda b: b[: len(b) // 2]))
mutate("cut_storage", lambda n, b: b[:5] if n.endswith("data/2") else b)
mutate("big_endian", lambda n, b: b"big" if n.endswith("byteorder") else b)
mutate("byteorder_odd", lambda n, b: b"middle" if n.endswith("byteorder") else b)
mutate("forbidden", pkl(lambda b: b.replace(b"collections\nOrderedDict", b"posix\nsystem\n\nOrderedDict")))
mutate("stride0", pkl(lambda b: b.replace(b"K\x01\x85", b"K\x00\x85", 1).replace(b"K\x03\x85", b"K\xff\x85", 1)))
mutate("huge_numel", pkl(lambda b: b.replace(b"K\x03t", b"J\xff\xff\xff\x7ft", 1)))
mutate("deflated", lambda n, b: b, zipfile.ZIP_DEFLATED, base="views.pt")
write("no_storage", [(n, b) for n, b in entries("views.pt") if "/data/" not in n])
