#!/usr/bin/env bash
# §2e and §3d of reports/kuairand_pure/README.md: (finish, like) learnt together with six more outcomes as auxiliary
# tasks (`crossdistil evaluate --aux-tasks`: learnt, never scored), alone and with the privileged teacher
# (models/privileged.py). Run from the repository root. Settings are chosen on the validation slice (step 1, and the
# probe of step 0, run with PROBE=1), then the test split is read once (step 2). About 45 + 60 minutes on
# this 2-core machine, two processes at a time.
set -euo pipefail
OUT=${OUT:-/tmp/aux_tasks}
HERE=reports/kuairand_pure/aux_tasks
mkdir -p "$OUT"
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
AUX=follow,comment,forward,profile_enter,click,long_view
W=follow:0.2,comment:0.2,forward:0.2,profile_enter:0.2,click:0.2,long_view:0.2  # bce_weight of the auxiliary tasks
EIGHT=play_time_ms,profile_stay_time,comment_stay_time,is_profile_enter,is_follow,is_comment,is_forward,is_hate
TEACHER=(--model-option privileged=$EIGHT --model-option privileged_weight=finish:0.3,like:0.8)
grid() {
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks finish,like --configs mtl --seeds 5 --mode both --batch-size 256 --hash-buckets 262144 --threads 1 \
    --device cpu --backbone shared_bottom,mmoe,ple,cross_stitch --model-option count_features=user_id,item_id "$@"
}
merge() {  # merge OUT_DIR TITLE RESULTS...
  local out=$1 title=$2; shift 2
  .venv/bin/crossdistil evaluate --from-results "$@" --out "$out" --title "$title"
  python reports/kuairand_pure/summarize.py "$out/results.json" > "$out/tables.md"
}

# 0. the probe (reports/kuairand_pure/privileged/probe.py; its lines are in probe/, summary.py prints them)
if [ "${PROBE:-0}" = 1 ]; then
  PAUX=is_follow,is_comment,is_forward,is_profile_enter,is_click,long_view
  probe() { PYTHONPATH=. .venv/bin/python reports/kuairand_pure/privileged/probe.py --tasks finish,like --seeds 0,1,2,3,4 \
    --privileged $EIGHT "$@"; }
  probe --lams 0,0.8 > "$OUT/base.jsonl"; probe --lams 0,0.8 --aux $PAUX > "$OUT/aux.jsonl"
  probe --backbone mmoe,ple,cross_stitch --lams 0 > "$OUT/base4.jsonl"
  probe --backbone mmoe,ple,cross_stitch --lams 0,finish=0.3:like=0.8 --aux $PAUX > "$OUT/aux4.jsonl"
  probe --lams finish=0:like=0.8,finish=0.3:like=0.8,finish=0:like=0.5 --aux $PAUX > "$OUT/aux_lam.jsonl"
  probe --lams 0 --aux is_click,long_view > "$OUT/aux_cl.jsonl"
  probe --lams 0 --aux is_follow,is_comment,is_forward,is_profile_enter > "$OUT/aux_inter.jsonl"
  probe --mode prequential --lams 0 > "$OUT/pq_base.jsonl"; probe --mode prequential --lams 0 --aux $PAUX > "$OUT/pq_aux.jsonl"
  for a in "" $PAUX; do probe --mode prequential --seeds 0,1,2 --lams 0 --aux "$a" --set 'count_features=[]'; done \
    > "$OUT/pq_nocount.jsonl"
fi

# 1. the validation slice (the first 72 % of events; the test split is never read), shared-bottom and MMoE (the
#    probe ran all four backbones in the split). First the auxiliary tasks at their full weight: finish gains, like
#    loses in the prequential pass; at weight 0.2 (the probe: both gain) they are kept.
val() { grid --validation --backbone shared_bottom,mmoe "$@"; }
val --out "$OUT/v_mtl" & val --aux-tasks $AUX --out "$OUT/v_aux" & wait
merge "$HERE/validation_weight1" "KuaiRand-Pure validation slice (finish, like): six auxiliary tasks at weight 1" \
  "$OUT"/v_{mtl,aux}/results.json
