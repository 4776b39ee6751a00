#!/usr/bin/env python3
"""Writes the weight-format fixtures: PyTorch pickles and sharded safetensors.

Run with the pinned venv (tools/parity/requirements.txt) from the repository root,
after make_tiny_models.py and single_file.py:

    python tools/parity/weight_formats.py

It writes tests/fixtures/formats/:

  tiny-sd1-weights/   tiny-sd1's weights as diffusers and transformers save them
                      in other formats: unet/diffusion_pytorch_model.bin and
                      text_encoder/pytorch_model.bin (`save_pretrained(...,
                      safe_serialization=False)`, zip pickles), vae/ as sharded
                      safetensors with diffusion_pytorch_model.safetensors.index.json
                      (`save_pretrained(..., max_shard_size=...)`). The Rust test puts
                      them in a copy of tiny-sd1 in place of its safetensors files
                      and must read every tensor bit for bit.
  sd1-shaped.ckpt     an original-layout SD 1.x checkpoint as the CompVis
                      training code saved them: a Lightning dict
                      {"state_dict": ..., "global_step": ..., "epoch": ...}, fp16,
                      with DDPM buffers and `model_ema.*` entries, no metadata (so
                      the configs must be detected from the shapes: the model follows
                      the SD rules, with 32 channels in each of 4 levels, one resnet per
                      block, 32 norm groups and 8 heads per block). Its keys come from single_file.py's mapping.
  layouts.pt, strided.pt, no-tensors.pt, int32-only.pt
                      small pickles: a transposed tensor and a view into a larger
                      storage (read), a strided view, a dict without tensors and a
                      state dict of int32 only (refused with messages).
  sd1-shaped-outputs.safetensors
                      diffusers' / transformers' outputs of that model (loaded from the
                      fp16 weights in f32): the text encoder's last hidden state for
                      fixed ids, the UNet's noise prediction for a fixed latent, timestep
                      and that context, and the VAE's decoding of a fixed latent.
"""

import json
import os
import shutil
import sys
import tempfile

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import single_file as sf  # noqa: E402  (the independent diffusers -> LDM mapping)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIX = os.path.join(ROOT, "tests", "fixtures")
OUT = os.path.join(FIX, "formats")


def save_pickles():
    """tiny-sd1's weights as .bin pickles (UNet, text encoder) and sharded safetensors (VAE)."""
    src = os.path.join(FIX, "tiny-sd1")
    dst = os.path.join(OUT, "tiny-sd1-weights")
    shutil.rmtree(dst, ignore_errors=True)
    with tempfile.TemporaryDirectory() as tmp:
        unet = UNet2DConditionModel.from_pretrained(os.path.join(src, "unet"))
        unet.save_pretrained(os.path.join(tmp, "unet"), safe_serialization=False)
        text = CLIPTextModel.from_pretrained(os.path.join(src, "text_encoder"))
        te = os.path.join(tmp, "text_encoder")
        text.save_pretrained(te, safe_serialization=False)
        if not os.path.exists(os.path.join(te, "pytorch_model.bin")):
            # transformers 5 writes only safetensors: save what transformers 4 wrote
            # (torch.save of the state dict) in its place.
            os.remove(os.path.join(te, "model.safetensors"))
            torch.save(text.state_dict(), os.path.join(te, "pytorch_model.bin"))
        vae = AutoencoderKL.from_pretrained(os.path.join(src, "vae"))
        vae.save_pretrained(os.path.join(tmp, "vae"), max_shard_size="200KB")
        for part, want in [("unet", "diffusion_pytorch_model.bin"), ("text_encoder", "pytorch_model.bin"),
                           ("vae", "diffusion_pytorch_model.safetensors.index.json")]:
            names = sorted(os.listdir(os.path.join(tmp, part)))
            assert want in names, (part, names)
            os.makedirs(os.path.join(dst, part))
            for n in names:
                if n != "config.json":
                    shutil.copy(os.path.join(tmp, part, n), os.path.join(dst, part, n))
            print(part, sorted(os.listdir(os.path.join(dst, part))))
        shards = [n for n in os.listdir(os.path.join(dst, "vae")) if "-of-" in n]
        assert len(shards) >= 2, shards
        # Each file must hold exactly the tensors of the safetensors original.
        for part, f in [("unet", "diffusion_pytorch_model"), ("text_encoder", "model"), ("vae", "diffusion_pytorch_model")]:
            want = load_file(os.path.join(src, part, f + ".safetensors"))
            if part == "vae":
                got = {}
                for n in shards:
                    got.update(load_file(os.path.join(dst, "vae", n)))
            else:
                name = "diffusion_pytorch_model.bin" if part == "unet" else "pytorch_model.bin"
                got = torch.load(os.path.join(dst, part, name), weights_only=True)
            got = {k: v for k, v in got.items() if not k.endswith("position_ids")}
            want = {k: v for k, v in want.items() if not k.endswith("position_ids")}
            sf.assert_same(part, got, want)


