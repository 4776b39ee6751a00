#!/usr/bin/env python3
"""Writes the VAE and CLIP text encoder parity fixtures with diffusers / transformers.

Run with the pinned venv (tools/parity/requirements.txt) from the repository root:

    python tools/parity/vae_clip.py

For tiny-sd1 and tiny-sd2 (tests/fixtures/tiny-sd*/, from make_tiny_models.py):

  tests/fixtures/parity/<sd>_vae.safetensors
    x (B,3,S,S) image in [-1,1], noise, z, r_dec, r_sample (random inputs)
    mean, logvar            encode(x).latent_dist (logvar clamped to [-30, 20])
    sample                  mean + exp(0.5 logvar) * noise
    dec                     decode(z).sample
    grad.x, grad.z, grad.<weight key>
                            gradients of  sum(dec * r_dec) + sum(sample * r_sample)

  tests/fixtures/parity/<sd>_text.safetensors
    ids (2,77) int64        the pipeline's tokenizer on two prompts (padded to 77)
    r                       random weights of the loss
    last_hidden_state       CLIPTextModel(ids).last_hidden_state
    clip_skip_1             final_layer_norm(hidden_states[-2]) (diffusers' clip_skip=1)
    grad.<weight key>       gradients of sum(last_hidden_state * r); for the token
                            embedding only the rows of `grad_rows` (the ids that occur,
                            sorted) as `grad.embeddings.token_embedding.weight.rows`

Weight keys are as the tiny models store them (transformers 5: no `text_model.` prefix).
sd1 uses a 1x3x16x16 image, sd2 2x3x32x32.
"""

import os

import torch
from safetensors.torch import save_file

from diffusers import AutoencoderKL
from transformers import CLIPTextModel, CLIPTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "parity")

VAE_WEIGHTS = [
    "encoder.conv_in.weight",
    "encoder.down_blocks.0.resnets.0.norm1.weight",
    "encoder.down_blocks.0.downsamplers.0.conv.weight",
    "encoder.mid_block.attentions.0.to_q.weight",
    "encoder.mid_block.attentions.0.group_norm.weight",
    "quant_conv.weight",
    "post_quant_conv.weight",
    "decoder.mid_block.attentions.0.to_k.weight",
    "decoder.up_blocks.0.upsamplers.0.conv.weight",
    "decoder.up_blocks.1.resnets.0.conv_shortcut.weight",
    "decoder.up_blocks.1.resnets.1.norm2.weight",
    "decoder.conv_out.weight",
]

TEXT_WEIGHTS = [
    "embeddings.position_embedding.weight",
    "encoder.layers.0.self_attn.q_proj.weight",
    "encoder.layers.1.self_attn.k_proj.weight",
    "encoder.layers.2.self_attn.v_proj.bias",
    "encoder.layers.0.layer_norm1.weight",
    "encoder.layers.1.mlp.fc1.weight",
    "encoder.layers.2.mlp.fc2.weight",
    "final_layer_norm.weight",
]

PROMPTS = {
    "sd1": ["a photo of sks dog", "a photo of a dog in the snow, high detail"],
    "sd2": ["a sks dog wearing a red hat!", "a photo of a dog"],
}


def vae_fixture(name, batch, size, seed):
    vae = AutoencoderKL.from_pretrained(os.path.join(FIX, f"tiny-{name}", "vae")).float().eval()
    g = torch.Generator().manual_seed(seed)
    lat = size // 2 ** (len(vae.config.block_out_channels) - 1)
    c = vae.config.latent_channels
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    noise = torch.randn(batch, c, lat, lat, generator=g)
    z = torch.randn(batch, c, lat, lat, generator=g)
    r_dec = torch.randn(batch, 3, size, size, generator=g)
    r_sample = torch.randn(batch, c, lat, lat, generator=g)
    x.requires_grad_(True)
    z.requires_grad_(True)

    post = vae.encode(x).latent_dist
    sample = post.mean + post.std * noise
    dec = vae.decode(z).sample
    loss = (dec * r_dec).sum() + (sample * r_sample).sum()
    params = dict(vae.named_parameters())
    ws = [params[k] for k in VAE_WEIGHTS]
    grads = torch.autograd.grad(loss, [x, z] + ws)

    out = {
        "x": x.detach(), "noise": noise, "z": z.detach(), "r_dec": r_dec, "r_sample": r_sample,
        "mean": post.mean.detach(), "logvar": post.logvar.detach(), "sample": sample.detach(),
        "dec": dec.detach(), "grad.x": grads[0], "grad.z": grads[1],
    }
    for k, gr in zip(VAE_WEIGHTS, grads[2:]):
        out["grad." + k] = gr
    return out


def text_fixture(name, seed):
    base = os.path.join(FIX, f"tiny-{name}")
    tok = CLIPTokenizer.from_pretrained(os.path.join(base, "tokenizer"))
    te = CLIPTextModel.from_pretrained(os.path.join(base, "text_encoder")).float().eval()
    ids = tok(PROMPTS[name], padding="max_length", max_length=tok.model_max_length,
              truncation=True, return_tensors="pt").input_ids
    g = torch.Generator().manual_seed(seed)
    d = te.config.hidden_size
    r = torch.randn(ids.shape[0], ids.shape[1], d, generator=g)

    o = te(ids, output_hidden_states=True)
    last = o.last_hidden_state
    skip1 = te.final_layer_norm(o.hidden_states[-2])
    loss = (last * r).sum()
    params = dict(te.named_parameters())
    keys = ["embeddings.token_embedding.weight"] + TEXT_WEIGHTS
    grads = torch.autograd.grad(loss, [params[k] for k in keys])

    rows = torch.unique(ids)  # sorted
    out = {
        "ids": ids.to(torch.int64), "r": r, "last_hidden_state": last.detach(),
        "clip_skip_1": skip1.detach(), "grad_rows": rows.to(torch.int64),
        "grad.embeddings.token_embedding.weight.rows": grads[0][rows],
    }
    # The rows of ids that do not occur must have zero gradient.
    mask = torch.ones(grads[0].shape[0], dtype=torch.bool)
    mask[rows] = False
    assert grads[0][mask].abs().max() == 0
    for k, gr in zip(TEXT_WEIGHTS, grads[1:]):
        out["grad." + k] = gr
    return out


def main():
    torch.manual_seed(0)
    os.makedirs(OUT, exist_ok=True)
    for i, (name, batch, size) in enumerate([("sd1", 1, 16), ("sd2", 2, 32)]):
        for kind, tensors in [("vae", vae_fixture(name, batch, size, 100 + i)),
                              ("text", text_fixture(name, 200 + i))]:
            path = os.path.join(OUT, f"{name}_{kind}.safetensors")
            save_file({k: v.contiguous() for k, v in tensors.items()}, path)
            print(path, os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
