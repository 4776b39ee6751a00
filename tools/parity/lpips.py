#!/usr/bin/env python3
"""Writes the LPIPS parity fixtures with the `lpips` package (tools/parity/requirements.txt).

Run from the repository root with the pinned venv:

    python tools/parity/lpips.py              # tests/fixtures/lpips/
    python tools/parity/lpips.py --full DIR   # full-width random models, not committed

(This file shares the package's name: it drops its own folder from sys.path
before `import lpips`.)

No pretrained weights are needed (none can be downloaded here): the models are
`lpips.LPIPS(pretrained=False, pnet_rand=True, net=...)` with random weights, and
for the committed fixture every backbone convolution and every linear head is
replaced by a narrower one (same kernel, stride and padding, fewer channels) so
the files stay small. The distances are the package's own `LPIPS.forward`
(version 0.1, normalize=False: inputs in [-1, 1]) run on those modules, in
float64 (the float32 forward is printed beside it for reference).

tests/fixtures/lpips/
  alex.safetensors   LPIPS(net='alex') state_dict, channels 8/12/16/12/12
  vgg.safetensors    LPIPS(net='vgg') state_dict, channels 4/8/8/12/12
                     (both hold every key of `LPIPS.state_dict()`: `scaling_layer.*`,
                     `net.sliceS.I.{weight,bias}`, `linN.model.1.weight` and the same
                     tensors again as `lins.N.model.1.weight`)
  io.safetensors
    a.64x48, b.64x48 (3,3,64,48)   pairs: random/random, identical, a/a+noise
    a.40x33, b.40x33 (2,3,40,33)   pairs: random/random, a/a+noise (odd sizes)
    <net>.<size>    (N,)           LPIPS(a, b) for net in alex, vgg
    div.g0 (3,3,32,32), div.g1 (4,3,32,32)   two prompts' generations
    <net>.div       ()             mean over groups of the mean LPIPS over pairs i<j

With --full DIR: DIR/{alex,vgg}.safetensors with the real channel widths
(64/192/384/256/256, 64/128/256/512/512; random weights) and DIR/io.safetensors
as above, for a one-off check that real-size checkpoints load
(`LPIPS_FULL_DIR=DIR cargo test --test lpips -- --ignored`).
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != HERE]

import copy  # noqa: E402
import warnings  # noqa: E402

import lpips  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(HERE))
OUT = os.path.join(ROOT, "tests", "fixtures", "lpips")
NARROW = {"alex": [8, 12, 16, 12, 12], "vgg": [4, 8, 8, 12, 12]}
FULL = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}


def build(net, widths, seed):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = lpips.LPIPS(pretrained=False, pnet_rand=True, net=net, verbose=False)
    slices = [m.net.slice1, m.net.slice2, m.net.slice3, m.net.slice4, m.net.slice5]
    c_in = 3
    for s, width in zip(slices, widths):
        for name, mod in s.named_children():
            if isinstance(mod, torch.nn.Conv2d):
                new = torch.nn.Conv2d(
                    c_in, width, mod.kernel_size, mod.stride, mod.padding, bias=True
                )
                setattr(s, name, new)
                c_in = width
    heads = [lpips.NetLinLayer(w, use_dropout=True) for w in widths]
    with torch.no_grad():
        for h in heads:
            w = h.model[1].weight
            w.copy_(torch.rand_like(w) * 2.0 / w.shape[1])  # nonnegative, as trained heads are
    for i, h in enumerate(heads):
        setattr(m, f"lin{i}", h)
    m.lins = torch.nn.ModuleList(heads)
    return m.eval()


def state(m):
    # lins.N and linN are the same modules: clone so safetensors accepts both keys.
    return {k: v.detach().clone().contiguous().float() for k, v in m.state_dict().items()}


def inputs():
    g = torch.Generator().manual_seed(7)
    u = lambda *s: torch.rand(*s, generator=g) * 2 - 1
    io = {}
    a = u(3, 3, 64, 48)
    b = torch.stack([u(3, 64, 48), a[1], (a[2] + 0.05 * u(3, 64, 48)).clamp(-1, 1)])
    io["a.64x48"], io["b.64x48"] = a, b
    a = u(2, 3, 40, 33)
    b = torch.stack([u(3, 40, 33), (a[1] + 0.05 * u(3, 40, 33)).clamp(-1, 1)])
    io["a.40x33"], io["b.40x33"] = a, b
    base = u(3, 32, 32)
    io["div.g0"] = (base + 0.5 * u(3, 3, 32, 32)).clamp(-1, 1)
    io["div.g1"] = u(4, 3, 32, 32)
    return io


def div(m, groups):
    per = []
    for g in groups:
        n = g.shape[0]
        i, j = zip(*[(i, j) for i in range(n) for j in range(i + 1, n)])
        d = m(g[list(i)], g[list(j)]).flatten()
        per.append(d.mean())
    return torch.stack(per).mean()


def write(out, widths, seeds):
    os.makedirs(out, exist_ok=True)
    io = inputs()
    for net in ("alex", "vgg"):
        m = build(net, widths[net], seeds[net])
        save_file(state(m), os.path.join(out, f"{net}.safetensors"))
        m64 = copy.deepcopy(m).double()
        with torch.no_grad():
            for size in ("64x48", "40x33"):
                a, b = io[f"a.{size}"], io[f"b.{size}"]
                d64 = m64(a.double(), b.double()).flatten()
                d32 = m(a, b).flatten()
                io[f"{net}.{size}"] = d64.float()
                rel = ((d32.double() - d64).abs() / d64.abs().clamp(min=1e-30)).max().item()
                print(f"{net} {size}: {d64.tolist()}  (float32 forward rel. diff {rel:.1e})")
            groups = [io["div.g0"].double(), io["div.g1"].double()]
            io[f"{net}.div"] = div(m64, groups).float()
            print(f"{net} div: {io[f'{net}.div'].item()}")
    save_file({k: v.contiguous() for k, v in io.items()}, os.path.join(out, "io.safetensors"))


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--full":
        write(sys.argv[2], FULL, {"alex": 10, "vgg": 11})
    else:
        write(OUT, NARROW, {"alex": 0, "vgg": 1})