val --aux-tasks $AUX --model-option bce_weight=$W --out "$OUT/v_aux02" &
val --aux-tasks $AUX --model-option bce_weight=$W "${TEACHER[@]}" --out "$OUT/v_priv_aux02" & wait
merge "$HERE/validation" "KuaiRand-Pure validation slice (finish, like): six auxiliary tasks at weight 0.2, with and \
without the privileged teacher" "$OUT"/v_{mtl,aux02}/results.json "$OUT/v_priv_aux02/results.json"

# 2. the test split, once: the choice of step 1 (the auxiliary tasks at 0.2, without a teacher: the best in the
#    split and the tail together) on all four backbones; the teacher on top (best in the split alone, behind in the
#    tail) on the two backbones of step 1, for the record
grid --out "$OUT/mtl" & grid --aux-tasks $AUX --model-option bce_weight=$W --out "$OUT/aux02" & wait
grid --aux-tasks $AUX --model-option bce_weight=$W "${TEACHER[@]}" --backbone shared_bottom,mmoe --out "$OUT/priv_aux02"
merge "$HERE" "KuaiRand-Pure (finish, like): six auxiliary tasks, with and without the privileged teacher" \
  "$OUT"/{mtl,aux02,priv_aux02}/results.json

# 3. (a later session) CrossDistil on top of the auxiliary tasks, the validation slice only (crossdistil_validation/):
#    the default trust-gated crossdistil with the default partners, with partners that carry finish's and like's own
#    outcomes, and with the auxiliary tasks' distillation off; `--jobs 2` trains two runs at once (~6 minutes)
cd_val() { grid --validation --backbone shared_bottom --seeds 3 --aux-tasks $AUX --model-option bce_weight=$W \
  --jobs 2 "$@"; }
cd_val --configs mtl,crossdistil --variant aux --out "$OUT/cd_a"
cd_val --configs crossdistil --variant auxpart --model-option partners=like:profile_enter,finish:long_view \
  --out "$OUT/cd_b"
cd_val --configs crossdistil --variant auxkd0 \
  --model-option kd_weight=follow:0,comment:0,forward:0,profile_enter:0,click:0,long_view:0 --out "$OUT/cd_c"
.venv/bin/crossdistil evaluate --from-results "$OUT"/cd_{a,b,c}/results.json --out "$HERE/crossdistil_validation" --baseline "mtl[aux]" \
  --title "KuaiRand-Pure validation slice (finish, like) with six auxiliary tasks: CrossDistil (trust gate) on top"
python "$HERE/crossdistil_validation/summary.py" "$HERE/crossdistil_validation/results.json" \
  > "$HERE/crossdistil_validation/tables.md"

# 4. (the same later session) per-task weights of the six: the four interactions apart from click and long_view,
#    validation slice, shared-bottom and MMoE, 3 seeds (weights_validation/)
wv() { grid --validation --backbone shared_bottom,mmoe --seeds 3 --jobs 2 "$@"; }
wv --out "$OUT/w_mtl"
wv --aux-tasks $AUX --variant w02 --model-option bce_weight=$W --out "$OUT/w02"
wv --aux-tasks $AUX --variant r1 --out "$OUT/r1" \
  --model-option bce_weight=follow:1,comment:1,forward:1,profile_enter:1,click:0.2,long_view:0.2
wv --aux-tasks $AUX --variant r05 --out "$OUT/r05" \
  --model-option bce_weight=follow:0.5,comment:0.5,forward:0.5,profile_enter:0.5,click:0.1,long_view:0.1
W0=follow:0,comment:0,forward:0,profile_enter:0,click:0,long_view:0  # the towers learn nothing, the counts' inputs stay
wv --aux-tasks $AUX --variant w0 --model-option bce_weight=$W0 --out "$OUT/w0"
merge "$HERE/weights_validation" "KuaiRand-Pure validation slice (finish, like): per-task weights of the six \
auxiliary tasks" "$OUT"/{w_mtl,w02,r1,r05,w0}/results.json

