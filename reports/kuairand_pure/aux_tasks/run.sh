#!/usr/bin/env bash
# §2e and §3d of reports/kuairand_pure/README.md: (finish, like) learnt together with the rarer outcomes as auxiliary
# tasks (`crossdistil evaluate --aux-tasks`: learnt, never scored), alone and with the privileged teacher
# (models/privileged.py). Run from the repository root. The settings were chosen on the validation slice (step 1; the
# probe lines are in ../privileged/probe.py's --aux flag), then the test split is read once (step 2). About 30 + 45
# minutes on this 2-core machine, two processes at a time.
set -euo pipefail
OUT=${OUT:-/tmp/aux_tasks}
HERE=reports/kuairand_pure/aux_tasks
mkdir -p "$OUT"
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
AUX=follow,comment,forward,profile_enter,click,long_view
EIGHT=play_time_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_follow,is_comment,is_forward,is_hate
TEACHER=(--model-option privileged=$EIGHT --model-option privileged_weight=finish:0.3,like:0.8)
grid() {
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks finish,like --configs mtl --seeds 5 --mode both --batch-size 256 --hash-buckets 262144 --threads 1 \
    --device cpu --backbone shared_bottom,mmoe,ple,cross_stitch "$@"
}
merge() {  # merge OUT_DIR TITLE RESULTS...
  local out=$1 title=$2; shift 2
  .venv/bin/crossdistil evaluate --from-results "$@" --out "$out" --title "$title"
  python reports/kuairand_pure/summarize.py "$out/results.json" > "$out/tables.md"
}

# 1. the validation slice (the first 72 % of events; the test split is never read), two backbones (the probe ran
#    all four: ../privileged/probe.py --aux)
val() { grid --validation --backbone shared_bottom,mmoe "$@"; }
val --out "$OUT/v_mtl" & val --aux-tasks $AUX --out "$OUT/v_aux" & wait
val --aux-tasks $AUX "${TEACHER[@]}" --backbone shared_bottom --out "$OUT/v_priv_aux_a" &
val --aux-tasks $AUX "${TEACHER[@]}" --backbone mmoe --out "$OUT/v_priv_aux_b" & wait
merge "$HERE/validation" "KuaiRand-Pure validation slice (finish, like): auxiliary outcome tasks, with and without \
the privileged teacher" "$OUT"/v_{mtl,aux,priv_aux_a,priv_aux_b}/results.json

# 2. the test split, once, with the settings of step 1
grid --out "$OUT/mtl" & grid --aux-tasks $AUX --out "$OUT/aux" & wait
grid --aux-tasks $AUX "${TEACHER[@]}" --backbone shared_bottom,mmoe --out "$OUT/priv_aux_a" &
grid --aux-tasks $AUX "${TEACHER[@]}" --backbone ple,cross_stitch --out "$OUT/priv_aux_b" & wait
merge "$HERE" "KuaiRand-Pure (finish, like): auxiliary outcome tasks, with and without the privileged teacher" \
  "$OUT"/{mtl,aux,priv_aux_a,priv_aux_b}/results.json
