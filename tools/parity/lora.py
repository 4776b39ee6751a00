"""LoRA parity fixtures with peft + diffusers on tiny-sd1.

    python tools/parity/lora.py   # after make_tiny_models.py

A peft LoRA (r = 4, lora_alpha = 8, so scale 2) on the UNet's attention
projections (to_q, to_k, to_v, to_out.0) and on the text encoder's
q/k/v/out_proj, every A and B random and nonzero, saved with diffusers'
`save_lora_weights` twice:

- `parity/sd1_lora_peft.safetensors`: peft keys (`unet.….to_q.lora_A.weight`,
  `text_encoder.….q_proj.lora_B.weight`) and the adapter config in the
  `lora_adapter_metadata` header (diffusers' training scripts write it);
- `parity/sd1_lora_diffusers.safetensors`: the same weights under the keys
  `convert_state_dict_to_diffusers` gives (`….to_q.lora.down.weight`,
  `….q_proj.lora_linear_layer.up.weight`), without metadata and with B
  pre-scaled by alpha / r (those keys carry no alpha).

`parity/sd1_lora_io.safetensors` holds a fixed input, the UNet's output
without the LoRA, with it (scale 1 and scale 0.5 via `cross_attention_kwargs`),
the text encoder's output with it, and gradients of sum(out * R) with respect
to a few adapters' A and B. The references are computed in float64 from the
float32 weights (PyTorch's own float32 gradients are ~1e-4 from them here).
"""
import copy, json, os
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")
R, ALPHA = 4, 8

GRADS = [
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
    "up_blocks.2.attentions.1.transformer_blocks.0.attn1.to_out.0",
]


def meta(cfg):
    d = cfg.to_dict()
    d["base_model_name_or_path"] = None  # a local path otherwise
    d["target_modules"] = sorted(d["target_modules"])
    return d


def main():
    torch.manual_seed(0)
    pipe = StableDiffusionPipeline.from_pretrained(os.path.join(FIX, "tiny-sd1"))
    unet, te = pipe.unet.float().eval(), pipe.text_encoder.float().eval()

    sample = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    ids = torch.tensor([[49406 % te.config.vocab_size, 5, 17, 300, 12, 1] + [1] * 71])
    ids = ids.clamp(max=te.config.vocab_size - 1)
    d64 = lambda m: copy.deepcopy(m).double()
    with torch.no_grad():
        out_base = d64(unet)(sample.double(), timesteps.double(), encoder_hidden_states=context.double()).sample
        te_base = d64(te)(ids)[0]

    ucfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    tcfg = LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"])
    unet.add_adapter(ucfg)
    te.add_adapter(tcfg)
    with torch.no_grad():
        for m in (unet, te):
            for n, p in m.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn_like(p) * 0.2)

    u64, t64 = d64(unet), d64(te)
    x64 = dict(sample=sample.double(), timestep=timesteps.double(), encoder_hidden_states=context.double())
    out = u64(**x64).sample
    r = torch.randn_like(out)
    (out * r).sum().backward()
    params = dict(u64.named_parameters())
    with torch.no_grad():
        out_half = u64(**x64, cross_attention_kwargs={"scale": 0.5}).sample
        te_out = t64(ids)[0]

    unet_sd = get_peft_model_state_dict(unet)
    te_sd = get_peft_model_state_dict(te)
    d = os.path.join(FIX, "parity")
    os.makedirs(d, exist_ok=True)
    tmp = os.path.join(d, "_lora_tmp")
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
        unet_lora_adapter_metadata=meta(ucfg), text_encoder_lora_adapter_metadata=meta(tcfg))
    os.replace(os.path.join(tmp, "pytorch_lora_weights.safetensors"), os.path.join(d, "sd1_lora_peft.safetensors"))

    # The older diffusers names carry no alpha: fold alpha / r into B.
    s = ALPHA / R
    fold = lambda sd: {k: (v * s if "lora_B" in k else v) for k, v in sd.items()}
    StableDiffusionPipeline.save_lora_weights(
        tmp, unet_lora_layers=convert_state_dict_to_diffusers(fold(unet_sd)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(fold(te_sd)))
    os.replace(os.path.join(tmp, "pytorch_lora_weights.safetensors"), os.path.join(d, "sd1_lora_diffusers.safetensors"))
    os.rmdir(tmp)

    tensors = {
        "sample": sample, "timesteps": timesteps, "context": context, "ids": ids.to(torch.int64),
        "out_base": out_base, "out": out.detach(), "out_half": out_half, "r": r,
        "te_base": te_base, "te_out": te_out,
    }
    for g in GRADS:
        for ab in ("A", "B"):
            tensors[f"grad.unet.{g}.lora_{ab}.weight"] = params[f"{g}.lora_{ab}.default.weight"].grad
    tensors = {k: (v.float() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(tensors, os.path.join(d, "sd1_lora_io.safetensors"),
              metadata={"rank": str(R), "alpha": str(ALPHA)})
    print("unet out change by the LoRA:", float((out.detach() - out_base).norm() / out_base.norm()),
          "te:", float((te_out - te_base).norm() / te_base.norm()))


if __name__ == "__main__":
    main()
