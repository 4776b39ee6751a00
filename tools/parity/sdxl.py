#!/usr/bin/env python3
"""The tiny random-weight SDXL pipeline and its parity fixtures, from diffusers /
transformers (pinned in tools/parity/requirements.txt). From the repository root:

    python tools/parity/sdxl.py

writes
  tests/fixtures/tiny-sdxl/                  StableDiffusionXLPipeline.save_pretrained: two
                                             tokenizers (CLIP and OpenCLIP padding), CLIPTextModel +
                                             CLIPTextModelWithProjection, a UNet with
                                             addition_embed_type "text_time", DownBlock2D first,
                                             per-block transformer depths, Euler scheduler
  tests/fixtures/parity/sdxl_unet.safetensors UNet output and gradients of sum(out * R) w.r.t. the
                                             sample, context, pooled text embeds and weights
  tests/fixtures/parity/sdxl_text.safetensors encode_prompt's prompt_embeds / pooled_prompt_embeds
                                             (clip_skip none and 1)
  tests/fixtures/parity/pipeline_sdxl_*.safetensors and their cases, merged into
  tests/fixtures/parity/pipeline_cases.json (the other cases are left as they are)
"""
import json
import os

import numpy as np
import torch
from safetensors.torch import save_file

from diffusers import (DDIMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from make_tiny_models import tiny_vae, write_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "parity")
MODEL = os.path.join(FIX, "tiny-sdxl")

UNET_WEIGHTS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "add_embedding.linear_1.weight",
    "add_embedding.linear_2.bias",
    "down_blocks.0.resnets.1.conv1.weight",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.weight",
    "down_blocks.2.attentions.1.proj_in.weight",
    "mid_block.attentions.0.transformer_blocks.1.ff.net.0.proj.weight",
    "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_q.weight",
    "up_blocks.2.resnets.2.conv2.weight",
    "conv_out.weight",
]


def build():
    torch.manual_seed(7)
    tok1 = write_tokenizer(os.path.join(MODEL, "tokenizer"), "<|endoftext|>")
    tok2 = write_tokenizer(os.path.join(MODEL, "tokenizer_2"), "!")
    t_dim, proj = 8, 32
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=2, norm_num_groups=4,
        transformer_layers_per_block=(1, 2, 2), attention_head_dim=(2, 4, 4),
        cross_attention_dim=64, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=t_dim,
        projection_class_embeddings_input_dim=proj + 6 * t_dim,
        flip_sin_to_cos=True, freq_shift=0,
    )
    vae = tiny_vae(scaling_factor=0.13025, force_upcast=True)

    def text_config(tok, act):
        return CLIPTextConfig(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=4, max_position_embeddings=77, projection_dim=proj, hidden_act=act,
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )

    te1 = CLIPTextModel(text_config(tok1, "quick_gelu"))
    te2 = CLIPTextModelWithProjection(text_config(tok2, "gelu"))
    with torch.no_grad():
        for m in (unet, vae, te1, te2):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    sched = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading", prediction_type="epsilon",
    )
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=tok1,
                                     tokenizer_2=tok2, unet=unet, scheduler=sched,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.save_pretrained(MODEL, safe_serialization=True)
    print("tiny-sdxl unet params", sum(p.numel() for p in unet.parameters()))


def load_pipe():
    pipe = StableDiffusionXLPipeline.from_pretrained(MODEL, add_watermarker=False).to(torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_fixture(pipe):
    torch.manual_seed(42)
    unet = pipe.unet
    sample = torch.randn(2, 4, 8, 6, requires_grad=True)
    timesteps = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, requires_grad=True)
    text_embeds = torch.randn(2, 32, requires_grad=True)
    time_ids = torch.tensor([[64.0, 48.0, 0.0, 0.0, 64.0, 48.0], [1024.0, 768.0, 16.0, 8.0, 512.0, 512.0]])
    out = unet(sample, timesteps, encoder_hidden_states=context,
               added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    r = torch.randn_like(out)
    (out * r).sum().backward()
    params = dict(unet.named_parameters())
    t = {"sample": sample.detach(), "timesteps": timesteps, "context": context.detach(),
         "text_embeds": text_embeds.detach(), "time_ids": time_ids, "out": out.detach(), "r": r,
         "grad.sample": sample.grad, "grad.context": context.grad, "grad.text_embeds": text_embeds.grad}
    for w in UNET_WEIGHTS:
        t["grad." + w] = params[w].grad
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "sdxl_unet.safetensors"))


TEXT_PROMPTS = ["a photo of sks dog", "a sks dog wearing a red hat!", ""]


def text_fixture(pipe):
    t = {}
    with torch.no_grad():
        for skip in (None, 1):
            pe, _, pooled, _ = pipe.encode_prompt(TEXT_PROMPTS, do_classifier_free_guidance=False,
                                                  clip_skip=skip)
            tag = "skip0" if skip is None else f"skip{skip}"
            t[f"{tag}.context"] = pe
            t[f"{tag}.pooled"] = pooled
    save_file({k: v.contiguous() for k, v in t.items()}, os.path.join(OUT, "sdxl_text.safetensors"),
              metadata={"prompts": json.dumps(TEXT_PROMPTS)})


CASES = {
    # name: (sampler, prompts, negative, guidance, steps, height, width); an empty negative prompt
    # is no negative prompt: force_zeros_for_empty_prompt conditions on zeros.
    "sdxl_euler": ("euler", ["a photo of sks dog", "a sks dog on the beach"], "", 5.0, 8, 16, 24),
    "sdxl_ddim": ("ddim", ["a red sks backpack"], "blurry, low quality", 3.0, 8, 32, 16),
}
SAMPLERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler}


def pipeline_fixtures(pipe):
    path = os.path.join(OUT, "pipeline_cases.json")
    with open(path) as fh:
        cases = json.load(fh)
    base_sched = pipe.scheduler.config
    for i, (name, (sampler, prompts, negative, guidance, steps, height, width)) in enumerate(CASES.items()):
        pipe.scheduler = SAMPLERS[sampler].from_config(base_sched)
        g = torch.Generator().manual_seed(200 + i)
        f = pipe.vae_scale_factor
        latents = torch.randn(len(prompts), 4, height // f, width // f, generator=g)
        kwargs = dict(prompt=prompts, height=height, width=width, num_inference_steps=steps,
                      guidance_scale=guidance)
        if negative:
            kwargs["negative_prompt"] = [negative] * len(prompts)
        with torch.no_grad():
            final = pipe(**kwargs, latents=latents.clone(), output_type="latent").images
            images = pipe(**kwargs, latents=latents.clone(), output_type="np").images
        save_file({
            "latents": latents.contiguous(),
            "final_latents": final.float().contiguous(),
            "images": torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))).float(),
        }, os.path.join(OUT, f"pipeline_{name}.safetensors"))
        cases[name] = {
            "model": "tiny-sdxl", "sampler": sampler, "prompts": prompts, "negative_prompt": negative,
            "guidance": guidance, "steps": steps, "eta": 0.0, "clip_skip": 0, "height": height,
            "width": width, "truncated": [None for _ in prompts],
        }
        print(f"{name}: images {images.shape} range [{images.min():.3f}, {images.max():.3f}] "
              f"std {images.std():.3f}")
    with open(path, "w") as fh:
        json.dump(cases, fh, indent=2, ensure_ascii=False)
        fh.write("\n")


if __name__ == "__main__":
    build()
    pipe = load_pipe()
    unet_fixture(pipe)
    text_fixture(pipe)
    pipeline_fixtures(pipe)
