#!/usr/bin/env bash
# §2f and §3f of reports/kuairand_pure/README.md: online counts of crosses of two fields (`count_features` entries
# "user_id*tab": each user's label rates per tab, per video type, ...; models/counts.py) as inputs of `mtl`. Run
# from the repository root. The crosses are chosen on the validation slice (step 1), then the test split is read
# once (step 2). Every evaluate run takes ~9 s here; about 20 + 30 minutes on this 2-core machine, two at a time.
# STEPS=2 runs the test split alone (STEPS=1 the validation slice alone; STEPS=3 the smoothing probe, STEPS=4 the
# crosses' own smoothing and prior, STEPS=5 the chosen one on the test split, STEPS=6 and 7 the `served` window on
# the validation slice and the test split: not run by default); every grid
# resumes (--resume) where an earlier run of this script stopped.
set -euo pipefail
OUT=${OUT:-/tmp/cross_counts}
HERE=reports/kuairand_pure/cross_counts
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
U=user_id,item_id  # the default counts before this study
COUNTED=follow,comment,forward,profile_enter,click,long_view  # (finish, like)'s counted outcomes (aux_tasks/)
mkdir -p "$OUT"
grid() {  # grid TASKS [evaluate flags...]
  local tasks=$1; shift
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks "$tasks" --configs mtl --mode both --batch-size 256 --hash-buckets 262144 --threads 1 --device cpu \
    --jobs 2 --resume "$@"
}
val() {  # val TASKS VARIANT COUNT_FEATURES [flags...]: the validation slice, shared-bottom and MMoE, 3 seeds
  local tasks=$1 variant=$2 fields=$3; shift 3
  grid "$tasks" --validation --backbone shared_bottom,mmoe --seeds 3 --variant "$variant" \
    --model-option "count_features=$fields" --out "$OUT/$variant" "$@"
}
merge() {  # merge OUT_DIR TITLE RESULTS...
  local out=$1 title=$2; shift 2
  .venv/bin/crossdistil evaluate --from-results "$@" --out "$out" --title "$title"
  python reports/kuairand_pure/summarize.py "$out/results.json" > "$out/tables.md"
}

# 1. the validation slice (the first 80 % of events; the test split is never read). Baselines, then the crosses of
#    the user with content fields, with context, per field alone, and the item with user segments.
if [[ ${STEPS:-1,2} == *1* ]]; then
grid click,long_view --validation --backbone shared_bottom,mmoe --seeds 3 --model-option count_features=$U \
  --out "$OUT/val_mtl_cl"
grid finish,like --validation --backbone shared_bottom,mmoe --seeds 3 --model-option count_features=$U \
  --out "$OUT/val_mtl_fl"
C="$U,user_id*tab,user_id*upload_type,user_id*video_tag,user_id*music_type,user_id*video_type"
val click,long_view ux_content "$C"
val click,long_view ux_ctx "$C,user_id*hourmin,user_id*author_id"
val click,long_view ix_seg "$C,item_id*user_active_degree,item_id*tab,item_id*register_days_range,item_id*fans_user_num_range"
for x in tab upload_type video_tag music_type video_type; do val click,long_view "u_$x" "$U,user_id*$x"; done
val click,long_view ut_h "$U,user_id*tab,user_id*hourmin"
val click,long_view ut_it "$U,user_id*tab,item_id*tab"
val click,long_view ut_h_vt "$U,user_id*tab,user_id*hourmin,user_id*video_tag"
val click,long_view ut_h_vt_it "$U,user_id*tab,user_id*hourmin,user_id*video_tag,item_id*tab"
val click,long_view ut_vt_mt "$U,user_id*tab,user_id*video_type,user_id*music_type"
val click,long_view ut_vt_mt_h "$U,user_id*tab,user_id*video_type,user_id*music_type,user_id*hourmin"
val finish,like fl_ut "$U,user_id*tab"
val finish,like fl_ux_ctx "$C,user_id*hourmin,user_id*author_id"
val finish,like fl_ut_h_vt "$U,user_id*tab,user_id*hourmin,user_id*video_tag"
val finish,like fl_ut_vt_mt "$U,user_id*tab,user_id*video_type,user_id*music_type"
val finish,like fl_ut_vt_mt_h "$U,user_id*tab,user_id*video_type,user_id*music_type,user_id*hourmin"
val finish,like fl_counted_ut_vt_mt "$U,user_id*tab,user_id*video_type,user_id*music_type" --counted-tasks $COUNTED
merge "$HERE/validation" "KuaiRand-Pure validation slice: online counts of crosses" "$OUT"/val_mtl_{cl,fl}/results.json \
  "$OUT"/{ux_content,ux_ctx,ix_seg,u_tab,u_upload_type,u_video_tag,u_music_type,u_video_type,ut_h,ut_it,ut_h_vt}/results.json \
  "$OUT"/{ut_h_vt_it,ut_vt_mt,ut_vt_mt_h}/results.json "$OUT"/fl_{ut,ux_ctx,ut_h_vt,ut_vt_mt,ut_vt_mt_h}/results.json \
  "$OUT"/fl_counted_ut_vt_mt/results.json
