#!/usr/bin/env python3
"""Writes a Stable Diffusion 1.5-shaped checkpoint with random weights in the
original `.ckpt` form (a Lightning dict {"state_dict": ...}, fp16, with DDPM
buffers), to time loading and converting a real-size pickle:

    .venv/bin/python tools/bench/random_sd15_checkpoint.py /tmp/sd15-random.ckpt
    time target/release/dreambooth convert --model /tmp/sd15-random.ckpt --out /tmp/sd15.safetensors --dtype fp16

The layout is tools/parity/single_file.py's mapping (checked there against
diffusers' converters); the configs are SD 1.5's.
"""

import os
import sys

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "parity"))
import single_file as sf  # noqa: E402


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    with torch.no_grad():
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).half()
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4, layers_per_block=2, sample_size=512,
        ).half()
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77,
            projection_dim=768, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        )).half()
    ckpt = {}
    ckpt.update(sf.unet_to_ldm(unet.state_dict(), dict(unet.config)))
    ckpt.update(sf.vae_to_ldm(vae.state_dict(), dict(vae.config)))
    text_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    ckpt.update(sf.clip_to_ldm(text_sd, text.config.to_dict()))
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    ckpt["betas"] = betas.float()
    ckpt["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    state = {k: v.contiguous() for k, v in ckpt.items()}
    torch.save({"state_dict": state, "global_step": 840000}, out)
    n = sum(v.numel() for v in state.values())
    print(f"{out}: {len(state)} tensors, {n / 1e6:.0f} M values, {os.path.getsize(out) / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
