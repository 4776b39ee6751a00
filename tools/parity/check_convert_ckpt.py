"""Checks `dreambooth convert` of a single-file checkpoint against diffusers'
own converter: loads FOLDER (what `dreambooth convert --model CKPT --out
FOLDER` wrote) with `StableDiffusionPipeline.from_pretrained` and CKPT with
`from_single_file` (configs from FOLDER, offline), and prints each
component's key count, keys present on one side only, and the largest
absolute weight difference.

    .venv/bin/python tools/bench/random_sd15_checkpoint.py /tmp/sd15-random.ckpt
    target/release/dreambooth convert --model /tmp/sd15-random.ckpt --out /tmp/sd15-fp16 --dtype fp16
    .venv/bin/python tools/parity/check_convert_ckpt.py /tmp/sd15-random.ckpt /tmp/sd15-fp16
"""

import sys

import diffusers


def main(ckpt, folder):
    ours = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    theirs = diffusers.StableDiffusionPipeline.from_single_file(
        ckpt, config=folder, safety_checker=None, local_files_only=True
    )
    bad = False
    for name in ["unet", "vae", "text_encoder"]:
        a = getattr(ours, name).state_dict()
        b = getattr(theirs, name).state_dict()
        keys = set(a) | set(b)
        one_side = sorted(k for k in keys if k not in a or k not in b)
        worst = max(
            ((a[k].float() - b[k].float()).abs().max().item() for k in keys if k in a and k in b),
            default=0.0,
        )
        print(f"{name}: {len(keys)} keys, on one side only: {one_side[:3]}, max abs diff {worst}")
        bad |= bool(one_side) or worst > 0
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main(*sys.argv[1:3])
