#!/usr/bin/env python3
"""Checks a diffusers folder written by `dreambooth train` with diffusers itself.

The folder must load as a `StableDiffusionPipeline` (model_index.json, configs,
tokenizer, weights), tokenize the prompts to the same ids as this crate, and its
UNet, text encoder and VAE must compute what this crate computed on the same
inputs. With the exported single file next to the folder (`model.safetensors`),
that file is loaded with `from_single_file` and its UNet checked too.

    DREAMBOOTH_EXPORT_CHECK=/tmp/check cargo test --test train exported
    python tools/check_export_diffusers.py /tmp/check/model

The inputs and this crate's outputs are read from
`FOLDER/../export_check.safetensors` (or the file given second). Prints the
relative L2 error of every output and exits 1 when one exceeds 1e-4.
"""

import json
import sys
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.utils import logging as transformers_logging

TOLERANCE = 1e-4


def rel_err(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    a, b = ours.double(), theirs.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def main() -> int:
    if len(sys.argv) not in (2, 3):
        print(__doc__)
        return 2
    folder = Path(sys.argv[1])
    io_path = Path(sys.argv[2]) if len(sys.argv) == 3 else folder.parent / "export_check.safetensors"
    io = load_file(io_path)
    with safe_open(io_path, "pt") as f:
        prompts = json.loads(f.metadata()["prompts"])

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    errors = {}
    ids = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True,
        return_tensors="pt",
    ).input_ids
    same_ids = torch.equal(ids, io["input_ids"].long())
    print(f"tokenizer ids identical: {same_ids}")
    with torch.no_grad():
        text = pipe.text_encoder(ids).last_hidden_state
        errors["text encoder"] = rel_err(io["text_out"], text)
        unet = pipe.unet(io["sample"], io["timestep"], encoder_hidden_states=io["encoder_hidden_states"]).sample
        errors["UNet"] = rel_err(io["unet_out"], unet)
        mean = pipe.vae.encode(io["pixels"]).latent_dist.mean
        errors["VAE encode"] = rel_err(io["vae_mean"], mean)
        decoded = pipe.vae.decode(io["sample"]).sample
        errors["VAE decode"] = rel_err(io["vae_decoded"], decoded)

        single = folder.parent / "model.safetensors"
        if single.is_file():
            sf = StableDiffusionPipeline.from_single_file(
                single, config=str(folder), local_files_only=True, safety_checker=None,
                requires_safety_checker=False,
            )
            unet = sf.unet(io["sample"], io["timestep"], encoder_hidden_states=io["encoder_hidden_states"]).sample
            errors["single file: UNet"] = rel_err(io["unet_out"], unet)
            text = sf.text_encoder(ids).last_hidden_state
            errors["single file: text encoder"] = rel_err(io["text_out"], text)
            decoded = sf.vae.decode(io["sample"]).sample
            errors["single file: VAE decode"] = rel_err(io["vae_decoded"], decoded)

    for name, e in errors.items():
        print(f"{name:28} rel L2 error {e:.2e}")
    worst = max(errors.values())
    print(f"max rel error {worst:.2e} (tolerance {TOLERANCE:.0e})")
    return 0 if same_ids and worst < TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
