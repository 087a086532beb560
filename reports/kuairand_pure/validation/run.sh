#!/usr/bin/env bash
# Choosing the default on the validation slice (issue: "select on a validation slice, never on the test split"):
# `--validation` trains on the first 72% of KuaiRand-Pure in time order and tests on the next 8% (the last 10% of
# the training part); the test split (last 20%) is never read. Shared-bottom and MMoE, 3 seeds, (click, long_view).
# Run from the repository root: bash reports/kuairand_pure/validation/run.sh  (about 25 minutes on one core)
set -euo pipefail
OUT=${OUT:-/tmp/kuairand_pure_validation}
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
run() {  # run NAME [evaluate flags...]
  local name=$1; shift
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks click,long_view --backbone shared_bottom,mmoe --seeds 3 --mode split --validation \
    --batch-size 256 --hash-buckets 262144 --threads 1 --device cpu --out "$OUT/$name" "$@"
}
run base --configs mtl,aux@paper,crossdistil@paper,crossdistil@trust,direct_kd
run no_gate --configs crossdistil@trust --variant no_gate --model-option kd_gate=none
run no_teacher_bce --configs crossdistil@trust --variant no_teacher_bce --model-option teacher_task_weight=0
run grad0.1 --configs crossdistil@trust --variant grad0.1 --model-option teacher_backbone_grad=0.1
run same_user --configs crossdistil@trust --variant same_user --model-option quadruplet_same_user=true
run all_pairs --configs crossdistil@trust --variant all_pairs --model-option quadruplet_pairs=all
run partner_w0 --configs crossdistil@trust --variant partner_w0 --model-option quadruplet_partner_weight=0
run kd0.3 --configs crossdistil@trust --variant kd0.3 --model-option kd_weight=0.3
run cal_lr0.05 --configs crossdistil@trust --variant cal_lr0.05 --model-option calibrator_lr=0.05
run margin0.002 --configs crossdistil@trust --variant margin0.002 --model-option kd_gate_margin=0.002
run warmup50k_no_gate --configs crossdistil@trust --variant warmup50k_no_gate \
  --model-option kd_gate=none --model-option kd_warmup_samples=50000
run label_aware --configs crossdistil@trust --variant label_aware --model-option teacher_partner_input=true \
  --model-option kd_gate=none --model-option correction=none
.venv/bin/crossdistil evaluate --from-results "$OUT"/*/results.json --out reports/kuairand_pure/validation \
  --title "KuaiRand-Pure validation slice: choosing the CrossDistil default"
