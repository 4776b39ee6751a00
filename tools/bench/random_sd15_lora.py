#!/usr/bin/env python3
"""Writes a random LoRA for the SD 1.5 shape in diffusers/peft naming (UNet
attention to_q/k/v/out.0 and the text encoder's q/k/v/out_proj, rank 8,
alpha 8 in `lora_adapter_metadata`, f32), to time `merge` on a real-size model:

    .venv/bin/python tools/bench/random_sd15_checkpoint.py /tmp/sd15-random.ckpt
    .venv/bin/python tools/bench/random_sd15_lora.py /tmp/sd15-lora.safetensors
    /usr/bin/time -v target/release/dreambooth merge --model /tmp/sd15-random.ckpt \\
        --lora /tmp/sd15-lora.safetensors --out /tmp/merged-fp16.safetensors --dtype fp16

The modules come from diffusers' and transformers' own SD 1.5 classes (built
on the meta device: only names and shapes are needed).
"""

import json
import sys

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

RANK = 8


def main():
    out = sys.argv[1]
    torch.manual_seed(0)
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        text = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77,
            projection_dim=768, pad_token_id=1, bos_token_id=49406, eos_token_id=49407,
        ))
    tensors = {}
    for prefix, model, targets in [
        ("unet", unet, ("to_q", "to_k", "to_v", "to_out.0")),
        ("text_encoder", text, ("q_proj", "k_proj", "v_proj", "out_proj")),
    ]:
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.endswith(targets):
                name = name.removeprefix("text_model.")
                tensors[f"{prefix}.{name}.lora_A.weight"] = torch.randn(RANK, m.in_features) / m.in_features**0.5
                tensors[f"{prefix}.{name}.lora_B.weight"] = torch.randn(m.out_features, RANK) * 0.01
    meta = {}
    for prefix, targets in [("unet", ["to_q", "to_k", "to_v", "to_out.0"]),
                            ("text_encoder", ["q_proj", "k_proj", "v_proj", "out_proj"])]:
        meta.update({f"{prefix}.r": RANK, f"{prefix}.lora_alpha": RANK, f"{prefix}.target_modules": targets,
                     f"{prefix}.peft_type": "LORA"})
    save_file(tensors, out, metadata={"format": "pt", "lora_adapter_metadata": json.dumps(meta)})
    print(f"{out}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
