#!/usr/bin/env bash
# After the wide part and the online counts became defaults (issue 18): does CrossDistil help a stronger student?
# Validation slice only (`--validation`: train on the first 72 % of KuaiRand-Pure in time order, test on the next
# 8 %; the test split is never read). Shared-bottom and MMoE, 5 seeds, both task pairs.
#   trust       the default options of rung crossdistil (teachers on a stopped backbone, trust-gated KD)
#   residual    teacher_residual: r_k = stopgrad(s_k) + tower_k, so a teacher starts as its student
#               (aux_weight 0.1: the ranking loss refines, it does not replace)
#   privileged  a residual, label-aware teacher on BCE alone (generalised distillation: the teacher of k reads
#               y_j at training time), distilled without gate or correction at alpha = 0.5
# Run from the repository root: bash reports/kuairand_pure/residual/run.sh  (about 15 minutes on two cores)
set -euo pipefail
OUT=${OUT:-/tmp/kuairand_pure_residual}
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
run() {  # run PAIR NAME [evaluate flags...]
  local pair=$1 name=$2; shift 2
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks "$pair" --backbone shared_bottom,mmoe --seeds 5 --mode split --validation \
    --batch-size 256 --hash-buckets 262144 --threads 1 --device cpu --model-option count_features=user_id,item_id --out "$OUT/${pair/,/_}_$name" "$@"
}
lane() {  # one pair: two pairs run side by side, one per core
  local pair=$1
  run "$pair" base --configs mtl,crossdistil@trust
  run "$pair" residual --configs crossdistil@trust --variant residual --model-option teacher_residual=true \
    --model-option aux_weight=0.1
  run "$pair" privileged --configs crossdistil@trust --variant privileged --model-option teacher_residual=true \
    --model-option teacher_partner_input=true --model-option kd_gate=none --model-option correction=none \
    --model-option aux_weight=0 --model-option kd_weight=0.5
}
lane click,long_view > "$OUT.click_long_view.log" 2>&1 &
lane finish,like > "$OUT.finish_like.log" 2>&1 &
wait %1 && wait %2
for pair in click_long_view finish_like; do
  .venv/bin/crossdistil evaluate --from-results "$OUT"/${pair}_*/results.json \
    --out reports/kuairand_pure/residual/$pair --title "KuaiRand-Pure validation slice: residual and privileged teachers"
done
