#!/usr/bin/env bash
# `make demo`: synthetic 3-site data, then a complete small federation on this machine
# (fingerprint -> plan -> init -> rounds of train/aggregate -> predict -> evaluate),
# ending with the per-site test Dice table. Usage: demo.sh FEDSEG_BIN RUN_DIR
set -euo pipefail
FEDSEG=${1:-fedseg}
RUN=${2:-demo_run}
rm -rf "$RUN"
"$FEDSEG" synth "$RUN/sites" --preset tiny --seed 0
"$FEDSEG" simulate "$RUN/sites" --strategy fedavg --rounds 3 --iterations 40 -o "$RUN/run"
echo "Run folder: $RUN/run (plans.json, round_*/, report/val_dice.png, report/metrics.json)"
