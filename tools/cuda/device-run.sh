#!/usr/bin/env bash
# On the GPU (device) machine: unpacks the binary tools/cuda/build.sh packed
# (cuda-dist/dreambooth.gz, carried there with `carry: ["cuda-dist"]`) and runs
# it with the machine's CUDA 13 libraries on LD_LIBRARY_PATH (docs/cuda.md).
#
#   tools/cuda/device-run.sh bench step --device cuda --arch sd15 --res 512 --batch 2
#
# CUDA_LIBS overrides the library folders; DREAMBOOTH_CUDA_BIN where the
# binary is unpacked (default /tmp/dreambooth-cuda, re-unpacked when the .gz is newer).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# DREAMBOOTH_CUDNN=1 runs the `cudnn` build (cuda-dist/dreambooth-cudnn.gz).
NAME=dreambooth
[[ "${DREAMBOOTH_CUDNN:-0}" == 1 ]] && NAME=dreambooth-cudnn
GZ="$ROOT/cuda-dist/$NAME.gz"
BIN="${DREAMBOOTH_CUDA_BIN:-/tmp/$NAME-cuda}"
TORCH_NVIDIA=/opt/torch/.venv/lib/python3.12/site-packages/nvidia
CUDA_LIBS="${CUDA_LIBS:-$TORCH_NVIDIA/cu13/lib:$TORCH_NVIDIA/cudnn/lib:/usr/local/cuda/lib64}"

[[ -f "$GZ" ]] || { echo "no $GZ: build with tools/cuda/build.sh and carry cuda-dist" >&2; exit 1; }
if [[ ! -x "$BIN" || "$GZ" -nt "$BIN" ]]; then
  gunzip -c "$GZ" >"$BIN.tmp"
  chmod +x "$BIN.tmp"
  mv "$BIN.tmp" "$BIN"
fi
export LD_LIBRARY_PATH="$CUDA_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [[ "${1:-}" == "--ldd" ]]; then
  # Which libraries resolve where (libcuda.so.1 must be the driver's, not a stub).
  exec ldd "$BIN"
fi
exec "$BIN" "$@"
