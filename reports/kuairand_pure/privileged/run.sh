#!/usr/bin/env bash
# §2d and §3c of reports/kuairand_pure/README.md: a privileged teacher (models/privileged.py) on KuaiRand-Pure.
# Run from the repository root. Validation slice first (probe.py: the teacher and the student side by side, the same
# arithmetic as models.learner; the test split is never read), then the chosen setting on the test split through
# `crossdistil evaluate`. About 25 + 35 minutes on this 2-core machine, two processes at a time.
set -euo pipefail
OUT=${OUT:-/tmp/privileged}
mkdir -p "$OUT"
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
SEVEN=is_profile_enter,is_follow,is_comment,is_forward,is_hate,profile_stay_time,comment_stay_time
EIGHT=play_time_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_follow,is_comment,is_forward,is_hate
probe() { PYTHONPATH=. .venv/bin/python reports/kuairand_pure/privileged/probe.py "$@"; }

# 1. validation slice: which columns, which weight (lam: one number for both tasks, or like=W with finish at 0)
probe --tasks finish,like --seeds 0,1,2,3,4 --lams 0,0.3,0.5,0.8 --privileged $SEVEN > "$OUT/fl.jsonl"
probe --tasks click,long_view --seeds 0,1,2,3,4 --lams 0,0.3,0.5,0.8 --privileged $SEVEN > "$OUT/cl.jsonl"
for set in $SEVEN $SEVEN,play_time_ms; do  # (the column order is the teacher's input order: part of its seed)
  probe --tasks finish,like --backbone shared_bottom,mmoe,ple,cross_stitch --seeds 0,1,2,3,4 \
    --lams 0,like=0.3,like=0.5,like=0.8 --privileged "$set" > "$OUT/val_fl_${set//,/_}.jsonl"
done
probe --tasks finish,like --seeds 0,1,2,3,4 --lams 0,like=0.5 \
  --privileged is_profile_enter,is_follow,is_comment,is_forward,is_hate,long_view,is_click > "$OUT/val_fl_bin.jsonl"
probe --tasks finish,like --backbone shared_bottom,mmoe --seeds 0,1,2,3,4 --lams 0,0.8 --privileged $EIGHT \
  > "$OUT/val_fl8u.jsonl"
probe --tasks click,long_view --backbone shared_bottom,mmoe --seeds 0,1,2,3,4 --lams 0,0.5,0.8 --privileged $EIGHT \
  > "$OUT/val_cl8.jsonl"
python reports/kuairand_pure/privileged/summary.py "$OUT"/*.jsonl

# 1b. the same slice through `crossdistil evaluate --validation`, blended from the start or gated
vevaluate() {
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks finish,like --backbone shared_bottom,mmoe --configs mtl --seeds 5 --mode both --validation \
    --batch-size 256 --hash-buckets 262144 --threads 1 --device cpu --model-option count_features=user_id,item_id "$@"
}
vevaluate --out "$OUT/v_mtl"
vevaluate --model-option privileged=$EIGHT --variant privileged --out "$OUT/v_priv"
vevaluate --model-option privileged=$EIGHT --model-option privileged_gate=true --variant privileged_gated \
  --out "$OUT/v_gated"
.venv/bin/crossdistil evaluate --from-results "$OUT"/v_{mtl,priv,gated}/results.json \
  --out reports/kuairand_pure/privileged/validation_evaluate \
  --title "KuaiRand-Pure validation slice (finish, like): the privileged teacher, blended from the start or gated"
python reports/kuairand_pure/summarize.py reports/kuairand_pure/privileged/validation_evaluate/results.json \
  > reports/kuairand_pure/privileged/validation_evaluate/tables.md

# 2. the test split: plain mtl and mtl with the chosen privileged teacher (the eight columns, privileged_weight 0.8)
evaluate() {
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks finish,like --configs mtl --seeds 5 --mode both --batch-size 256 --hash-buckets 262144 --threads 1 \
    --device cpu --model-option count_features=user_id,item_id "$@"
}
evaluate --backbone shared_bottom,mmoe,ple,cross_stitch --out "$OUT/mtl"
evaluate --backbone shared_bottom --model-option privileged=$EIGHT --model-option privileged_weight=0.8 \
  --out "$OUT/priv_sb"
evaluate --backbone mmoe,ple,cross_stitch --model-option privileged=$EIGHT --model-option privileged_weight=0.8 \
  --out "$OUT/priv_rest"
.venv/bin/crossdistil evaluate --from-results "$OUT"/{mtl,priv_sb,priv_rest}/results.json \
  --out reports/kuairand_pure/privileged --title "KuaiRand-Pure (finish, like): mtl with a privileged teacher"
python reports/kuairand_pure/summarize.py reports/kuairand_pure/privileged/results.json \
  > reports/kuairand_pure/privileged/tables.md
