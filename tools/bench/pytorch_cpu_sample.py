#!/usr/bin/env python3
"""PyTorch twin of `dreambooth bench sample`: diffusers' StableDiffusionPipeline
on the same diffusers folder, with DDIM (eta 0), the same steps, batch size,
guidance scale and thread count, producing 8-bit PIL images as ours produces
8-bit RGB images.

Pinned versions: tools/parity/requirements.txt (torch 2.15.0, diffusers 0.42.1).

    python tools/bench/pytorch_cpu_sample.py --model assets/tiny-model --images 16 --threads 2

Prints one line per batch, then one JSON line (seconds of the timed run,
images, load time, peak RSS in bytes), which
`dreambooth bench sample --compare-pytorch PYTHON` reads.
"""
import argparse
import json
import time

import torch

from bench_common import peak_rss


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="assets/tiny-model", help="a diffusers folder")
    ap.add_argument("--prompt", default="a photo of a ball")
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--guidance", type=float, default=7.5)
    ap.add_argument("--warmup", type=int, default=1, help="untimed batches first")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    # As pytorch_cpu_step.py: intra-op threads only.
    torch.set_num_threads(args.threads)
    import diffusers
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    t0 = time.perf_counter()
    pipe = StableDiffusionPipeline.from_pretrained(
        args.model, safety_checker=None, requires_safety_checker=False, torch_dtype=torch.float32
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    load_seconds = time.perf_counter() - t0
    print(f"pytorch {torch.__version__}, diffusers {diffusers.__version__}: {args.model}, "
          f"{args.images} images, batch {args.batch}, DDIM {args.steps} steps, guidance {args.guidance}, "
          f"{torch.get_num_threads()} threads", flush=True)

    def run(n, seed):
        gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
        out = pipe(prompt=[args.prompt] * n, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   eta=0.0, generator=gens, output_type="pil")
        assert len(out.images) == n
        return out.images

    with torch.inference_mode():
        for i in range(args.warmup):
            t = time.perf_counter()
            run(args.batch, 1_000_000 + i)
            print(f"  warm-up batch {i}: {time.perf_counter() - t:.3f}s", flush=True)
        t = time.perf_counter()
        done = 0
        b = 0
        while done < args.images:
            n = min(args.batch, args.images - done)
            tb = time.perf_counter()
            run(n, args.seed + done)
            print(f"  batch {b}: {time.perf_counter() - tb:.3f}s", flush=True)
            done += n
            b += 1
        seconds = time.perf_counter() - t
    print(json.dumps({
        "seconds": seconds, "images": args.images, "load_seconds": load_seconds,
        "peak_rss": peak_rss(), "torch": torch.__version__, "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
