#!/usr/bin/env python3
"""The issue-7 ratio table from one tools/cuda/device-bench.sh log.

    python3 tools/cuda/ratio-table.py device-bench.log

It reads our `bench step` / `bench sample` lines per stage and the peer's
JSON lines (peer_diffusers_step.py), and prints the markdown table for
docs/performance.md: ours, PyTorch, ours / PyTorch (time ratios: lower is
better; images/s: higher is better). Missing figures show as "—". When the
log has the `profile` stage's kernel tables (tools/cuda/kprof), a second
table follows: per profile, wall and GPU-busy time per step and the kernels
that take the most GPU time.
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


KPROF_HEAD = re.compile(r"^kprof: (\S+) \((?:inside|no capture)")
KPROF_WINDOW = re.compile(r"^kprof: window ([0-9.]+) ms, GPU busy ([0-9.]+) ms \(([0-9.]+)%\)")
KPROF_ROW = re.compile(r"^kprof:\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+([0-9.]+)\s+(.+)$")


def parse_profiles(lines):
    """{label: {"wall": ms, "busy": ms, "pct": %, "rows": [(ms, name)]}} in log order."""
    profiles, cur = {}, None
    for line in lines:
        line = line.rstrip("\n")
        m = KPROF_HEAD.match(line)
        if m:
            cur = profiles.setdefault(m.group(1), {"rows": []})
            continue
        if cur is None:
            continue
        m = KPROF_WINDOW.match(line)
        if m:
            cur.update(wall=float(m.group(1)), busy=float(m.group(2)), pct=float(m.group(3)))
            continue
        m = KPROF_ROW.match(line)
        if m:
            cur["rows"].append((float(m.group(1)), m.group(5)))
    return profiles


def profile_table(profiles, top=5):
    out = ["| profile | wall ms/step | GPU busy ms/step | busy | top kernels (ms/step) |", "|---|---|---|---|---|"]
    for label, p in profiles.items():
        kernels = "; ".join(f"{name[:60]} {ms:.2f}" for ms, name in p["rows"][:top])
        out.append(f"| {label} | {p.get('wall', 0):.2f} | {p.get('busy', 0):.2f} | {p.get('pct', 0):.0f}% | {kernels} |")
    return "\n".join(out)


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
        ("class images, recomputing attention (DREAMBOOTH_NO_FLASH=1)", o("sample-noflash", "ips"),
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
        ("full fine-tune step, fused backward pass", o("fusedbwd", "step"),
         p("full_ft_bf16_autocast", "median_s"), "s", False),
        ("peak memory, fused backward pass", o("fusedbwd", "mem"),
         p("full_ft_bf16_autocast", "peak_gib"), "GiB", False),
        ("full fine-tune step, fused backward pass + checkpointing", o("fusedckpt", "step"),
         p("full_ft_bf16_autocast_gradckpt", "median_s"), "s", False),
        ("peak memory, fused backward pass + checkpointing", o("fusedckpt", "mem"),
         p("full_ft_bf16_autocast_gradckpt", "peak_gib"), "GiB", False),
        ("full fine-tune step, cuDNN build", o("cudnn", "step"), p("full_ft_bf16_autocast", "median_s"), "s", False),
        ("full fine-tune step, DREAMBOOTH_NO_FUSED=1", o("nofused", "step"),
         p("full_ft_bf16_autocast", "median_s"), "s", False),
        ("full fine-tune step, DREAMBOOTH_NO_FLASH=1", o("noflash", "step"),
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
        lines = f.readlines()
    print(table(*parse(lines)))
    profiles = parse_profiles(lines)
    if profiles:
        print()
        print(profile_table(profiles))
