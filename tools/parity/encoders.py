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
  resize.safetensors        Pillow's resampling on a random 8-bit image
    img (37,53,3) u8        the input (H, W, C)
    <filter>.<h>x<w> u8     Image.resize((w, h), filter) for bilinear / bicubic,
                            down (24x31, 9x50) and up (60x70)
  preprocess.safetensors    (only when ../shared/data/dreambooth-dataset exists)
    for photo i in PHOTOS:
    clip.<i> (3,64,64) f32  CLIPImageProcessor (PIL backend) output, rows/cols 80..144
    vit.<i>  (3,64,64) f32  ViTImageProcessor (PIL backend) with facebook/dino-vits16's
                            settings (224x224 bilinear, ImageNet mean/std), rows/cols 80..144
    src.<i>  (H,W,3) u8     PIL's decode of the JPEG, a 32x32 block at its centre
                            (to tell decoder differences from resampling ones)
"""

import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "encoders")
DATA = os.path.join(ROOT, "..", "shared", "data", "dreambooth-dataset")
PHOTOS = ["dog/00.jpg", "cat/01.jpg", "backpack/02.jpg"]
CROP = slice(80, 144)


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


def resize():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    out = {"img": torch.from_numpy(a)}
    for name, f in [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)]:
        for h, w in [(24, 31), (9, 50), (60, 70)]:
            out[f"{name}.{h}x{w}"] = torch.from_numpy(np.asarray(img.resize((w, h), f)).copy())
    save_file(out, os.path.join(OUT, "resize.safetensors"))


def preprocess():
    if not os.path.isdir(DATA):
        print(f"{DATA} is absent: preprocessing fixture not written")
        return
    clip_p = CLIPImageProcessorPil()
    # facebook/dino-vits16/preprocessor_config.json: size 224, resample 2, ImageNet mean/std.
    vit_p = ViTImageProcessorPil(
        size={"height": 224, "width": 224},
        resample=Image.BILINEAR,
        image_mean=IMAGENET_DEFAULT_MEAN,
        image_std=IMAGENET_DEFAULT_STD,
    )
    out = {}
    for i, name in enumerate(PHOTOS):
        img = Image.open(os.path.join(DATA, name)).convert("RGB")
        a = np.asarray(img)
        h, w = a.shape[0] // 2, a.shape[1] // 2
        out[f"src.{i}"] = torch.from_numpy(a[h - 16 : h + 16, w - 16 : w + 16].copy())
        for key, proc in [("clip", clip_p), ("vit", vit_p)]:
            x = proc(images=img, return_tensors="np")["pixel_values"][0]
            assert x.shape == (3, 224, 224), x.shape
            out[f"{key}.{i}"] = torch.from_numpy(x[:, CROP, CROP].copy()).float()
    save_file(out, os.path.join(OUT, "preprocess.safetensors"))
    print("preprocess", sorted(out))


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    models()
    resize()
    preprocess()
