"""Builds the tiny random-weight Stable Diffusion pipelines the parity tests use.

    python tools/parity/make_tiny_models.py      # writes tests/fixtures/tiny-sd1, tiny-sd2

tiny-sd1: SD 1.x style (conv projections, int attention_head_dim, quick_gelu text
encoder, epsilon prediction). tiny-sd2: SD 2.x style (linear projections,
per-block head counts, upcast attention, gelu text encoder, v-prediction).
The tokenizer is CLIP's BPE cut to its first merges (from open_clip's
bpe_simple_vocab_16e6.txt.gz shipped in assets/clip/), so ids follow the real rules.
"""
import gzip, json, os, sys
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
N_MERGES = 1000


def bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def write_tokenizer(out_dir, pad_token):
    os.makedirs(out_dir, exist_ok=True)
    with gzip.open(os.path.join(ROOT, "assets", "clip", "bpe_simple_vocab_16e6.txt.gz"), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1:1 + N_MERGES]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    with open(os.path.join(out_dir, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f, ensure_ascii=False)
    with open(os.path.join(out_dir, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(out_dir, "vocab.json"), os.path.join(out_dir, "merges.txt"), pad_token=pad_token)
    tok.model_max_length = 77
    tok.save_pretrained(out_dir)
    return tok


def tiny_vae(**extra):
    """The tiny pipelines' VAE (two levels: latents 1/2 of the image)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
        norm_num_groups=4, sample_size=16, **extra,
    )


def build(name, sd2):
    torch.manual_seed(0 if not sd2 else 1)
    out = os.path.join(FIX, name)
    tok = write_tokenizer(os.path.join(out, "tokenizer"), "!" if sd2 else "<|endoftext|>")
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(16, 32, 32), layers_per_block=1 if sd2 else 2,
        norm_num_groups=4, cross_attention_dim=32,
        attention_head_dim=[2, 4, 4] if sd2 else 4,
        use_linear_projection=sd2, upcast_attention=sd2,
        flip_sin_to_cos=True, freq_shift=0,
    )
    vae = tiny_vae(scaling_factor=0.13025 if sd2 else 0.18215)
    te = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
        hidden_act="gelu" if sd2 else "quick_gelu",
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    ))
    # Random weights everywhere (zero-initialised layers would hide bugs).
    with torch.no_grad():
        for m in (unet, vae, te):
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    sched = DDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        set_alpha_to_one=False, steps_offset=1,
        prediction_type="v_prediction" if sd2 else "epsilon",
        timestep_spacing="trailing" if sd2 else "leading",
    )
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out, safe_serialization=True)
    print(name, "unet params", sum(p.numel() for p in unet.parameters()),
          "vae", sum(p.numel() for p in vae.parameters()), "te", sum(p.numel() for p in te.parameters()))


if __name__ == "__main__":
    build("tiny-sd1", sd2=False)
    build("tiny-sd2", sd2=True)