# 5. (the same later session) the test grid of step 2 on to ten seeds: --resume keeps the 5-seed runs of each --out
#    (the same command's results.json) and runs seeds 5-9 alone (ten_seeds/)
ten() { grid --seeds 10 --jobs 2 --resume "$@"; }
ten --out "$OUT/mtl"
ten --aux-tasks $AUX --model-option bce_weight=$W --out "$OUT/aux02"
ten --aux-tasks $AUX --variant w0 --model-option bce_weight=$W0 --out "$OUT/w0_test"  # for the record (§2e, §3d)
merge "$HERE/ten_seeds" "KuaiRand-Pure (finish, like), test split: six auxiliary tasks at 0.2 and at 0, 10 seeds" \
  "$OUT"/{mtl,aux02,w0_test}/results.json
# 6. (a later session) the six outcomes only counted (model.options.counted_tasks, `evaluate --counted-tasks`: their
#    rates are the counts' inputs, no towers): the validation grid of step 4 (counted_validation/, merged with
#    weights_validation/'s runs), then the test grid of step 5 on ten seeds (merged into ten_seeds/), then the live
#    code path (reports/backtest_kuairand_pure/aux_tasks/, with counted.toml beside the two configurations there)
wv --counted-tasks $AUX --out "$OUT/w_counted"
wv --counted-tasks $AUX --model-option count_features=user_id,item_id,author_id --variant counted_author \
  --out "$OUT/w_counted_author"  # the author's counts too
merge "$HERE/counted_validation" "KuaiRand-Pure validation slice (finish, like): six outcomes counted, not learnt \
(and with author counts)" reports/kuairand_pure/aux_tasks/weights_validation/results.json \
  "$OUT"/w_counted{,_author}/results.json
grid --seeds 10 --jobs 2 --counted-tasks $AUX --out "$OUT/counted_test"
merge "$HERE/ten_seeds" "KuaiRand-Pure (finish, like), test split: six auxiliary tasks at 0.2, at 0 and only counted, \
10 seeds" "$OUT"/{mtl,aux02,w0_test,counted_test}/results.json
B=reports/backtest_kuairand_pure/aux_tasks
.venv/bin/crossdistil backtest --log file:///tmp/kuairand_pure_aux.evlog --config $B/two_tasks.toml \
  --config $B/with_aux.toml --config $B/counted.toml --out $B --sample-every 5000 --quiet
# 7. (the same later session) the other six outcomes counted beside (click, long_view): the validation slice
#    (shared-bottom and MMoE, 3 seeds), then the test split (four backbones, 10 seeds): counted_click_long_view/
CL=finish,like,follow,comment,forward,profile_enter
cl() {  # grid's flags with (click, long_view) as the task set (--tasks adds a set: grid's own would stay)
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks click,long_view --configs mtl --mode both --batch-size 256 --hash-buckets 262144 --threads 1 \
    --device cpu --backbone shared_bottom,mmoe,ple,cross_stitch --jobs 2 --model-option count_features=user_id,item_id "$@"
}
cl --validation --backbone shared_bottom,mmoe --seeds 3 --out "$OUT/cl_mtl"
cl --validation --backbone shared_bottom,mmoe --seeds 3 --counted-tasks $CL --out "$OUT/cl_counted"
merge "$HERE/counted_click_long_view/validation" "KuaiRand-Pure validation slice (click, long_view): the six other \
outcomes counted" "$OUT"/cl_{mtl,counted}/results.json
cl --seeds 10 --out "$OUT/clt_mtl"
cl --seeds 10 --counted-tasks $CL --out "$OUT/clt_counted"
merge "$HERE/counted_click_long_view" "KuaiRand-Pure (click, long_view), test split: the six other outcomes counted, \
10 seeds" "$OUT"/clt_{mtl,counted}/results.json
