#!/usr/bin/env python3
"""The issue-7 ratio table from one tools/cuda/device-bench.sh log.

    python3 tools/cuda/ratio-table.py device-bench.log

It reads our `bench step` / `bench sample` lines per stage and the peer's
JSON lines (peer_diffusers_step.py), and prints the markdown table for
docs/performance.md: ours, PyTorch, ours / PyTorch (time ratios: lower is
better; images/s: higher is better). Missing figures show as "—".
"""
import json
import re
import sys

STEP = re.compile(r"^ours\s+median of \d+: .* step ([0-9.]+)s")
WHOLE = re.compile(r"^ours\s+median encode .* whole step ([0-9.]+)s")
MEM = re.compile(r"^ours\s+[0-9.]+ it/s, peak GPU memory .*?, ([0-9.]+) GiB above")
SAMPLE = re.compile(r"^ours\s+\d+ images in [0-9.]+s: ([0-9.]+) images/s")


def parse(lines):
    ours, peer, stage = {}, {}, None
    for line in lines:
        line = line.rstrip("\n")
        if line.startswith("=== "):
            stage = line[4:].split(":")[0].strip()
            continue
        if line.startswith("{"):
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "case" in d:
                peer[d["case"]] = d
            continue
        s = ours.setdefault(stage, {})
        for key, rx in (("step", STEP), ("whole", WHOLE), ("mem", MEM), ("ips", SAMPLE)):
            m = rx.search(line)
            if m:
                s[key] = float(m.group(1))
    return ours, peer


def fmt(v, unit):
    return "—" if v is None else f"{v:.3f} {unit}".strip()


def table(ours, peer):
    def o(stage, key):
        return ours.get(stage, {}).get(key)

    def p(case, key):
        return peer.get(case, {}).get(key)

    rows = [
        ("full fine-tune step, bf16", o("step", "step"), p("full_ft_bf16_autocast", "median_s"), "s", False),
        ("LoRA r4 step, bf16", o("lora", "step"), p("lora_r4_bf16", "median_s"), "s", False),
        ("whole step incl. VAE + text encode", o("whole", "whole"),
         p("full_ft_bf16_with_vae_and_text_encode", "median_s"), "s", False),
        ("class images, DDIM 50 + CFG, batch 4", o("sample", "ips"),
         p("class_images_ddim50_cfg_batch4", "images_per_s"), "img/s", True),
        ("peak memory, full fine-tune", o("step", "mem"), p("full_ft_bf16_autocast", "peak_gib"), "GiB", False),
        ("peak memory, LoRA", o("lora", "mem"), p("lora_r4_bf16", "peak_gib"), "GiB", False),
        ("full fine-tune step, gradient checkpointing", o("gradckpt", "step"),
         p("full_ft_bf16_autocast_gradckpt", "median_s"), "s", False),
        ("peak memory, gradient checkpointing", o("gradckpt", "mem"),
         p("full_ft_bf16_autocast_gradckpt", "peak_gib"), "GiB", False),
        ("full fine-tune step, block graphs released", o("release", "step"),
         p("full_ft_bf16_autocast", "median_s"), "s", False),
        ("peak memory, block graphs released", o("release", "mem"),
         p("full_ft_bf16_autocast", "peak_gib"), "GiB", False),
        ("full fine-tune step, cuDNN build", o("cudnn", "step"), p("full_ft_bf16_autocast", "median_s"), "s", False),
        ("full fine-tune step, DREAMBOOTH_NO_FUSED=1", o("nofused", "step"),
         p("full_ft_bf16_autocast", "median_s"), "s", False),
    ]
    out = ["| case | ours | PyTorch | ours / PyTorch |", "|---|---|---|---|"]
    for name, a, b, unit, higher in rows:
        ratio = "—" if a is None or not b else f"{a / b:.2f}" + (" (higher is better)" if higher else "")
        out.append(f"| {name} | {fmt(a, unit)} | {fmt(b, unit)} | {ratio} |")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    with open(sys.argv[1], encoding="utf-8") as f:
        print(table(*parse(f)))
