#!/usr/bin/env python3
"""Writes the text-to-image pipeline parity fixtures with diffusers' StableDiffusionPipeline.

Run with the pinned venv (tools/parity/requirements.txt) from the repository root:

    python tools/parity/pipeline.py

For each case below, on tiny-sd1 (epsilon) or tiny-sd2 (v-prediction, trailing spacing):

  tests/fixtures/parity/pipeline_<case>.safetensors
    latents        (B,4,h,w) the initial latents handed to the pipeline (unit Gaussian;
                   the pipeline multiplies them by init_noise_sigma)
    final_latents  (B,4,h,w) the latents after the last step (output_type="latent")
    images         (B,3,H,W) output_type="np" images in [0,1] (transposed to NCHW)

  tests/fixtures/parity/pipeline_cases.json
    case -> {model, sampler, prompts, negative_prompt, guidance, steps, eta, clip_skip,
             height, width, truncated}; `truncated` holds, per prompt, the text diffusers
             reports as cut off at 77 tokens (null when it fit).

Every sampler here is deterministic (no per-step noise), so the same initial latents
give the same images. Classifier-free guidance runs the negative prompt and the prompt
in one batch, as the pipeline does; `guidance` 1.0 runs the prompt alone.

diffusers applies `clip_skip` only to the prompt, not to the negative prompt; we apply
it to both (as other front ends do), so the clip-skip case hands diffusers negative
embeddings computed with the same clip_skip.
"""

import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       StableDiffusionPipeline)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "parity")

SAMPLERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
}

LONG = ("a very detailed photograph of a small brown dog sitting on a wooden bench in a sunny park, "
        "with green trees, blue sky, white clouds, a red ball, yellow flowers, children playing, "
        "birds flying over the lake, soft light, sharp focus, award winning composition, "
        "shot on film, kodak portra, high resolution, masterpiece, trending on the internet")

CASES = {
    # name: (model, sampler, prompts, negative, guidance, steps, clip_skip, height, width)
    "sd1_ddim": ("sd1", "ddim", ["a photo of sks dog", LONG], "blurry, low quality", 7.5, 8, 0, 16, 16),
    # One prompt twice (the binary test reruns this case through `dreambooth generate`).
    "sd1_dpm": ("sd1", "dpm++", ["a photo of sks dog", "a photo of sks dog"], "ugly", 7.5, 8, 0, 16, 32),
    "sd2_ddim": ("sd2", "ddim", ["a sks dog wearing a red hat!", "a photo of a dog"], "cartoon", 7.5, 8, 1, 32, 16),
    "sd2_euler": ("sd2", "euler", ["a photo of sks dog"], "", 1.0, 8, 0, 16, 16),
}


def truncated_text(tok, prompt):
    ids = tok(prompt).input_ids
    m = tok.model_max_length
    if len(ids) <= m:
        return None
    return tok.decode(ids[m - 1:-1])


def encode(pipe, prompts, clip_skip):
    """diffusers' encode_prompt with clip_skip (its own reaches for `text_encoder.text_model`,
    which transformers 5 no longer has)."""
    tok, te = pipe.tokenizer, pipe.text_encoder
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        hs = te(ids, output_hidden_states=True).hidden_states[-(clip_skip + 1)]
        return te.final_layer_norm(hs)


def run_case(name, spec, seed):
    model, sampler, prompts, negative, guidance, steps, clip_skip, height, width = spec
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(FIX, f"tiny-{model}"),
                                                   safety_checker=None, requires_safety_checker=False)
    pipe = pipe.to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = SAMPLERS[sampler].from_config(pipe.scheduler.config)
    f = pipe.vae_scale_factor
    b = len(prompts)
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(b, pipe.unet.config.in_channels, height // f, width // f, generator=g)

    kwargs = dict(prompt=prompts, height=height, width=width, num_inference_steps=steps,
                  guidance_scale=guidance, latents=latents.clone())
    if guidance > 1.0:
        if clip_skip:
            neg = encode(pipe, [negative] * b, clip_skip)
            pos = encode(pipe, prompts, clip_skip)
            kwargs.pop("prompt")
            kwargs.update(prompt_embeds=pos, negative_prompt_embeds=neg)
        else:
            kwargs["negative_prompt"] = [negative] * b
    elif clip_skip:
        kwargs.pop("prompt")
        kwargs["prompt_embeds"] = encode(pipe, prompts, clip_skip)

    with torch.no_grad():
        final = pipe(**kwargs, output_type="latent").images
        kwargs["latents"] = latents.clone()
        images = pipe(**kwargs, output_type="np").images  # (B, H, W, 3) float32 in [0, 1]

    tensors = {
        "latents": latents.contiguous(),
        "final_latents": final.float().contiguous(),
        "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float(),
    }
    save_file(tensors, os.path.join(OUT, f"pipeline_{name}.safetensors"))
    meta = {
        "model": f"tiny-{model}", "sampler": sampler, "prompts": prompts,
        "negative_prompt": negative, "guidance": guidance, "steps": steps, "eta": 0.0,
        "clip_skip": clip_skip, "height": height, "width": width,
        "truncated": [truncated_text(pipe.tokenizer, p) for p in prompts],
    }
    print(f"{name}: latents {tuple(latents.shape)} images {images.shape} "
          f"range [{images.min():.3f}, {images.max():.3f}] std {images.std():.3f}")
    return meta


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    cases = {}
    for i, (name, spec) in enumerate(CASES.items()):
        cases[name] = run_case(name, spec, seed=100 + i)
    with open(os.path.join(OUT, "pipeline_cases.json"), "w") as fh:
        json.dump(cases, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    main()
