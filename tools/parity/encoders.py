#!/usr/bin/env python3
"""Writes the evaluation encoders' parity fixtures with transformers.

Run with the pinned venv (tools/parity/requirements.txt) from the repository root:

    python tools/parity/encoders.py

tests/fixtures/encoders/
  clip/{model.safetensors,config.json}   tiny random CLIPModel (vision 32px, patch 8,
                                         hidden 32, 2 layers, 4 heads; text: the
                                         tiny-sd1 tokenizer's vocab, hidden 32, 2 layers)
  dino/{model.safetensors,config.json}   tiny random ViTModel (no pooler; 32px, patch 8,
                                         hidden 32, 2 layers, 4 heads)
  io.safetensors
    pixels (2,3,32,32)      random inputs (N(0,1))
    ids (2,77) int64        the tiny-sd1 tokenizer on two prompts, padded to 77
    clip.image_embeds       CLIPModel.get_image_features(pixels)
    clip.text_embeds        CLIPModel.get_text_features(ids)
    dino.cls                ViTModel(pixels).last_hidden_state[:, 0]

The image processors' fixtures (jpeg, resize and preprocess.safetensors) come
from tools/parity/preprocess.py.
"""

import os

import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "encoders")


def tiny_clip(vocab, tok):
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            hidden_act="quick_gelu",
        ),
        projection_dim=24,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    # Random init leaves layer norms at (1, 0): perturb every parameter so each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def tiny_dino():
    cfg = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        hidden_act="gelu",
        layer_norm_eps=1e-12,
        qkv_bias=True,
    )
    torch.manual_seed(1)
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def models():
    tok = CLIPTokenizer.from_pretrained(os.path.join(FIX, "tiny-sd1", "tokenizer"))
    clip = tiny_clip(len(tok), tok)
    dino = tiny_dino()
    clip.save_pretrained(os.path.join(OUT, "clip"))
    dino.save_pretrained(os.path.join(OUT, "dino"))

    g = torch.Generator().manual_seed(2)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    prompts = ["a photo of sks dog", "a red backpack on a table in the snow"]
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        img = clip.get_image_features(pixel_values=pixels)
        txt = clip.get_text_features(input_ids=ids)
        img = img.pooler_output if hasattr(img, "pooler_output") else img
        txt = txt.pooler_output if hasattr(txt, "pooler_output") else txt
        cls = dino(pixel_values=pixels).last_hidden_state[:, 0]
    save_file(
        {
            "pixels": pixels.contiguous(),
            "ids": ids.contiguous(),
            "clip.image_embeds": img.contiguous(),
            "clip.text_embeds": txt.contiguous(),
            "dino.cls": cls.contiguous(),
        },
        os.path.join(OUT, "io.safetensors"),
    )
    print("clip", tuple(img.shape), tuple(txt.shape), "dino", tuple(cls.shape))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    models()
