"""Do our exported LoRA files load in diffusers and give our outputs?

    DREAMBOOTH_LORA_CHECK_DIR=/tmp/lora-check cargo test --test lora export_for_diffusers_check
    python tools/parity/lora_check.py /tmp/lora-check

The Rust test attaches random adapters to tiny-sd1 (`attn`: the UNet's
to_q/k/v/out.0; `all`: every linear layer and convolution of the UNet; both
with the text encoder's q/k/v/out_proj), writes them as peft and kohya
files, and writes its own UNet and text-encoder outputs at
a fixed input. This loads each file with `pipe.load_lora_weights` and prints
the relative L2 error of diffusers' outputs against ours. (Kohya files with
LDM names, `lora_unet_input_blocks_…`, are not read by diffusers for SD 1.x/2.x;
A1111 and ComfyUI read them, and tests/lora.rs checks their round trip.)
"""
import os, sys
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
MODEL = os.path.join(ROOT, "tests", "fixtures", "tiny-sd1")


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def main(d):
    worst = 0.0
    for name in ("attn", "all"):
        io = load_file(os.path.join(d, f"{name}_io.safetensors"))
        for fmt in ("peft", "kohya"):
            path = os.path.join(d, f"{name}_{fmt}.safetensors")
            pipe = StableDiffusionPipeline.from_pretrained(MODEL)
            try:
                pipe.load_lora_weights(path)
            except Exception as e:  # report and go on
                print(f"{name:4} {fmt:10} FAILED to load: {type(e).__name__}: {str(e)[:300]}")
                continue
            with torch.no_grad():
                out = pipe.unet(io["sample"], io["timesteps"], encoder_hidden_states=io["context"]).sample
                te = pipe.text_encoder(io["ids"].long())[0]
            eu, et = rel(out, io["out"]), rel(te, io["te_out"])
            worst = max(worst, eu, et)
            print(f"{name:4} {fmt:10} unet rel err {eu:.2e}   text encoder rel err {et:.2e}")
    print(f"worst {worst:.2e}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.environ.get("DREAMBOOTH_LORA_CHECK_DIR", "/tmp/lora-check"))
