#!/usr/bin/env bash
# Builds the kernel profiler (kprof.cpp) against CUPTI from the build venv
# (tools/cuda/setup-build-env.sh installs nvidia-cuda-cupti) into
# cuda-dist/libkprof.so, with libcupti.so.13 beside it (found through
# $ORIGIN), for `run`'s carry. tools/cuda/build.sh runs it; docs/cuda.md.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
VENV="${CUDA_VENV:-$ROOT/.cuda-venv}"
DIST="$ROOT/cuda-dist"
"$ROOT/tools/cuda/setup-build-env.sh" >/dev/null
# shellcheck source=/dev/null
source "$VENV/env.sh"
[[ -f "$CUDA_HOME/include/cupti.h" ]] || { echo "no cupti.h in $CUDA_HOME/include" >&2; exit 1; }
mkdir -p "$DIST"
cp "$CUDA_HOME/lib/libcupti.so.13" "$DIST/"
g++ -std=c++17 -O2 -shared -fPIC -Wall -Wextra -I "$CUDA_HOME/include" \
  "$ROOT/tools/cuda/kprof/kprof.cpp" -L "$DIST" -l:libcupti.so.13 -Wl,-rpath,'$ORIGIN' \
  -o "$DIST/libkprof.so"
ls -l "$DIST/libkprof.so" "$DIST/libcupti.so.13" >&2