fi

# 2. the test split, read once: the crosses chosen in step 1 (ut_vt_mt: the user with the tab, the video type and
#    the music type) against the counts of before (the user and the video), four backbones, 10 seeds, both pairs;
#    for (finish, like) also on top of the six counted outcomes (aux_tasks/, §3e). The baselines name their counts,
#    so they stay the counts of before whatever the default.
if [[ ${STEPS:-1,2} == *2* ]]; then
CHOSEN="$U,user_id*tab,user_id*video_type,user_id*music_type"
tgrid() { grid "$@" --backbone shared_bottom,mmoe,ple,cross_stitch --seeds 10; }
tgrid click,long_view --model-option count_features=$U --out "$OUT/test_mtl_cl"
tgrid click,long_view --variant crosses --model-option "count_features=$CHOSEN" --out "$OUT/test_crosses_cl"
tgrid finish,like --variant crosses --model-option "count_features=$CHOSEN" --out "$OUT/test_crosses_fl"
tgrid finish,like --counted-tasks $COUNTED --variant counted+crosses --model-option "count_features=$CHOSEN" \
  --out "$OUT/test_counted_crosses_fl"
# (finish, like)'s baselines `mtl` and `mtl[counted]` are aux_tasks/ten_seeds' runs (the same commands: step 6 of
# aux_tasks/run.sh; `mtl` of (click, long_view) re-run above equals its earlier runs in all 80 to the last digit).
# With RERUN=1 they are run again instead.
if [ "${RERUN:-0}" = 1 ]; then
  tgrid finish,like --model-option count_features=$U --out "$OUT/test_mtl_fl"
  tgrid finish,like --counted-tasks $COUNTED --model-option count_features=$U --out "$OUT/test_counted_fl"
else
  for c in mtl counted; do
    mkdir -p "$OUT/test_${c}_fl"
    python - "$c" reports/kuairand_pure/aux_tasks/ten_seeds/results.json "$OUT/test_${c}_fl/results.json" <<'PY'
import json, sys
name = {"mtl": "mtl", "counted": "mtl[counted]"}[sys.argv[1]]
doc = json.load(open(sys.argv[2]))
doc["runs"] = [r for r in doc["runs"] if r["config"] == name]
json.dump(doc, open(sys.argv[3], "w"))
PY
  done
fi
merge "$HERE" "KuaiRand-Pure, test split: online counts of crosses, 10 seeds" "$OUT"/test_{mtl,crosses}_cl/results.json \
  "$OUT"/test_{mtl,crosses,counted,counted_crosses}_fl/results.json
fi

# 3. (after the test split, validation slice only) a larger count_smoothing against the within-user ranking loss of
#    §3f: the counts of before and the chosen crosses at a = 20, the crosses at a = 50 (validation/smoothing/)
if [[ ${STEPS:-1,2} == *3* ]]; then
C3="$U,user_id*tab,user_id*video_type,user_id*music_type"
val click,long_view a20 "$U" --model-option count_smoothing=20
val click,long_view x_a20 "$C3" --model-option count_smoothing=20
val finish,like fl_a20 "$U" --model-option count_smoothing=20
val finish,like fl_x_a20 "$C3" --model-option count_smoothing=20
val click,long_view x_a50 "$C3" --model-option count_smoothing=50
val finish,like fl_x_a50 "$C3" --model-option count_smoothing=50
merge "$HERE/validation/smoothing" "KuaiRand-Pure validation slice: counts of crosses with a larger count_smoothing" \
  "$OUT"/val_mtl_{cl,fl}/results.json "$OUT"/{ut_vt_mt,fl_ut_vt_mt,a20,x_a20,fl_a20,fl_x_a20,x_a50,fl_x_a50}/results.json
fi

# 4. (validation slice only) the crosses with their own smoothing (count_cross_smoothing, the single fields keeping
#    a = 5) and read against the user's own rate (count_cross_prior=field): against the within-user ranking loss of
#    §3f without the AUC cost of a larger a for every field (validation/cross_prior/)
if [[ ${STEPS:-1,2} == *4* ]]; then
C4="$U,user_id*tab,user_id*video_type,user_id*music_type"
# the baselines and the crosses at one a of step 1 (--resume: nothing is re-run where step 1 ran)
grid click,long_view --validation --backbone shared_bottom,mmoe --seeds 3 --model-option count_features=$U \
  --out "$OUT/val_mtl_cl"
grid finish,like --validation --backbone shared_bottom,mmoe --seeds 3 --model-option count_features=$U \
  --out "$OUT/val_mtl_fl"
val click,long_view ut_vt_mt "$C4"
val finish,like fl_ut_vt_mt "$C4"
for pair in cl fl; do
  tasks=$([ $pair = cl ] && echo click,long_view || echo finish,like)
  val $tasks ${pair}_xs_c20 "$C4" --model-option count_cross_smoothing=20
  val $tasks ${pair}_xs_c50 "$C4" --model-option count_cross_smoothing=50
  val $tasks ${pair}_xf "$C4" --model-option count_cross_prior=field
  val $tasks ${pair}_xf_c20 "$C4" --model-option count_cross_prior=field --model-option count_cross_smoothing=20
  val $tasks ${pair}_xf_c50 "$C4" --model-option count_cross_prior=field --model-option count_cross_smoothing=50
