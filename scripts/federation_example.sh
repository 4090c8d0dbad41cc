#!/usr/bin/env bash
# A federation driven by shell commands, exactly as each hospital and the coordinator would
# run them (here all on one machine).
# Usage: federation_example.sh SITES_DIR WORK_DIR [ROUNDS] [ITERATIONS_PER_ROUND]
#   SITES_DIR holds one nnU-Net raw folder per site (e.g. from `fedseg synth SITES_DIR`).
set -euo pipefail
SITES=$1
WORK=$2
ROUNDS=${3:-2}
ITERATIONS=${4:-20}
mkdir -p "$WORK/fingerprints"
site_names=$(for d in "$SITES"/*/; do basename "$d"; done)

# 1. At each site: a fingerprint (statistics only, no voxels) goes to the coordinator.
for s in $site_names; do
  fedseg fingerprint --site "$s" --data "$SITES/$s" -o "$WORK/fingerprints/$s.json"
done

# 2. Coordinator: one plan for everybody, and round-0 weights.
fedseg plan "$WORK"/fingerprints/*.json --strategy fedavg -o "$WORK/plans.json" \
  --set training.rounds="$ROUNDS" --set training.iterations_per_round="$ITERATIONS"
fedseg init --plans "$WORK/plans.json" -o "$WORK/round_000"

# 3. Rounds: every site trains from what the coordinator sent; the coordinator aggregates.
for r in $(seq 1 "$ROUNDS"); do
  prev=$(printf "round_%03d" $((r - 1)))
  cur=$(printf "round_%03d" "$r")
  for s in $site_names; do
    fedseg train --site "$s" --data "$SITES/$s" --plans "$WORK/plans.json" \
      --weights "$WORK/$prev/$s.safetensors" --state "$WORK/state/$s" \
      -o "$WORK/$cur/updates/$s.safetensors"
  done
  fedseg aggregate --plans "$WORK/plans.json" "$WORK/$cur"/updates/*.safetensors -o "$WORK/$cur"
done

# 4. Each site segments its test images with the model it now holds, and scores them.
last=$(printf "round_%03d" "$ROUNDS")
for s in $site_names; do
  fedseg predict --plans "$WORK/plans.json" --weights "$WORK/$last/$s.safetensors" --site "$s" \
    --state "$WORK/state/$s" -i "$SITES/$s/imagesTs" -o "$WORK/predictions/$s"
  fedseg evaluate --pred "$WORK/predictions/$s" --ref "$SITES/$s/labelsTs" -o "$WORK/metrics_$s.json"
done

# 5. Where the federation stands, and one HTML page about it (both read WORK_DIR alone).
fedseg status "$WORK"
fedseg report "$WORK" -o "$WORK/report"
