#!/usr/bin/env python3
"""Writes LPIPS weights as the safetensors file `dreambooth eval --lpips FILE` reads.

LPIPS (Zhang et al. 2018) is an ImageNet backbone (torchvision's AlexNet or
VGG16 `features`) plus linear heads calibrated on human judgments. The `lpips`
PyPI package ships the heads (lpips/weights/v0.1/{alex,vgg}.pth); the backbone
comes from torchvision's pretrained weights. This script builds
`lpips.LPIPS(net=NET, version='0.1')` with both and saves its whole
`state_dict()` (float32) under the package's own key names:

    scaling_layer.shift, scaling_layer.scale      (1, 3, 1, 1)
    net.sliceS.I.weight / .bias                   the backbone's convolutions
    linN.model.1.weight and lins.N.model.1.weight the heads (the same tensors)

Requirements: `pip install lpips==0.1.4 torchvision` (it pulls a torchvision
matching your torch; see tools/parity/requirements.txt for the pinned set).

Usage:

    # torchvision downloads (or finds in ~/.cache/torch/hub/checkpoints/) the
    # ImageNet weights, e.g. alexnet-owt-7be5be79.pth, vgg16-397923af.pth:
    python tools/convert_lpips.py --net alex --out lpips-alex.safetensors

    # offline: a torchvision state dict you already have (keys `features.N.weight`,
    # `features.N.bias`; `classifier.*` is ignored):
    python tools/convert_lpips.py --net vgg --backbone vgg16-397923af.pth --out lpips-vgg.safetensors

    dreambooth eval ... --lpips lpips-alex.safetensors

The paper's DIV uses LPIPS; `lpips.LPIPS()`'s default (and this script's) is
`net='alex'`. At the end the script prints LPIPS on a fixed pair of random
images so a Rust run on the same file can be compared.
"""

import argparse
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
# Keep tools/parity/lpips.py (the fixture script) from shadowing the package.
sys.path = [p for p in sys.path if os.path.abspath(p or ".") != os.path.join(HERE, "parity")]

import torch  # noqa: E402


def load_backbone(model, path):
    """Copies a torchvision AlexNet/VGG16 state dict's `features.*` into model.net."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    slices = {}
    for s in range(1, 6):
        for name, mod in getattr(model.net, f"slice{s}").named_children():
            slices[name] = mod
    filled = set()
    for key, value in sd.items():
        parts = key.split(".")
        if parts[0] != "features":
            continue
        if len(parts) != 3 or parts[1] not in slices:
            sys.exit(f"{path}: `{key}` is not a layer of the LPIPS {model.pnet_type} backbone")
        param = getattr(slices[parts[1]], parts[2], None)
        if param is None or tuple(param.shape) != tuple(value.shape):
            shape = None if param is None else tuple(param.shape)
            sys.exit(f"{path}: `{key}` has shape {tuple(value.shape)}, the backbone expects {shape}")
        with torch.no_grad():
            param.copy_(value.float())
        filled.add(f"{parts[1]}.{parts[2]}")
    wanted = {
        f"{name}.{p}"
        for name, mod in slices.items()
        for p, _ in mod.named_parameters(recurse=False)
    }
    missing = sorted(wanted - filled)
    if missing:
        sys.exit(f"{path}: missing `features.{missing[0]}` (and {len(missing) - 1} more): "
                 f"not a torchvision {model.pnet_type} state dict?")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--net", choices=["alex", "vgg"], default="alex")
    ap.add_argument("--backbone", help="torchvision state dict (.pth) of the backbone (offline)")
    ap.add_argument("--out", required=True, help="output .safetensors")
    args = ap.parse_args()

    import lpips
    from safetensors.torch import save_file

    with warnings.catch_warnings():  # torchvision's `pretrained=` deprecation
        warnings.simplefilter("ignore", UserWarning)
        model = lpips.LPIPS(
            net=args.net,
            version="0.1",
            pretrained=True,  # the calibrated heads, shipped inside the lpips package
            pnet_rand=args.backbone is not None,  # else torchvision loads ImageNet weights
            verbose=False,
        ).eval()
    if args.backbone:
        load_backbone(model, args.backbone)

    # linN and lins.N are one module: clone so safetensors stores both names.
    state = {k: v.detach().float().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(state, args.out, metadata={"format": "pt", "lpips_net": args.net, "lpips_version": "0.1"})
    print(f"wrote {args.out}: {len(state)} tensors, LPIPS v0.1 {args.net}")

    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    b = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        d = model(a, b).item()
    print(f"check: LPIPS(rand(0), rand(0)) on 64x64 images (torch.Generator seed 0) = {d:.6f}")


if __name__ == "__main__":
    main()
