#!/usr/bin/env bash
# The choice of the peers' settings on the validation slice of KuaiRand-Pure (the first 80 % of its events;
# prequential, tail = their last 10 %): every declared option set is one `evaluate --validation` run, merged into
# this folder's results.json / report.md. The test split (last 20 %) is never read here.
# Run from the repository root: bash reports/peers_kuairand_pure/validation/run.sh  (about 15 minutes, 1 CPU)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/peers_validation}
HERE=reports/peers_kuairand_pure/validation
COMMON=(--dataset csv --source ../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
        --mapping mappings/kuairand_pure.toml --hash-buckets 262144 --threads 1 --device cpu --seeds 1
        --mode prequential --validation)
run() {  # run VARIANT CONFIGS [--model-option KEY=VALUE ...]
  local variant=$1 configs=$2; shift 2
  "$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs "$configs" --variant "$variant" "$@" --out "$OUT/$variant"
}
# river_lr: one SGD step for every weight (the old rule; 0.1 was the old default) against per-coordinate AdaGrad.
for lr in 0.1 0.01 0.003; do
  run "sgd-lr$lr" river_lr --model-option river.optimizer=sgd --model-option river.lr=$lr --model-option river.intercept_lr=0.01
done
for lr in 0.1 0.2 0.3; do
  run "adagrad-lr$lr" river_lr --model-option river.optimizer=adagrad --model-option river.lr=$lr \
    --model-option river.intercept_lr=0.001
done
run "adagrad-lr0.2-ilr0.01" river_lr --model-option river.optimizer=adagrad --model-option river.lr=0.2 \
  --model-option river.intercept_lr=0.01
# river_fm: AdaGrad weights at the LR's step, per-feature AdaGrad latents at two steps.
for llr in 0.01 0.05; do
  run "adagrad-llr$llr" river_fm --model-option river.optimizer=adagrad --model-option river.lr=0.2 \
    --model-option river.intercept_lr=0.001 --model-option river.latent_lr=$llr
done
# VW: the declared set of 8 (interactions x learning rate); `vw` with no option is VW's defaults.
run "default" vw
run "lr1" vw --model-option vw.learning_rate=1.0
run "q-ui-lr0.5" vw --model-option vw.interactions=ui --model-option vw.learning_rate=0.5
run "q-ui-lr1" vw --model-option vw.interactions=ui --model-option vw.learning_rate=1.0
run "q-ui+uc-lr1" vw --model-option vw.interactions=ui,uc --model-option vw.learning_rate=1.0
run "q-ui+uc-lr2" vw --model-option vw.interactions=ui,uc --model-option vw.learning_rate=2.0
run "q-ui+us-lr1" vw --model-option vw.interactions=ui,us --model-option vw.learning_rate=1.0
run "q-ui+uc+ic-lr1" vw --model-option vw.interactions=ui,uc,ic --model-option vw.learning_rate=1.0
# The product's deep model (mtl): its defaults (with the wide part, wide_lr 0.05), the deep model alone, and the
# declared set of the wide part: its AdaGrad step (default crosses), then its crosses (step 0.05).
run "mtl-default" mtl
run "deep-only" mtl --model-option wide=none
for lr in 0.02 0.03 0.1 0.2 0.3; do
  run "wide-lr$lr" mtl --model-option wide_lr=$lr
done
run "wide-no-crosses" mtl --model-option wide_crosses=
run "wide-ui" mtl --model-option wide_crosses=user_id*item_id
run "wide-ui+uc+ic" mtl --model-option wide_crosses=user_id*item_id,user_id*hourmin,user_id*tab,item_id*hourmin,item_id*tab
run "wide-ui+uc+u-types" mtl \
  --model-option wide_crosses=user_id*item_id,user_id*hourmin,user_id*tab,user_id*video_type,user_id*upload_type,user_id*music_type
"$PY" -m consumers.cli evaluate --from-results "$OUT"/*/results.json --title "KuaiRand-Pure peers: validation slice" \
  --out "$HERE"
