#!/usr/bin/env python3
"""Writes the image-to-image parity fixtures with diffusers' StableDiffusionImg2ImgPipeline
(and StableDiffusionXLImg2ImgPipeline for tiny-sdxl).

Run with the pinned venv (tools/parity/requirements.txt) from the repository root:

    python tools/parity/img2img.py

For each case below:

  tests/fixtures/parity/img2img_<case>.safetensors
    init_pixels      (B,3,H,W) the initial images in [0,1] (8-bit values / 255), one per prompt
    posterior_noise  (B,4,h,w) the unit Gaussian of the VAE posterior sample
    noise            (B,4,h,w) the unit Gaussian added to the image latents
    final_latents    (B,4,h,w) the latents after the last step (output_type="latent")
    images           (B,3,H,W) output_type="np" images in [0,1] (transposed to NCHW)

  tests/fixtures/parity/img2img_cases.json
    case -> {model, sampler, prompts, negative_prompt, guidance, steps, strength, height, width}

The pipeline draws both Gaussians through `randn_tensor` (the posterior sample in
`DiagonalGaussianDistribution.sample`, then the noise in `prepare_latents`); both modules'
`randn_tensor` is replaced by one that hands out the saved tensors in that order.
"""

import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

import diffusers.models.autoencoders.vae as vae_module
import diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img as sd_module
import diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl_img2img as sdxl_module
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "parity")

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}

CASES = {
    # name: (model, sampler, prompts, negative, guidance, steps, strength, height, width)
    "sd1_ddim": ("sd1", "ddim", ["a photo of sks dog", "a sks dog on the beach"], "blurry", 7.5, 10, 0.6,
                 16, 24),
    # A multistep sampler started part-way (set_begin_index): its first step is first order.
    "sd1_dpm": ("sd1", "dpm++", ["a red sks backpack"], "", 5.0, 8, 0.75, 32, 16),
    "sd2_euler": ("sd2", "euler", ["a sks dog in the snow"], "", 1.0, 9, 0.5, 16, 16),
    "sdxl_euler": ("sdxl", "euler", ["a photo of sks dog", "a sks dog on the beach"], "", 5.0, 8, 0.3,
                   16, 24),
}


class Queue:
    """randn_tensor replacement: returns the given tensors in order, checking each shape."""

    def __init__(self, tensors):
        self.tensors = list(tensors)

    def __call__(self, shape, generator=None, device=None, dtype=None, layout=None):
        t = self.tensors.pop(0)
        assert tuple(t.shape) == tuple(shape), (t.shape, shape)
        return t.clone().to(dtype=dtype or t.dtype)


def run_case(name, spec, seed):
    model, sampler, prompts, negative, guidance, steps, strength, height, width = spec
    folder = os.path.join(FIX, f"tiny-{model}")
    if model == "sdxl":
        pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(folder, add_watermarker=False)
        module = sdxl_module
    else:
        pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                              requires_safety_checker=False)
        module = sd_module
    pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    f = pipe.vae_scale_factor
    b = len(prompts)
    g = torch.Generator().manual_seed(seed)
    # Smooth random pictures (a coarse grid upsampled), as 8-bit images.
    coarse = torch.rand(b, 3, height // 4, width // 4, generator=g)
    pixels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear")
    u8 = (pixels * 255).round().clamp(0, 255).to(torch.uint8)
    images_in = [Image.fromarray(u8[i].permute(1, 2, 0).numpy()) for i in range(b)]
    latent_shape = (b, pipe.vae.config.latent_channels, height // f, width // f)
    posterior_noise = torch.randn(latent_shape, generator=g)
    noise = torch.randn(latent_shape, generator=g)

    kwargs = dict(prompt=prompts, image=images_in, strength=strength, num_inference_steps=steps,
                  guidance_scale=guidance)
    if negative:
        kwargs["negative_prompt"] = [negative] * b
    outs = {}
    with torch.no_grad():
        for kind in ["latent", "np"]:
            q = Queue([posterior_noise, noise])
            vae_module.randn_tensor, module.randn_tensor = q, q
            outs[kind] = pipe(**kwargs, output_type=kind).images
            assert not q.tensors
    images = outs["np"]
    tensors = {
        "init_pixels": (u8.float() / 255).contiguous(),
        "posterior_noise": posterior_noise.contiguous(),
        "noise": noise.contiguous(),
        "final_latents": outs["latent"].float().contiguous(),
        "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float(),
    }
    save_file(tensors, os.path.join(OUT, f"img2img_{name}.safetensors"))
    print(f"{name}: images {images.shape} range [{images.min():.3f}, {images.max():.3f}] "
          f"std {images.std():.3f}")
    return {
        "model": f"tiny-{model}", "sampler": sampler, "prompts": prompts, "negative_prompt": negative,
        "guidance": guidance, "steps": steps, "strength": strength, "height": height, "width": width,
    }


def main():
    os.makedirs(OUT, exist_ok=True)
    cases = {}
    for i, (name, spec) in enumerate(CASES.items()):
        cases[name] = run_case(name, spec, seed=300 + i)
    with open(os.path.join(OUT, "img2img_cases.json"), "w") as fh:
        json.dump(cases, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    main()
