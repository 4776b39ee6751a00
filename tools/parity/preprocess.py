#!/usr/bin/env python3
"""Writes the fixtures for the evaluation encoders' image preprocessing.

Run with the pinned venv (tools/parity/requirements.txt; Pillow 13.0.0 with its
bundled libjpeg-turbo) from the repository root:

    python tools/parity/preprocess.py

The processors are built from the real checkpoints' preprocessor_config.json
(openai/clip-vit-base-patch32 and clip-vit-large-patch14 share theirs;
facebook/dino-vits16's is the one after its "Fix image mean and std" commit),
with transformers' PIL backend. Photos are opened as our loader opens them:
`ImageOps.exif_transpose` (EXIF orientation applied), then `.convert("RGB")`.
transformers itself applies no EXIF orientation, so this is the caller's step,
done the same way on both sides (no photo of the dataset has an orientation tag).

tests/fixtures/encoders/
  jpeg.safetensors          small synthetic JPEGs written by Pillow, and Pillow's decode
    <name>.jpg u8 (n,)      the file's bytes, for name in JPEGS (4:2:0, 4:2:2, 4:4:4,
                            progressive, grayscale, CMYK, EXIF orientation 6, restart
                            markers; odd sizes, so partial blocks and MCUs are covered)
    <name>.rgb u8 (H,W,3)   open_photo(file): Pillow's RGB, EXIF orientation applied
  resize.safetensors        Pillow's resampling on a random 8-bit image
    img (37,53,3) u8        the input (H, W, C)
    <filter>.<h>x<w> u8     Image.resize((w, h), filter), bilinear / bicubic, for
                            shapes on both sides of Pillow's pass-order rule
                            (vertical pass first when the height shrinks by more
                            than twice as many pixels as the width does)
  preprocess.safetensors    (only when ../shared/data/dreambooth-dataset exists)
    decode.<subject>/<file> u8 (32,)  SHA-256 of Pillow's RGB decode of every JPEG
    for case i of CASES (a photo, optionally cropped to another size and aspect):
    src.<i> (32,32,3) u8    Pillow's decode, the 32x32 block at the photo's centre
    <proc>.levels.<i> (224,224,3) u8  the processor's resized and cropped 8-bit
                            image (do_rescale and do_normalize off)
    <proc>.lut.<i> (3,256) f32  the processor's pixel_values for each level of
                            each channel (NaN where a level does not occur):
                            pixel_values[c, y, x] == lut[c, levels[y, x, c]]
                            exactly, checked here, so the full f32 output is
                            stored losslessly in 150 KB
    <proc> is clip (CLIPImageProcessor) or dino (ViTImageProcessor)
"""

import glob
import hashlib
import io
import os

import numpy as np
import torch
from PIL import Image, ImageOps
from safetensors.torch import save_file
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "encoders")
DATA = os.path.join(ROOT, "..", "shared", "data", "dreambooth-dataset")

# openai/clip-vit-base-patch32 and openai/clip-vit-large-patch14 preprocessor_config.json.
CLIP_CONFIG = {
    "crop_size": 224,
    "do_center_crop": True,
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor",
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "resample": 3,
    "size": 224,
}
# facebook/dino-vits16 preprocessor_config.json (size 224 means 224x224 for ViT).
DINO_CONFIG = {
    "do_normalize": True,
    "do_resize": True,
    "feature_extractor_type": "ViTFeatureExtractor",
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "resample": 2,
    "size": 224,
}

# (photo, crop box (left, top, right, bottom) or None). The dataset's photos are all
# 512x512; crops give other sizes and aspects, and both of Pillow's pass orders:
CASES = [
    ("dog/00.jpg", None),  # 512x512: both processors shrink both sides equally
    ("cat/01.jpg", (0, 85, 512, 426)),  # 512x341 landscape
    ("backpack/02.jpg", (106, 0, 406, 512)),  # 300x512: DINO runs the vertical pass first
    ("teapot/00.jpg", (131, 0, 381, 512)),  # 250x512: CLIP (512->458, 250->224) vertical first
    ("clock/01.jpg", (0, 156, 512, 356)),  # 512x200: CLIP enlarges the height
    ("duck_toy/00.jpg", (166, 181, 346, 331)),  # 180x150: both processors enlarge
]

# (h, w) from 37x53: down (h first), 9x50 (v first: 28 > 2*3), up, 11x40 (26 = 2*13: still
# h first) against 10x40 (27 > 26: v first), 20x60 (v first: an enlarged width counts
# as a negative shrink), and one-pass shapes (width only, height only).
RESIZE_SHAPES = [(24, 31), (9, 50), (60, 70), (11, 40), (10, 40), (20, 60), (37, 20), (30, 53)]


