#!/usr/bin/env python3
"""Writes the single-file (original LDM / CompVis / A1111 layout) parity fixtures.

Run with the pinned venv (tools/parity/requirements.txt) from the repository root:

    python tools/parity/single_file.py

For tiny-sd1 and tiny-sd2 (tests/fixtures/tiny-sd*/, from make_tiny_models.py) it
writes tests/fixtures/tiny-sd1.safetensors and tests/fixtures/tiny-sd2.safetensors
(`python tools/parity/single_file.py sdxl`: tests/fixtures/tiny-sdxl.safetensors
from tiny-sdxl, tools/parity/sdxl.py, in the SDXL layout below):
the pipeline's weights renamed to the layout of an original Stable Diffusion
checkpoint by the mapping below, written independently of the Rust one:

  model.diffusion_model.*      UNet (input_blocks / middle_block / output_blocks)
  first_stage_model.*          VAE (encoder.down.N / decoder.up.N, mid attention as 1x1 convs)
  cond_stage_model.transformer.text_model.*   sd1: the CLIP text encoder (plus the
                               `position_ids` buffer real SD1 files carry)
  cond_stage_model.model.*     sd2: the OpenCLIP layout (fused attn.in_proj_weight/bias,
                               mlp.c_fc / c_proj, positional_embedding, ln_final), with one
                               more resblock than the text encoder uses (random weights:
                               SD2 files hold all 24 OpenCLIP layers and SD2 uses 23),
                               `text_projection` and `logit_scale`, which SD does not use
  betas, alphas_cumprod        DDPM buffers real files carry at the top level

SDXL (Stability's `sgm` layout, as sd_xl_base_1.0.safetensors):

  model.diffusion_model.*      UNet, with label_emb.0.0 / label_emb.0.2 (add_embedding)
  first_stage_model.*          VAE
  conditioner.embedders.0.transformer.text_model.*   CLIP ViT-L (text_encoder)
  conditioner.embedders.1.model.*   OpenCLIP ViT-bigG (text_encoder_2): every layer is
                               used, text_projection is the projection (transposed) and
                               logit_scale is unused

Metadata: `dreambooth.unet_config`, `dreambooth.vae_config`,
`dreambooth.text_encoder_config`, `dreambooth.scheduler_config` hold the tiny
pipeline's config.json files (the tiny models' heads do not follow the SD rule).

Before writing, the file is checked against diffusers' own single-file
converters (convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint,
convert_ldm_clip_checkpoint, convert_open_clip_checkpoint): converting it back
must give every tensor of the diffusers folder, bit for bit.
"""

import json
import os
import types

import torch
from safetensors.torch import load_file, save_file

from diffusers.loaders import single_file_utils as sfu

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")

UNET = "model.diffusion_model."
VAE = "first_stage_model."
CLIP = "cond_stage_model.transformer.text_model."
OPENCLIP = "cond_stage_model.model."

# diffusers ResnetBlock2D -> LDM ResBlock (in_layers = [norm, silu, conv], ...)
UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
              "conv_shortcut": "nin_shortcut"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


class Renamer:
    """Moves tensors from a diffusers state dict into an LDM one, one module at a time."""

    def __init__(self, sd, prefix):
        self.src = dict(sd)
        self.dst = {}
        self.prefix = prefix

    def module(self, diffusers, ldm, inner=None, reshape=None):
        keys = [k for k in self.src if k.startswith(diffusers + ".")]
        for k in keys:
            rest = k[len(diffusers) + 1:]
            if inner is not None:
                head, leaf = rest.rsplit(".", 1)
                rest = inner[head] + "." + leaf
            t = self.src.pop(k)
            if reshape is not None:
                t = reshape(t)
            self.dst[self.prefix + ldm + "." + rest] = t
        return len(keys)

    def done(self):
        assert not self.src, f"unmapped diffusers keys: {sorted(self.src)[:5]}"
        return self.dst


