#!/usr/bin/env bash
# Builds `dreambooth` with the `cuda` feature on a machine without a GPU and
# packs it for the device machine (docs/cuda.md):
#
#   target-cuda/release/dreambooth   the build (its own target dir, so the CPU
#                                    build's cache in target/ is never touched)
#   cuda-dist/dreambooth.gz          stripped + gzipped, for `run`'s carry
#                                    (64 MiB limit; about 13 MB)
#   cuda-dist/libkprof.so            the kernel profiler (tools/cuda/kprof), with
#                                    libcupti.so.13 (4 MB)
#
# Runs tools/cuda/setup-build-env.sh first (idempotent). Extra arguments go to
# cargo. WITH_CUDNN=1 builds the `cudnn` feature instead (cuDNN for candle's
# convolution forward) into cuda-dist/dreambooth-cudnn.gz. Runs under `nice -n ${NICE:-19}`: the build machine is shared.
# The first build takes about a quarter of an hour on 2 cores (candle's CUDA
# kernels are compiled by nvcc).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="${CUDA_VENV:-$ROOT/.cuda-venv}"
TARGET_DIR="${CUDA_TARGET_DIR:-$ROOT/target-cuda}"
DIST="$ROOT/cuda-dist"

"$ROOT/tools/cuda/setup-build-env.sh" >/dev/null
# shellcheck source=/dev/null
source "$VENV/env.sh"

cd "$ROOT"
start=$(date +%s)
FEATURE=cuda
NAME=dreambooth
if [[ "${WITH_CUDNN:-0}" == 1 ]]; then
  FEATURE=cudnn
  NAME=dreambooth-cudnn
fi
CARGO_TARGET_DIR="$TARGET_DIR" nice -n "${NICE:-19}" \
  cargo build --release --features "$FEATURE" --bin dreambooth "$@"
echo "[build] cargo took $(( $(date +%s) - start )) s" >&2

BIN="$TARGET_DIR/release/dreambooth"
mkdir -p "$DIST"
strip -o "$DIST/$NAME" "$BIN"
gzip -9 -f "$DIST/$NAME"
# What it links against (the driver library must resolve to the real one on the GPU machine).
readelf -d "$BIN" | awk '/NEEDED/ {print $5}' | tr -d '[]' >"$DIST/$NAME.needed.txt"
git -C "$ROOT" rev-parse --short HEAD >"$DIST/$NAME.commit.txt" 2>/dev/null || true
ls -l "$BIN" "$DIST/$NAME.gz" >&2
echo "[build] needs: $(tr '\n' ' ' <"$DIST/$NAME.needed.txt")" >&2
# The kernel profiler (tools/cuda/kprof) for the device-bench `profile` stage.
"$ROOT/tools/cuda/kprof/build.sh"
