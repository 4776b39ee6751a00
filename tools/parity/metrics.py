#!/usr/bin/env python3
"""Writes the evaluation metrics' fixture: fixed random embeddings and the
paper's metrics computed on them with NumPy (float64).

    python tools/parity/metrics.py

tests/fixtures/metrics.safetensors
  gen (6,16) f32        "generated" embeddings, rows 4 and 5 close to real rows
  real (4,16) f32       "real" embeddings
  text (6,16) f32       one text embedding per generated image
  cls (5,16) f32        "class-prompt generations"
  div.g0 (3,16), div.g1 (4,16), div.g2 (2,16) f32   three prompts' groups
  cos (6,4) f64         cos(gen_i, real_j)
  mean_pairwise (1,) f64        mean of cos: DINO / CLIP-I
  distinct (1,) f64     mean cos over pairs i < j of real
  rowwise (6,) f64      cos(gen_i, text_i)
  clip_t (1,) f64       mean of rowwise
  pres (1,) f64         mean cos(cls_i, real_j)
  div_l2 (1,) f64       per group the mean Euclidean distance over pairs i < j,
                        then the mean over groups (DIV's reduction with L2 in
                        place of LPIPS; LPIPS itself is checked by tests/lpips.rs)
The expected values are computed from the float32 embeddings cast to float64.
"""

import os

import numpy as np
from safetensors.numpy import save_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "metrics.safetensors")


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main():
    rng = np.random.default_rng(0)
    d = 16
    real = rng.normal(size=(4, d)).astype(np.float32)
    gen = rng.normal(size=(6, d))
    gen[4:] = real[:2] + 0.3 * rng.normal(size=(2, d))
    gen = (gen * rng.uniform(0.5, 3.0, size=(6, 1))).astype(np.float32)  # unnormalized rows
    text = (gen + rng.normal(size=(6, d))).astype(np.float32)
    cls = rng.normal(size=(5, d)).astype(np.float32)
    groups = [rng.normal(size=(n, d)).astype(np.float32) for n in (3, 4, 2)]

    g, r, t, c = (x.astype(np.float64) for x in (gen, real, text, cls))
    cos = unit(g) @ unit(r).T
    rr = unit(r) @ unit(r).T
    iu = np.triu_indices(len(r), k=1)
    rowwise = np.sum(unit(g) * unit(t), axis=1)
    pres = (unit(c) @ unit(r).T).mean()
    per = []
    for x in groups:
        x = x.astype(np.float64)
        i, j = np.triu_indices(len(x), k=1)
        per.append(np.linalg.norm(x[i] - x[j], axis=1).mean())

    out = {
        "gen": gen,
        "real": real,
        "text": text,
        "cls": cls,
        "cos": cos,
        "mean_pairwise": np.array([cos.mean()]),
        "distinct": np.array([rr[iu].mean()]),
        "rowwise": rowwise,
        "clip_t": np.array([rowwise.mean()]),
        "pres": np.array([pres]),
        "div_l2": np.array([np.mean(per)]),
    }
    for k, x in enumerate(groups):
        out[f"div.g{k}"] = x
    save_file({k: np.ascontiguousarray(v) for k, v in out.items()}, OUT)
    for k in ("mean_pairwise", "distinct", "clip_t", "pres", "div_l2"):
        print(k, out[k][0])


if __name__ == "__main__":
    main()
