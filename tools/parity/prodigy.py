#!/usr/bin/env python3
"""Writes the Prodigy optimizer parity fixture with prodigyopt (1.1):

    python tools/parity/prodigy.py

tests/fixtures/parity/prodigy.safetensors holds, per case, the two starting
parameters (`a`: 6×5 Gaussian; `b`: 5 zeros, as a LoRA up matrix starts), the
gradients of each step (`<case>.g<t>.a`, `<case>.g<t>.b`; step 0's are all zero,
which prodigyopt skips), and the parameters and `d` after each step
(`<case>.p<t>.a`, `<case>.p<t>.b`, `<case>.d`); tests/fixtures/parity/prodigy.json
holds each case's options and its per-step learning rates.
"""

import json
import os

import torch
from prodigyopt import Prodigy
from safetensors.torch import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "parity")
STEPS = 40

CASES = {
    # diffusers' advanced DreamBooth script's settings.
    "advanced": dict(weight_decay=1e-4, use_bias_correction=True, safeguard_warmup=True,
                     beta3=None, d_coef=1.0, growth_rate=float("inf")),
    # prodigyopt's own defaults, with a growth cap and another beta3 and d_coef.
    "plain": dict(weight_decay=0.0, use_bias_correction=False, safeguard_warmup=False,
                  beta3=0.95, d_coef=2.0, growth_rate=1.5),
}
# Warm-up then constant, as a scheduler would hand it.
LRS = [1.0, 0.25, 0.5, 0.75] + [1.0] * (STEPS - 4)


def main():
    torch.manual_seed(0)
    tensors, meta = {}, {}
    for name, opts in CASES.items():
        a = torch.nn.Parameter(torch.randn(6, 5))
        b = torch.nn.Parameter(torch.zeros(5))
        tensors[f"{name}.a"] = a.detach().clone()
        tensors[f"{name}.b"] = b.detach().clone()
        opt = Prodigy([a, b], lr=LRS[0], decouple=True, **opts)
        ds = []
        for t in range(STEPS):
            for g in opt.param_groups:
                g["lr"] = LRS[t]
            if t == 0:
                ga, gb = torch.zeros_like(a), torch.zeros_like(b)
            else:
                # A pull towards a target plus noise, as a loss would give.
                ga = 0.5 * (a.detach() - 1.0) + 0.1 * torch.randn_like(a)
                gb = 0.5 * (b.detach() + 0.5) + 0.1 * torch.randn_like(b)
            a.grad, b.grad = ga.clone(), gb.clone()
            tensors[f"{name}.g{t}.a"], tensors[f"{name}.g{t}.b"] = ga, gb
            opt.step()
            tensors[f"{name}.p{t}.a"] = a.detach().clone()
            tensors[f"{name}.p{t}.b"] = b.detach().clone()
            ds.append(opt.param_groups[0]["d"])
        tensors[f"{name}.d"] = torch.tensor(ds, dtype=torch.float64)
        meta[name] = {**opts, "growth_rate": opts["growth_rate"] if opts["growth_rate"] != float("inf") else None,
                      "lrs": LRS, "steps": STEPS, "final_k": opt.param_groups[0]["k"]}
        print(name, "d:", [f"{d:.3g}" for d in ds])
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "prodigy.safetensors"))
    with open(os.path.join(OUT, "prodigy.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
        fh.write("\n")


if __name__ == "__main__":
    main()
