"""UNet parity fixtures: ε̂ and gradients of a fixed scalar loss from diffusers.

    python tools/parity/unet.py   # after make_tiny_models.py; writes tests/fixtures/parity/{sd1,sd2}_unet.safetensors

loss = sum(out * R) for a fixed random R; gradients w.r.t. the input sample, the
text context and weights spread over the network. `out_f16w` is the output with
every weight rounded to float16 (the f16-checkpoint test compares to it).
"""
import copy, os
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import save_file

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
FIX = os.path.join(ROOT, "tests", "fixtures")

WEIGHTS = [
    "conv_in.weight",
    "time_embedding.linear_1.weight",
    "down_blocks.0.resnets.0.norm1.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight",
    "down_blocks.0.attentions.0.transformer_blocks.0.norm2.weight",
    "down_blocks.1.attentions.0.proj_in.weight",
    "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
    "up_blocks.1.resnets.0.conv1.weight",
    "up_blocks.2.attentions.0.transformer_blocks.0.attn2.to_v.weight",
    "conv_out.weight",
]


def run(name):
    torch.manual_seed(42)
    unet = UNet2DConditionModel.from_pretrained(os.path.join(FIX, f"tiny-{name}", "unet")).float()
    unet.eval()
    sample = torch.randn(2, 4, 8, 8, requires_grad=True)
    timesteps = torch.tensor([10.0, 700.0])
    context = torch.randn(2, 77, unet.config.cross_attention_dim, requires_grad=True)
    out = unet(sample, timesteps, encoder_hidden_states=context).sample
    r = torch.randn_like(out)
    (out * r).sum().backward()
    params = dict(unet.named_parameters())
    tensors = {
        "sample": sample.detach(), "timesteps": timesteps, "context": context.detach(),
        "out": out.detach(), "r": r,
        "grad.sample": sample.grad, "grad.context": context.grad,
    }
    for w in WEIGHTS:
        tensors["grad." + w] = params[w].grad
    # Weights rounded to f16, computed in f32.
    u16 = copy.deepcopy(unet)
    with torch.no_grad():
        for p in u16.parameters():
            p.copy_(p.half().float())
        tensors["out_f16w"] = u16(sample.detach(), timesteps, encoder_hidden_states=context.detach()).sample
    # A latent not divisible by 2^levels (10×6): diffusers upsamples to skip sizes.
    with torch.no_grad():
        odd = torch.randn(1, 4, 10, 6)
        tensors["odd_sample"] = odd
        tensors["odd_out"] = unet(odd, timesteps[:1], encoder_hidden_states=context.detach()[:1]).sample
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    os.makedirs(os.path.join(FIX, "parity"), exist_ok=True)
    save_file(tensors, os.path.join(FIX, "parity", f"{name}_unet.safetensors"),
              metadata={"weights": ",".join(WEIGHTS)})


if __name__ == "__main__":
    run("sd1")
    run("sd2")