def open_photo(path):
    return ImageOps.exif_transpose(Image.open(path)).convert("RGB")


def synthetic(w, h, seed):
    """Smooth colour gradients with edges and noise: every DCT frequency matters."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)
    g = 255 * ((x + 2 * y) % 37 < 18)
    b = 255 * x / w
    a = np.stack([r, g, b], -1) + rng.normal(0, 12, (h, w, 3))
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def jpegs():
    rgb = synthetic(61, 45, 4)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    cases = {
        "ycc420": (rgb, dict(quality=90)),
        "ycc422": (rgb, dict(quality=90, subsampling=1)),
        "ycc444": (rgb, dict(quality=95, subsampling=0)),
        "progressive": (rgb, dict(quality=85, progressive=True)),
        "restart": (rgb, dict(quality=80, restart_marker_blocks=2)),
        "gray": (rgb.convert("L"), dict(quality=90)),
        "cmyk": (rgb.convert("CMYK"), dict(quality=90)),
        "exif6": (synthetic(40, 22, 5), dict(quality=90, exif=exif.tobytes())),
    }
    out = {}
    for name, (img, kw) in cases.items():
        buf = io.BytesIO()
        img.save(buf, "JPEG", **kw)
        data = buf.getvalue()
        out[f"{name}.jpg"] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        dec = np.asarray(open_photo(io.BytesIO(data)))
        out[f"{name}.rgb"] = torch.from_numpy(dec.copy())
        print(name, len(data), "bytes, decoded", dec.shape)
    save_file(out, os.path.join(OUT, "jpeg.safetensors"))


def resize():
    rng = np.random.default_rng(3)
    a = rng.integers(0, 256, size=(37, 53, 3), dtype=np.uint8)
    img = Image.fromarray(a)
    out = {"img": torch.from_numpy(a)}
    for name, f in [("bilinear", Image.BILINEAR), ("bicubic", Image.BICUBIC)]:
        for h, w in RESIZE_SHAPES:
            out[f"{name}.{h}x{w}"] = torch.from_numpy(np.asarray(img.resize((w, h), f)).copy())
    save_file(out, os.path.join(OUT, "resize.safetensors"))


def lossless(proc, img):
    """The processor's output as (levels HWC u8, lut (3,256) f32), checked exact."""
    x = proc(images=img, return_tensors="np")["pixel_values"][0]
    raw = proc(images=img, do_rescale=False, do_normalize=False, return_tensors="np")
    raw = raw["pixel_values"][0]
    assert x.shape == raw.shape == (3, 224, 224), (x.shape, raw.shape)
    assert x.dtype == np.float32, x.dtype
    levels = raw.astype(np.uint8)
    assert np.array_equal(levels, raw)
    lut = np.full((3, 256), np.nan, dtype=np.float32)
    for c in range(3):
        lut[c, levels[c].ravel()] = x[c].ravel()
        assert np.array_equal(lut[c][levels[c]], x[c]), "not a function of the level"
    return levels.transpose(1, 2, 0).copy(), lut


def preprocess():
    if not os.path.isdir(DATA):
        print(f"{DATA} is absent: preprocessing fixture not written")
        return
    procs = [
        ("clip", CLIPImageProcessorPil.from_dict(CLIP_CONFIG)),
        ("dino", ViTImageProcessorPil.from_dict(DINO_CONFIG)),
    ]
    out = {}
    files = sorted(glob.glob(os.path.join(DATA, "*", "*.jpg")))
    for f in files:
        a = np.asarray(open_photo(f))
        name = os.path.relpath(f, DATA).replace(os.sep, "/")
        digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).digest()
        out[f"decode.{name}"] = torch.frombuffer(bytearray(digest), dtype=torch.uint8)
    for i, (name, box) in enumerate(CASES):
        img = open_photo(os.path.join(DATA, name))
        a = np.asarray(img)
        h, w = a.shape[0] // 2, a.shape[1] // 2
        out[f"src.{i}"] = torch.from_numpy(a[h - 16 : h + 16, w - 16 : w + 16].copy())
        if box is not None:
            img = img.crop(box)
        for key, proc in procs:
            levels, lut = lossless(proc, img)
            out[f"{key}.levels.{i}"] = torch.from_numpy(levels)
            out[f"{key}.lut.{i}"] = torch.from_numpy(lut)
        print(name, img.size)
    save_file(out, os.path.join(OUT, "preprocess.safetensors"))
    print(f"preprocess: {len(files)} decode digests, {len(CASES)} cases")


if __name__ == "__main__":
    os.makedirs(OUT, exist_ok=True)
    jpegs()
    resize()
    preprocess()
