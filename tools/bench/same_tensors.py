#!/usr/bin/env python3
"""Checks that two safetensors files, or the weight files of two diffusers
folders, hold the same tensors: the same names, dtypes, shapes and bytes
(the header's metadata and the order of the data may differ). Standard
library only, one tensor in memory at a time:

    python3 tools/bench/same_tensors.py /tmp/before.safetensors /tmp/after.safetensors
    python3 tools/bench/same_tensors.py /tmp/before-folder /tmp/after-folder
"""

import json
import os
import struct
import sys

FOLDER_FILES = [
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
]


def header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h, 8 + n


def compare(a, b):
    ha, base_a = header(a)
    hb, base_b = header(b)
    if ha.keys() != hb.keys():
        only = sorted(set(ha) ^ set(hb))
        sys.exit(f"{a} / {b}: {len(only)} tensors on one side only, e.g. {only[0]}")
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for k in sorted(ha):
            ta, tb = ha[k], hb[k]
            if (ta["dtype"], ta["shape"]) != (tb["dtype"], tb["shape"]):
                sys.exit(f"{k}: {ta['dtype']} {ta['shape']} vs {tb['dtype']} {tb['shape']}")
            s, e = ta["data_offsets"]
            fa.seek(base_a + s)
            x = fa.read(e - s)
            s, e = tb["data_offsets"]
            fb.seek(base_b + s)
            if x != fb.read(e - s):
                sys.exit(f"{a} / {b}: tensor `{k}` differs")
    return len(ha)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = sys.argv[1:]
    pairs = [(a, b)]
    if os.path.isdir(a):
        pairs = [(os.path.join(a, f), os.path.join(b, f)) for f in FOLDER_FILES if os.path.exists(os.path.join(a, f))]
    for x, y in pairs:
        print(f"{x}: {compare(x, y)} tensors identical")


if __name__ == "__main__":
    main()