def sd1_shaped():
    torch.manual_seed(410)
    unet = UNet2DConditionModel(
        sample_size=64,
        block_out_channels=(32, 32, 32, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
    ).eval()
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        layers_per_block=1,
        sample_size=512,
    ).eval()
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=1, hidden_act="quick_gelu", max_position_embeddings=77,
        projection_dim=768, pad_token_id=1, bos_token_id=0, eos_token_id=2,
    )).eval()
    # Round every weight to fp16 once: the file stores fp16, the reference computes
    # in f32 from those values (as the Rust loader does).
    for m in (unet, vae, text):
        with torch.no_grad():
            for p in m.parameters():
                p.copy_(p.half().float())
    cfgs = {"unet": dict(unet.config), "vae": dict(vae.config), "text_encoder": text.config.to_dict()}
    ckpt = {}
    ckpt.update(sf.unet_to_ldm(unet.state_dict(), cfgs["unet"]))
    ckpt.update(sf.vae_to_ldm(vae.state_dict(), cfgs["vae"]))
    text_sd = {k: v for k, v in text.state_dict().items() if not k.endswith("position_ids")}
    ckpt.update(sf.clip_to_ldm(text_sd, cfgs["text_encoder"]))
    sf.check_with_diffusers(ckpt, unet.state_dict(), vae.state_dict(), text_sd, cfgs, False)
    ckpt["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    state = {k: v.half().contiguous() if v.is_floating_point() else v for k, v in ckpt.items()}
    state["betas"] = betas.float()
    state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
    # EMA bookkeeping and an EMA copy, as non-pruned CompVis checkpoints hold them.
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(0, dtype=torch.int32)
    state["model_ema.diffusion_modelconv_inweight"] = state["model.diffusion_model.input_blocks.0.0.weight"].clone()
    path = os.path.join(OUT, "sd1-shaped.ckpt")
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6}, path)
    print(path, len(state), "tensors", os.path.getsize(path), "bytes")

    g = torch.Generator().manual_seed(411)
    ids = torch.tensor([[0, 5, 17, 42, 99, 2] + [1] * 71])
    with torch.no_grad():
        hidden = text(ids).last_hidden_state
        sample = torch.randn(1, 4, 16, 16, generator=g)
        timesteps = torch.tensor([321])
        eps = unet(sample, timesteps, encoder_hidden_states=hidden).sample
        z = torch.randn(1, 4, 4, 4, generator=g)
        dec = vae.decode(z).sample
    out = {"ids": ids, "hidden": hidden, "sample": sample, "timesteps": timesteps.float(), "eps": eps,
           "z": z, "dec": dec}
    path = os.path.join(OUT, "sd1-shaped-outputs.safetensors")
    save_file({k: v.contiguous() for k, v in out.items()}, path,
              metadata={k + "_config": json.dumps(v, sort_keys=True, default=str) for k, v in cfgs.items()})
    print(path)


def small_pickles():
    """Pickles the reader must handle or refuse by name."""
    x = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    # A transposed (column-major) tensor, and a view into a larger storage.
    torch.save({"x": x, "xt": x.t(), "row": x[1]}, os.path.join(OUT, "layouts.pt"))
    torch.save({"every_other": x[:, ::2]}, os.path.join(OUT, "strided.pt"))
    torch.save({"epoch": 3, "note": "no tensors"}, os.path.join(OUT, "no-tensors.pt"))
    torch.save({"state_dict": {"step": torch.tensor([1, 2], dtype=torch.int32)}},
               os.path.join(OUT, "int32-only.pt"))


def main():
    os.makedirs(OUT, exist_ok=True)
    save_pickles()
    sd1_shaped()
    small_pickles()


if __name__ == "__main__":
    main()