def unet_to_ldm(sd, cfg):
    r = Renamer(sd, UNET)
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    r.module("time_embedding.linear_1", "time_embed.0")
    r.module("time_embedding.linear_2", "time_embed.2")
    r.module("add_embedding.linear_1", "label_emb.0.0")
    r.module("add_embedding.linear_2", "label_emb.0.2")
    r.module("conv_in", "input_blocks.0.0")
    block = 1
    for i in range(n):
        for j in range(per):
            r.module(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{block}.0", UNET_RESNET)
            r.module(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{block}.1")
            block += 1
        if i + 1 < n:
            r.module(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{block}.0.op")
            block += 1
    r.module("mid_block.resnets.0", "middle_block.0", UNET_RESNET)
    r.module("mid_block.attentions.0", "middle_block.1")
    r.module("mid_block.resnets.1", "middle_block.2", UNET_RESNET)
    block = 0
    for i in range(n):
        for j in range(per + 1):
            r.module(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{block}.0", UNET_RESNET)
            has_attn = r.module(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{block}.1") > 0
            if j == per and i + 1 < n:
                slot = 2 if has_attn else 1
                r.module(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{block}.{slot}.conv")
            block += 1
    r.module("conv_norm_out", "out.0")
    r.module("conv_out", "out.2")
    return r.done()


def vae_to_ldm(sd, cfg):
    r = Renamer(sd, VAE)
    n, per = len(cfg["block_out_channels"]), cfg["layers_per_block"]
    as_conv = lambda t: t.reshape(*t.shape, 1, 1) if t.dim() == 2 else t  # noqa: E731
    for part in ["encoder", "decoder"]:
        r.module(f"{part}.conv_in", f"{part}.conv_in")
        r.module(f"{part}.conv_out", f"{part}.conv_out")
        r.module(f"{part}.conv_norm_out", f"{part}.norm_out")
        r.module(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", VAE_RESNET)
        r.module(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", VAE_RESNET)
        r.module(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", VAE_ATTN, as_conv)
    for i in range(n):
        for j in range(per):
            r.module(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", VAE_RESNET)
        r.module(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv")
    for i in range(n):
        level = n - 1 - i  # LDM numbers the decoder levels from the highest resolution
        for j in range(per + 1):
            r.module(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{level}.block.{j}", VAE_RESNET)
        r.module(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv")
    r.module("quant_conv", "quant_conv")
    r.module("post_quant_conv", "post_quant_conv")
    return r.done()


def clip_to_ldm(sd, cfg, prefix=CLIP):
    out = {prefix + k.removeprefix("text_model."): v for k, v in sd.items()}
    out[prefix + "embeddings.position_ids"] = torch.arange(cfg["max_position_embeddings"]).unsqueeze(0)
    return out


def openclip_to_ldm(sd, cfg, gen, prefix=OPENCLIP, sdxl=False):
    """SD 2.x: one more (unused, random) resblock and a random projection. SDXL: the
    encoder's own layers and its projection (OpenCLIP stores x @ P, transformers P x)."""
    OPENCLIP = prefix  # noqa: N806
    sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    h, n = cfg["hidden_size"], cfg["num_hidden_layers"]
    projection = sd.pop("text_projection.weight", None)
    out = {
        OPENCLIP + "token_embedding.weight": sd.pop("embeddings.token_embedding.weight"),
        OPENCLIP + "positional_embedding": sd.pop("embeddings.position_embedding.weight"),
        OPENCLIP + "ln_final.weight": sd.pop("final_layer_norm.weight"),
        OPENCLIP + "ln_final.bias": sd.pop("final_layer_norm.bias"),
    }
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(n):
        src, dst = f"encoder.layers.{i}.", f"{OPENCLIP}transformer.resblocks.{i}."
        for leaf in ["weight", "bias"]:
            qkv = [sd.pop(f"{src}self_attn.{p}_proj.{leaf}") for p in "qkv"]
            out[f"{dst}attn.in_proj_{leaf}"] = torch.cat(qkv, 0)
            for a, b in parts.items():
                out[f"{dst}{b}.{leaf}"] = sd.pop(f"{src}{a}.{leaf}")
    assert not sd, f"unmapped text encoder keys: {sorted(sd)[:5]}"
    if sdxl:
        out[OPENCLIP + "text_projection"] = projection.T.contiguous()
        out[OPENCLIP + "logit_scale"] = torch.tensor(4.6052)
        return out
    # The OpenCLIP layer SD2 skips: same shapes as the others, random values.
    for k in [k for k in out if k.startswith(f"{OPENCLIP}transformer.resblocks.{n - 1}.")]:
        extra = k.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")
        out[extra] = torch.randn(out[k].shape, generator=gen)
    out[OPENCLIP + "text_projection"] = torch.randn(h, h, generator=gen)
    out[OPENCLIP + "logit_scale"] = torch.tensor(4.6052)
    return out


def assert_same(what, got, want):
    assert set(got) == set(want), f"{what}: keys differ: {sorted(set(got) ^ set(want))[:6]}"
    for k, v in want.items():
        assert got[k].shape == v.shape and torch.equal(got[k], v), f"{what}: tensor {k} differs"


def check_with_diffusers(ckpt, unet, vae, text, cfgs, sd2):
    """diffusers' single-file converters must invert this script's mapping."""
    assert_same("unet", sfu.convert_ldm_unet_checkpoint(ckpt, cfgs["unet"]), unet)
    assert_same("vae", sfu.convert_ldm_vae_checkpoint(ckpt, cfgs["vae"]), vae)
    want = {k.removeprefix("text_model."): v for k, v in text.items()}
    if sd2:
        model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=cfgs["text_encoder"]["hidden_size"]))
        got = sfu.convert_open_clip_checkpoint(model, ckpt)
        n = cfgs["text_encoder"]["num_hidden_layers"]
        # diffusers drops resblock 23 by name (real SD2 size); drop the tiny model's extra one here.
        got = {k.removeprefix("text_model."): v for k, v in got.items()
               if k != "text_projection.weight" and f"encoder.layers.{n}." not in k}
    else:
        got = {k.removeprefix("text_model."): v for k, v in sfu.convert_ldm_clip_checkpoint(ckpt).items()
               if not k.endswith("position_ids")}
    assert_same("text encoder", got, want)


SDXL_CLIP = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP = "conditioner.embedders.1.model."


def read_pipeline(base, text_encoders):
    """The configs and the UNet, VAE and text encoders' weights of a diffusers folder."""
    cfgs = {}
    parts = [("unet", "unet/config.json"), ("vae", "vae/config.json")]
    parts += [(t, f"{t}/config.json") for t in text_encoders]
    for part, cfg_file in parts + [("scheduler", "scheduler/scheduler_config.json")]:
        with open(os.path.join(base, cfg_file)) as f:
            cfgs[part] = json.load(f)
    weights = [load_file(os.path.join(base, p, "diffusion_pytorch_model.safetensors")) for p in ("unet", "vae")]
    weights += [load_file(os.path.join(base, t, "model.safetensors")) for t in text_encoders]
    return cfgs, weights


def sdxl():
    base = os.path.join(FIX, "tiny-sdxl")
    cfgs, (unet, vae, text, text2) = read_pipeline(base, ["text_encoder", "text_encoder_2"])
    gen = torch.Generator().manual_seed(310)
    ckpt = {}
    ckpt.update(unet_to_ldm(unet, cfgs["unet"]))
    ckpt.update(vae_to_ldm(vae, cfgs["vae"]))
    ckpt.update(clip_to_ldm(text, cfgs["text_encoder"], SDXL_CLIP))
    ckpt.update(openclip_to_ldm(text2, cfgs["text_encoder_2"], gen, SDXL_OPENCLIP, sdxl=True))

    # diffusers' converters must invert the mapping.
    assert_same("unet", sfu.convert_ldm_unet_checkpoint(ckpt, cfgs["unet"]), unet)
    assert_same("vae", sfu.convert_ldm_vae_checkpoint(ckpt, cfgs["vae"]), vae)
    got = {k.removeprefix("text_model."): v
           for k, v in sfu.convert_ldm_clip_checkpoint(ckpt, remove_prefix="conditioner.embedders.0.transformer.").items()
           if not k.endswith("position_ids")}
    assert_same("text encoder", got, {k.removeprefix("text_model."): v for k, v in text.items()})
    model = types.SimpleNamespace(config=types.SimpleNamespace(hidden_size=cfgs["text_encoder_2"]["hidden_size"]))
    got = sfu.convert_open_clip_checkpoint(model, ckpt, prefix=SDXL_OPENCLIP)
    got = {k.removeprefix("text_model."): v for k, v in got.items()}
    assert_same("text encoder 2", got, {k.removeprefix("text_model."): v for k, v in text2.items()})

    metadata = {"format": "pt"}
    for part, cfg in cfgs.items():
        metadata[f"dreambooth.{part}_config"] = json.dumps(cfg, sort_keys=True)
    # The tiny vocabulary (both tokenizers share it), as files this tool writes carry it.
    for key, name in [("vocab", "vocab.json"), ("merges", "merges.txt")]:
        with open(os.path.join(base, "tokenizer", name), encoding="utf-8") as f:
            metadata[f"dreambooth.tokenizer_{key}"] = f.read()
    path = os.path.join(FIX, "tiny-sdxl.safetensors")
    save_file({k: v.contiguous() for k, v in ckpt.items()}, path, metadata=metadata)
    print(path, len(ckpt), "tensors", os.path.getsize(path), "bytes")


def main():
    import sys
    if sys.argv[1:] == ["sdxl"]:
        return sdxl()
    for i, name in enumerate(["sd1", "sd2"]):
        base = os.path.join(FIX, f"tiny-{name}")
        cfgs, (unet, vae, text) = read_pipeline(base, ["text_encoder"])
        gen = torch.Generator().manual_seed(300 + i)

        ckpt = {}
        ckpt.update(unet_to_ldm(unet, cfgs["unet"]))
        ckpt.update(vae_to_ldm(vae, cfgs["vae"]))
        if name == "sd2":
            ckpt.update(openclip_to_ldm(text, cfgs["text_encoder"], gen))
        else:
            ckpt.update(clip_to_ldm(text, cfgs["text_encoder"]))
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        ckpt["betas"] = betas.float()
        ckpt["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()

        check_with_diffusers(ckpt, unet, vae, text, cfgs, name == "sd2")

        metadata = {"format": "pt"}
        for part, cfg in cfgs.items():
            metadata[f"dreambooth.{part}_config"] = json.dumps(cfg, sort_keys=True)
        path = os.path.join(FIX, f"tiny-{name}.safetensors")
        save_file({k: v.contiguous() for k, v in ckpt.items()}, path, metadata=metadata)
        print(path, len(ckpt), "tensors", os.path.getsize(path), "bytes")


if __name__ == "__main__":
    main()
