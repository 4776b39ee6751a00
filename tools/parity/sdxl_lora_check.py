#!/usr/bin/env python3
"""Do our SDXL LoRA files and trained SDXL folders load in diffusers and give our images?

    cargo build --release
    python tools/parity/sdxl_lora_check.py [WORK_DIR]

Trains a LoRA on tests/fixtures/tiny-sdxl with `dreambooth train --lora
--train-text-encoder --lora-format both` (peft and kohya files with adapters on
the UNet and both text encoders; kohya with sd-scripts' SDXL names),
then for each file generates the same images from the same initial latents
with `StableDiffusionXLPipeline.load_lora_weights` + Euler and with `dreambooth
generate --lora ... --latents ...`, and prints the largest pixel difference
(0-255) between them, and between LoRA and no LoRA (which must be large). Then the
same for a full fine-tune's exported diffusers folder and single file (`train
--train-text-encoder --save-single-file` without --lora) loaded with
`StableDiffusionXLPipeline.from_pretrained` / diffusers' single-file converters
(`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`,
`convert_ldm_clip_checkpoint`, `convert_open_clip_checkpoint`, strict
`load_state_dict`): `from_single_file` itself recognises an SDXL file by the
key of OpenCLIP's tenth layer, which the 3-layer tiny encoder lacks.
"""
import os
import subprocess
import sys

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-sdxl")
BIN = os.path.join(ROOT, "target", "release", "dreambooth")
PROMPT = "a photo of sks dog"


def run(*args):
    subprocess.run([BIN, *args], check=True, stdout=subprocess.DEVNULL)


def ours(work, lora, latents, tag, model=MODEL):
    out = os.path.join(work, f"ours-{tag}")
    args = ["generate", "--model", model, "--prompt", PROMPT, "--steps", "6", "--sampler", "euler",
            "--guidance", "5", "--latents", latents, "--out", out]
    if lora:
        args += ["--lora", lora]
    run(*args)
    return [np.asarray(Image.open(os.path.join(out, f"{i:05}.png"))).astype(int) for i in range(2)]


def from_single_file(path):
    from diffusers.loaders import single_file_utils as sfu
    from safetensors.torch import load_file
    ckpt = load_file(path)
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, add_watermarker=False)
    pipe.unet.load_state_dict(sfu.convert_ldm_unet_checkpoint(ckpt, dict(pipe.unet.config)), strict=True)
    pipe.vae.load_state_dict(sfu.convert_ldm_vae_checkpoint(ckpt, dict(pipe.vae.config)), strict=True)
    def load(module, sd):
        # transformers 5 names CLIPTextModel's weights without `text_model.`.
        if not any(k.startswith("text_model.") for k in module.state_dict()):
            sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
        module.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=True)

    load(pipe.text_encoder, sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer."))
    load(pipe.text_encoder_2,
         sfu.convert_open_clip_checkpoint(pipe.text_encoder_2, ckpt, prefix="conditioner.embedders.1.model."))
    return pipe


def theirs(lora, latents, model=MODEL):
    if model.endswith(".safetensors"):
        pipe = from_single_file(model)
    else:
        pipe = StableDiffusionXLPipeline.from_pretrained(model, add_watermarker=False)
    pipe = pipe.to(torch.float32)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    if lora:
        pipe.load_lora_weights(lora)
    with torch.no_grad():
        imgs = pipe(prompt=[PROMPT] * 2, num_inference_steps=6, guidance_scale=5.0, height=16, width=16,
                    latents=latents.clone(), output_type="pil").images
    return [np.asarray(i).astype(int) for i in imgs]


def main(work):
    os.makedirs(work, exist_ok=True)
    inst = os.path.join(ROOT, "..", "shared", "data", "dreambooth-dataset", "dog")
    out = os.path.join(work, "train")
    run("train", "--model", MODEL, "--instance-dir", inst, "--instance-prompt", PROMPT,
        "--max-train-steps", "20", "--lora", "--lora-rank", "4", "--learning-rate", "1e-2",
        "--train-text-encoder", "--lora-format", "both", "--output-dir", out)
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    lat_file = os.path.join(work, "latents.safetensors")
    save_file({"latents": latents}, lat_file)
    base = ours(work, None, lat_file, "base")
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        f = os.path.join(out, name)
        a, b = ours(work, f, lat_file, name.split(".")[0]), theirs(f, latents)
        d = max(int(np.abs(x - y).max()) for x, y in zip(a, b))
        moved = max(int(np.abs(x - y).max()) for x, y in zip(a, base))
        print(f"{name:36} ours vs diffusers max |Δ| {d:3d}/255   LoRA vs none {moved:3d}/255")

    full = os.path.join(work, "full")
    run("train", "--model", MODEL, "--instance-dir", inst, "--instance-prompt", PROMPT,
        "--max-train-steps", "6", "--learning-rate", "1e-3", "--train-text-encoder", "--save-single-file",
        "--output-dir", full)
    for what, model in [("full fine-tune folder", os.path.join(full, "model")),
                        ("full fine-tune single file", os.path.join(full, "model.safetensors"))]:
        a, b = ours(work, None, lat_file, what.split()[-1], model), theirs(None, latents, model)
        d = max(int(np.abs(x - y).max()) for x, y in zip(a, b))
        moved = max(int(np.abs(x - y).max()) for x, y in zip(a, base))
        print(f"{what:36} ours vs diffusers max |Δ| {d:3d}/255   trained vs base {moved:3d}/255")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/sdxl-lora-check")
