#!/usr/bin/env python3
"""PyTorch twin of `dreambooth bench step`: the same UNet, shapes and steps
(forward, MSE, backward, AdamW) on the CPU with the same thread count.

Pinned versions: tools/parity/requirements.txt (torch 2.15.0, diffusers 0.42.1).

    python tools/bench/pytorch_cpu_step.py --arch toy --res 64 --batch 32 --threads 2

Prints one line per step, then one JSON line with the medians (seconds; `cpu`
is the process's CPU time per step, all threads) and peak RSS (bytes), which
`dreambooth bench step --compare-pytorch PYTHON` reads.
"""
import argparse
import json
import statistics
import time

import torch
from diffusers import UNet2DConditionModel

from bench_common import peak_rss

TOY = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "norm_num_groups": 16,
    "cross_attention_dim": 64,
    "attention_head_dim": 4,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD15 = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SDXL = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", default="toy", help="toy, sd15, sdxl or a diffusers UNet config.json")
    ap.add_argument("--res", type=int, default=None, help="pixels (latent = res/4 for toy, res/8 otherwise)")
    ap.add_argument("--latent", type=int, default=None, help="latent side (overrides --res)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    if args.arch == "toy":
        cfg = TOY
    elif args.arch in ("sd15", "sd1.5"):
        cfg = SD15
    elif args.arch == "sdxl":
        cfg = SDXL
    else:
        with open(args.arch) as f:
            cfg = {k: v for k, v in json.load(f).items() if not k.startswith("_")}
    unet = UNet2DConditionModel(**cfg).float().train()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2)

    b = args.batch
    if args.latent is not None:
        lat = args.latent
    elif args.arch == "toy":
        lat = (args.res or 64) // 4
    else:
        lat = (args.res or 256) // 8
    ctx_len = 16 if cfg["cross_attention_dim"] <= 128 else 77
    x = torch.randn(b, cfg["in_channels"], lat, lat)
    target = torch.randn(b, cfg["out_channels"], lat, lat)
    ctx = torch.randn(b, ctx_len, cfg["cross_attention_dim"])
    t = torch.randint(0, 1000, (b,)).float()
    added = None
    if cfg.get("addition_embed_type") == "text_time":
        # SDXL: random pooled text embeds, the time ids of the square (as ours).
        td = cfg["addition_time_embed_dim"]
        r = float(args.res or lat * 8)
        added = {"text_embeds": torch.randn(b, cfg["projection_class_embeddings_input_dim"] - 6 * td),
                 "time_ids": torch.tensor([[r, r, 0.0, 0.0, r, r]] * b)}
    print(f"pytorch {torch.__version__}: {params / 1e6:.1f}M params, batch {b}, latent {lat}x{lat}, "
          f"{torch.get_num_threads()} threads", flush=True)

    times = []
    for i in range(args.warmup + args.steps):
        c0 = time.process_time()
        t0 = time.perf_counter()
        pred = unet(x, t, encoder_hidden_states=ctx, added_cond_kwargs=added).sample
        loss = torch.nn.functional.mse_loss(pred, target)
        loss.item()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        cpu = time.process_time() - c0
        tag = "warm-up" if i < args.warmup else "step"
        print(f"  {tag} {i}: forward {t1 - t0:.3f}s backward {t2 - t1:.3f}s optimizer {t3 - t2:.3f}s "
              f"total {t3 - t0:.3f}s (CPU {cpu:.3f}s)", flush=True)
        if i >= args.warmup:
            times.append((t1 - t0, t2 - t1, t3 - t2, cpu))
    med = [statistics.median(c) for c in zip(*times)]
    print(json.dumps({
        "forward": med[0], "backward": med[1], "optimizer": med[2], "cpu": med[3],
        "peak_rss": peak_rss(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "params": params,
    }))


if __name__ == "__main__":
    main()
