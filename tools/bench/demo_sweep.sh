#!/bin/bash
# The demo's learning rate × steps on every toy subject: one `dreambooth demo`
# per (subject, lr, steps), UNet and text encoder at the same lr, 8 images per
# prompt; prints `subject lr steps fidelity context colour PRES DIV` (after
# training) per run, appending to $OUT/results.txt (runs already there are
# skipped, so an interrupted sweep continues).
#
#   cargo build --release && tools/bench/demo_sweep.sh [OUT]    # 36 runs, 30-40 min on 2 cores
set -euo pipefail
BIN=${BIN:-target/release/dreambooth}
OUT=${1:-demo-sweep}
mkdir -p "$OUT"
touch "$OUT/results.txt"
for steps in 300 600 1200; do
  for lr in 5e-5 1e-4 2e-4; do
    for s in spot_ball stripe_box dot_star buoy_ring; do
      grep -q "^$s $lr $steps " "$OUT/results.txt" && continue
      o="$OUT/run-$s-$lr-$steps"
      "$BIN" demo --out "$o" --subject "$s" --steps "$steps" --learning-rate "$lr" \
        --text-encoder-lr "$lr" --images-per-prompt 8 > "$o.log" 2>&1
      after() { grep "$1" "$o.log" | awk '{print $NF}'; }
      line="$s $lr $steps $(after 'subject fidelity') $(after 'context follows') $(after 'colour follows') $(after 'PRES:') $(after 'DIV:')"
      echo "$line" | tee -a "$OUT/results.txt"
      rm -rf "$o"
    done
  done
done
