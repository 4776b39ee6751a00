#!/usr/bin/env bash
# The prepared device check (docs/cuda.md): on the GPU machine, in one `run`
# call with carry ["cuda-dist", ".whl"] after tools/cuda/build.sh (and
# WITH_CUDNN=1 tools/cuda/build.sh for the cuDNN stage) here:
#
#   tools/cuda/device-bench.sh                 # every stage, in this order
#   tools/cuda/device-bench.sh selftest step   # some stages
#
# Stages (default order: the ratio table's cases and the peer first):
# info selftest step lora sample sample-noflash peer fusedbwd fusedckpt whole gradckpt
# release cudnn nofused profile (sample-noflash: class images with the recomputing
# attention node instead of the flash kernel, DREAMBOOTH_NO_FLASH=1). Not in the
# default list (name them): noflash (the full fine-tune step so), sdxl-lora, sdxl-whole
# (SDXL base's LoRA step at 1024 px, batch 1, bf16; the whole step with both
# text encoders and the VAE) and sdxl-sample (SDXL class images, random
# weights). Each runs
# under its own timeout (STAGE_TIMEOUT, default 150 s; PEER_TIMEOUT 300 s for
# the peer and profile stages, PROFILE_TIMEOUT 120 s for each profiled run),
# cut to what is left of BUDGET_S (default 540 s: a `run` call's 600 s
# limit less a margin, so the log and summary always come back; a stage
# with under 20 s left is skipped and says so), and a failing stage
# does not stop the rest; everything is logged to $OUT/device-bench.log (or
# ./device-bench.log) with one summary line per stage at the end. The peer
# stage installs diffusers from the carried .whl/ (../shared/bench/README.md)
# and runs peer_diffusers_step.py from PEER_DIR (default: ../shared/bench,
# else shared/bench).
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
LOG="${OUT:-.}/device-bench.log"
RUN="${RUN:-tools/cuda/device-run.sh}"
export ROOT RUN
T="${STAGE_TIMEOUT:-150}"
SD15=(--device cuda --arch sd15 --res 512 --batch 2 --warmup 2 --steps 5 --dtype bf16)
SDXL=(--device cuda --arch sdxl --res 1024 --batch 1 --warmup 1 --steps 3 --dtype bf16)
STAGES=("$@")
[[ ${#STAGES[@]} -gt 0 ]] || STAGES=(info selftest step lora sample sample-noflash peer fusedbwd fusedckpt whole gradckpt release cudnn nofused profile)
SUMMARY=()
BUDGET="${BUDGET_S:-540}"
START=$(date +%s)

stage() {
  local name="$1"
  shift
  local t0 rc left limit
  t0=$(date +%s)
  left=$((BUDGET - (t0 - START)))
  if ((left < 20)); then
    echo "=== $name: skipped, ${left} s of BUDGET_S=$BUDGET left" | tee -a "$LOG"
    SUMMARY+=("$name: skipped (budget)")
    return
  fi
  limit=$((T < left ? T : left))
  echo "=== $name: $*" | tee -a "$LOG"
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  SUMMARY+=("$name: rc=$rc in $(($(date +%s) - t0)) s")
}

# Sets PEER to the folder of peer_diffusers_step.py and installs the carried
# diffusers wheels on PYTHONPATH.
peer_env() {
  PEER="${PEER_DIR:-}"
  [[ -n "$PEER" ]] || for d in ../shared/bench shared/bench; do [[ -f "$d/peer_diffusers_step.py" ]] && PEER="$d" && break; done
  [[ -n "$PEER" ]] || { echo "no peer_diffusers_step.py (set PEER_DIR)"; return 1; }
  if [[ -d .whl ]]; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
    export PYTHONPATH=/tmp/site
  fi
}
export -f peer_env

peer() {
  peer_env || return 1
  (cd "$PEER" && python3 peer_diffusers_step.py all)
}
export -f peer

# Kernel profiles (tools/cuda/kprof, injected by the driver) of our full
# fine-tune and LoRA steps and of the peer's, the timed steps only, per step:
# $OUT/kprof-*.txt, also appended to the log; each run's own output in
# $OUT/kprof-*.log (its end shown in the log when the run fails).
profile() {
  local kp="$ROOT/cuda-dist/libkprof.so" dir="${OUT:-.}" rc=0
  [[ -f "$kp" ]] || { echo "no $kp: tools/cuda/build.sh builds it"; return 1; }
  run_kprof() {
    local name="$1" per="$2"
    shift 2
    CUDA_INJECTION64_PATH="$kp" KPROF_OUT="$dir/kprof-$name.txt" KPROF_PER="$per" KPROF_LABEL="$name" \
      timeout "${PROFILE_TIMEOUT:-120}" "$@" >"$dir/kprof-$name.log" 2>&1 ||
      { echo "$name: rc=$?; the end of $dir/kprof-$name.log:"; tail -n 15 "$dir/kprof-$name.log"; rc=1; }
    cat "$dir/kprof-$name.txt" 2>/dev/null
  }
  local sd15=(--device cuda --arch sd15 --res 512 --batch 2 --warmup 2 --steps 3 --dtype bf16)
  run_kprof ours-full 3 "$RUN" bench step "${sd15[@]}"
  run_kprof ours-lora 3 "$RUN" bench step "${sd15[@]}" --lora --rank 4
  peer_env || return 1
  run_kprof peer-full 10 python3 tools/cuda/peer_profile.py full "$PEER"
  run_kprof peer-lora 10 python3 tools/cuda/peer_profile.py lora "$PEER"
  return $rc
}
export -f profile

for s in "${STAGES[@]}"; do
  case "$s" in
    info) stage info bash -c "nvidia-smi; $RUN --ldd | grep -E 'cuda|cublas|cudnn|curand'" ;;
    selftest) stage selftest "$RUN" selftest --device cuda ;;
    step) stage step "$RUN" bench step "${SD15[@]}" ;;
    lora) stage lora "$RUN" bench step "${SD15[@]}" --lora --rank 4 ;;
    whole) stage whole "$RUN" bench step "${SD15[@]}" --with-encoders ;;
    sample) stage sample "$RUN" bench sample --device cuda --arch sd15 --random-weights --images 8 --batch 4 --dtype bf16 ;;
    sample-noflash) stage sample-noflash env DREAMBOOTH_NO_FLASH=1 "$RUN" bench sample --device cuda --arch sd15 --random-weights --images 8 --batch 4 --dtype bf16 ;;
    noflash) stage noflash env DREAMBOOTH_NO_FLASH=1 "$RUN" bench step "${SD15[@]}" ;;
    gradckpt) stage gradckpt "$RUN" bench step "${SD15[@]}" --gradient-checkpointing ;;
    release) stage release "$RUN" bench step "${SD15[@]}" --release-block-graphs ;;
    fusedbwd) stage fusedbwd "$RUN" bench step "${SD15[@]}" --fused-backward-pass ;;
    fusedckpt) stage fusedckpt "$RUN" bench step "${SD15[@]}" --fused-backward-pass --gradient-checkpointing ;;
    cudnn) stage cudnn env DREAMBOOTH_CUDNN=1 "$RUN" bench step "${SD15[@]}" ;;
    nofused) stage nofused env DREAMBOOTH_NO_FUSED=1 "$RUN" bench step "${SD15[@]}" ;;
    sdxl-lora) stage sdxl-lora "$RUN" bench step "${SDXL[@]}" --lora --rank 4 ;;
    sdxl-whole) stage sdxl-whole "$RUN" bench step "${SDXL[@]}" --lora --rank 4 --with-encoders ;;
    sdxl-sample) stage sdxl-sample "$RUN" bench sample --device cuda --arch sdxl --random-weights --images 2 --batch 2 --warmup 1 --dtype bf16 ;;
    peer) T="${PEER_TIMEOUT:-300}" stage peer bash -c peer ;;
    profile) T="${PEER_TIMEOUT:-300}" stage profile bash -c profile ;;
    *) SUMMARY+=("$s: unknown stage") ;;
  esac
done
echo "=== summary" | tee -a "$LOG"
printf '%s\n' "${SUMMARY[@]}" | tee -a "$LOG"
