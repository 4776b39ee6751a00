"""Runs one case of the peer benchmark (peer_diffusers_step.py) with its timed
steps inside the CUDA profiler capture range, for tools/cuda/kprof
(docs/cuda.md, the device-bench `profile` stage):

    CUDA_INJECTION64_PATH=cuda-dist/libkprof.so KPROF_PER=10 \
      python3 tools/cuda/peer_profile.py full|lora|gradckpt [PEER_DIR]

The warm-up runs outside the range; the 10 measured steps inside it.
"""
import os
import sys

case = sys.argv[1] if len(sys.argv) > 1 else "full"
peer_dir = sys.argv[2] if len(sys.argv) > 2 else os.environ.get("PEER_DIR", "../shared/bench")
sys.path.insert(0, os.path.abspath(peer_dir))

import torch  # noqa: E402
import peer_diffusers_step as peer  # noqa: E402

plain_timed = peer.timed


def timed(fn, warm=3, reps=10):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    try:
        return plain_timed(fn, warm=0, reps=reps)
    finally:
        torch.cuda.synchronize()
        torch.cuda.profiler.stop()


peer.timed = timed
if case == "full":
    peer.unet_step_case("full_ft_bf16_autocast", autocast=True)
elif case == "lora":
    peer.unet_step_case("lora_r4_bf16", autocast=True, lora=True)
elif case == "gradckpt":
    peer.unet_step_case("full_ft_bf16_autocast_gradckpt", autocast=True, checkpointing=True)
else:
    sys.exit(f"peer_profile.py: unknown case {case!r} (full, lora, gradckpt)")
