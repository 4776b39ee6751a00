#!/usr/bin/env bash
# Downloads the wheels the peer benchmark needs on the device machine (it has
# PyTorch but not diffusers; ../shared/bench/README.md) into .whl/, kept out
# of git through .git/info/exclude, for `run(..., carry: [".whl", ...])`.
# tools/cuda/device-bench.sh installs them there (its `peer` stage).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
EXCLUDE="$(git rev-parse --git-path info/exclude)"
grep -qxF '/.whl/' "$EXCLUDE" 2>/dev/null || echo '/.whl/' >>"$EXCLUDE"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 -d .whl diffusers importlib_metadata
ls -l .whl >&2