done
merge "$HERE/validation/cross_prior" "KuaiRand-Pure validation slice: crosses with their own smoothing and prior" \
  "$OUT"/val_mtl_{cl,fl}/results.json "$OUT"/{ut_vt_mt,fl_ut_vt_mt}/results.json \
  "$OUT"/{cl,fl}_{xs_c20,xs_c50,xf,xf_c20,xf_c50}/results.json
python reports/kuairand_pure/summarize.py --gauc "$HERE/validation/cross_prior/results.json" \
  > "$HERE/validation/cross_prior/paired.md"
fi

# 5. the test split, read once more: the crosses of step 2 with count_cross_smoothing = 50 (chosen in step 4: the
#    stream's prior; the field prior lost like's AUC), 4 backbones x 10 seeds, both pairs; paired with step 2's
#    runs (the baselines and the crosses at a = 5), kept in ./results.json (cross_smoothing/)
if [[ ${STEPS:-1,2} == *5* ]]; then
C5="$U,user_id*tab,user_id*video_type,user_id*music_type"
tgrid() { grid "$@" --backbone shared_bottom,mmoe,ple,cross_stitch --seeds 10; }
tgrid click,long_view --variant crosses_c50 --model-option "count_features=$C5" \
  --model-option count_cross_smoothing=50 --out "$OUT/test_crosses_c50_cl"
tgrid finish,like --variant crosses_c50 --model-option "count_features=$C5" \
  --model-option count_cross_smoothing=50 --out "$OUT/test_crosses_c50_fl"
python - "$HERE/results.json" "$OUT" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
for pair, tasks in (("cl", ["click", "long_view"]), ("fl", ["finish", "like"])):
    runs = [r for r in doc["runs"] if r["tasks"] == tasks and r["config"] in ("mtl", "mtl[crosses]")]
    json.dump({**doc, "runs": runs}, open(f"{sys.argv[2]}/test_step2_{pair}.json", "w"))
PY
merge "$HERE/cross_smoothing" "KuaiRand-Pure, test split: crosses with count_cross_smoothing = 50, 10 seeds" \
  "$OUT"/test_step2_{cl,fl}.json "$OUT"/test_crosses_c50_{cl,fl}/results.json
python reports/kuairand_pure/summarize.py --gauc "$HERE/cross_smoothing/results.json" > "$HERE/cross_smoothing/paired.md"
fi

# 6. (validation slice) the `served` window of `crossdistil evaluate` (--publications 4, its default since 45cab02):
#    within-user ranking as serving ranks it, each user's rows within the scores of one published model, for the
#    counts of before, the chosen crosses at a = 5 and at the crosses' own a = 50; prequential only (the split's
#    frozen model has no state changes to pool); 5 seeds (like's tail holds a few hundred within-user pairs)
#    (served/validation/)
C6="$U,user_id*tab,user_id*video_type,user_id*music_type"
served_grid() {  # served_grid TASKS OUT_NAME [flags...]: prequential, the served window
  local tasks=$1 name=$2; shift 2
  grid "$tasks" --mode prequential --publications 4 --out "$OUT/served/$name" "$@"
}
served_settings() {  # served_settings PREFIX [flags...]: the counts of before, the crosses, their a = 50; both pairs
  local prefix=$1 pair tasks; shift
  for pair in cl fl; do
    tasks=$([ $pair = cl ] && echo click,long_view || echo finish,like)
    served_grid $tasks "${prefix}_mtl_$pair" "$@" --model-option count_features=$U
    served_grid $tasks "${prefix}_x_$pair" "$@" --variant crosses --model-option "count_features=$C6"
    served_grid $tasks "${prefix}_xc50_$pair" "$@" --variant crosses_c50 --model-option "count_features=$C6" \
      --model-option count_cross_smoothing=50
  done
}
if [[ ${STEPS:-1,2} == *6* ]]; then
served_settings val --validation --backbone shared_bottom,mmoe --seeds 5
merge "$HERE/served/validation" "KuaiRand-Pure validation slice: within-user ranking as serving ranks it (crosses)" \
  "$OUT"/served/val_{mtl,x,xc50}_{cl,fl}/results.json
python reports/kuairand_pure/summarize.py --gauc "$HERE/served/validation/results.json" \
  > "$HERE/served/validation/paired.md"
fi

# 7. the test split, prequential, the same three settings, 4 backbones x 10 seeds, both pairs (served/)
if [[ ${STEPS:-1,2} == *7* ]]; then
served_settings test --backbone shared_bottom,mmoe,ple,cross_stitch --seeds 10
merge "$HERE/served" "KuaiRand-Pure, test split: within-user ranking as serving ranks it (crosses), 10 seeds" \
  "$OUT"/served/test_{mtl,x,xc50}_{cl,fl}/results.json
python reports/kuairand_pure/summarize.py --gauc "$HERE/served/results.json" > "$HERE/served/paired.md"
fi
