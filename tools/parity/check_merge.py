"""Checks `dreambooth merge` against diffusers' own `fuse_lora`: loads FOLDER
(what `dreambooth merge --model CKPT --lora LORA --out FOLDER` wrote) with
`StableDiffusionPipeline.from_pretrained`, and CKPT with `from_single_file`
(configs from FOLDER, offline, f32) with LORA loaded by `load_lora_weights`
and folded in by `fuse_lora(lora_scale=SCALE)`; prints, per component, the
keys on one side only, how many weights the LoRA changed, and the largest
difference between the two in units of the written dtype's last place.

    .venv/bin/python tools/bench/random_sd15_checkpoint.py /tmp/sd15-random.ckpt
    .venv/bin/python tools/bench/random_sd15_lora.py /tmp/sd15-lora.safetensors
    target/release/dreambooth merge --model /tmp/sd15-random.ckpt --lora /tmp/sd15-lora.safetensors --out /tmp/merged-fp16 --dtype fp16
    .venv/bin/python tools/parity/check_merge.py /tmp/sd15-random.ckpt /tmp/sd15-lora.safetensors /tmp/merged-fp16 [SCALE]
"""

import os
import sys

import diffusers
import torch
from safetensors import safe_open


# Mantissa bits and the spacing of the subnormals, per safetensors dtype.
FORMATS = {"F16": (10, 2.0**-24), "BF16": (7, 2.0**-133), "F32": (23, 2.0**-149)}


def written_dtype(folder, name):
    """The dtype FOLDER's weight file for component NAME holds (diffusers may
    upcast on loading, so it is read from the file)."""
    file = "model.safetensors" if name == "text_encoder" else "diffusion_pytorch_model.safetensors"
    with safe_open(os.path.join(folder, name, file), "pt") as f:
        return str(f.get_slice(next(iter(f.keys()))).get_dtype())


def ulps(got, want, dtype):
    """|got - want| in units of the last place of `dtype` at want's magnitude."""
    mantissa, tiny = FORMATS[dtype]
    w = want.float()
    ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-38))) - mantissa).clamp_min(tiny)
    return ((got.float() - w).abs() / ulp).max().item()


def main(ckpt, lora, folder, scale=1.0):
    ours = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        ckpt, config=folder, safety_checker=None, local_files_only=True, torch_dtype=torch.float32
    )
    before = {n: {k: v.clone() for k, v in getattr(theirs, n).state_dict().items()} for n in ["unet", "text_encoder"]}
    theirs.load_lora_weights(lora)
    theirs.fuse_lora(lora_scale=float(scale))
    theirs.unload_lora_weights()
    bad = False
    for name in ["unet", "vae", "text_encoder"]:
        a = getattr(ours, name).state_dict()
        b = getattr(theirs, name).state_dict()
        keys = set(a) | set(b)
        one_side = sorted(k for k in keys if k not in a or k not in b)
        changed = sum(1 for k in before.get(name, {}) if k in b and not torch.equal(before[name][k], b[k]))
        dtype = written_dtype(folder, name)
        worst = max((ulps(a[k], b[k], dtype) for k in keys if k in a and k in b and a[k].is_floating_point()),
                    default=0.0)
        print(f"{name}: {len(keys)} keys, on one side only: {one_side[:3]}, "
              f"changed by the LoRA: {changed}, max diff {worst:.2f} ulp of {dtype}")
        bad |= bool(one_side) or worst > 1.5
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(*sys.argv[1:5])
