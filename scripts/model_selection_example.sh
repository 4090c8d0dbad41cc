#!/usr/bin/env bash
# Model selection as nnU-Net does it, federated: five folds of two configurations, each site
# scores its own validation cases, the coordinator picks from the numbers, the sites predict
# with the chosen models and post-processing (docs/model-selection.md).
# Usage: model_selection_example.sh SITES_DIR WORK_DIR [ROUNDS] [ITERATIONS_PER_ROUND]
set -euo pipefail
SITES=$1
WORK=$2
ROUNDS=${3:-2}
ITERATIONS=${4:-20}
FOLDS="0,1,2,3,4"
site_names=$(for d in "$SITES"/*/; do n=$(basename "$d"); [[ $n == _* ]] || echo "$n"; done)

# 1. One federation per fold and configuration (RUN/fold_<k>/, best/ beside the last round).
for config in 3d_fullres 2d; do
  fedseg simulate "$SITES" --config "$config" --rounds "$ROUNDS" --iterations "$ITERATIONS" \
    --workers 0 --folds "$FOLDS" -o "$WORK/runs/$config" --quiet
done

# 2. At each site: every fold's model scores that fold's validation cases (numbers only).
for s in $site_names; do
  fedseg validate --site "$s" --data "$SITES/$s" --run "$WORK/runs/3d_fullres" --run "$WORK/runs/2d" \
    --fold "$FOLDS" -o "$WORK/validation/$s.json" --quiet
done

# 3. Coordinator: the best configuration or ensemble, and its post-processing.
metrics_args=$(for s in $site_names; do printf -- "-m %s " "$WORK/validation/$s.json"; done)
fedseg find-best "$WORK/runs/3d_fullres" "$WORK/runs/2d" $metrics_args -o "$WORK/selection"

# 4. Each site predicts its test images as the inference plan says, and scores them.
for s in $site_names; do
  fedseg predict --inference-plan "$WORK/selection/inference_plan.json" --site "$s" \
    -i "$SITES/$s/imagesTs" -o "$WORK/predictions/$s" --quiet
  fedseg evaluate --pred "$WORK/predictions/$s" --ref "$SITES/$s/labelsTs" -o "$WORK/predictions/$s.metrics.json" --quiet
done
