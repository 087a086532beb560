#!/usr/bin/env bash
# §3i of reports/kuairand_pure/README.md: how often must a trainer publish? The product's default model (`mtl`,
# default options) in one prequential pass over KuaiRand-Pure per (pair, backbone, seed), its tail also scored as
# serving replicas score it with the model published N times over the tail (`crossdistil evaluate --cadence`):
# N = 1 is a model trained on the first 80 % of the log and never updated again, N = 178 a publication every ~256
# events (about every batch), and the prequential `tail` the limit (each batch scored by the model of just before
# it). Nothing here is tuned, so the test split is read directly. Run from the repository root; 20 evaluate runs of
# ~15 s, two at a time: ~3 minutes here. Each grid resumes (--resume) where an earlier run of this script stopped.
# STEPS=2 (not run by default) also runs every count as a grid of its own (`--publications N`, 80 more runs of
# (click, long_view)) and checks that its `served` window gives the cadence's figures to the last digit.
set -euo pipefail
OUT=${OUT:-/tmp/cadence}
HERE=reports/kuairand_pure/cadence
SRC=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
CADENCE=1,2,4,8,16,32,64,178
grid() {  # grid TASKS OUT [flags...]
  local tasks=$1 out=$2; shift 2
  .venv/bin/crossdistil evaluate --dataset csv --source "$SRC" --mapping mappings/kuairand_pure.toml \
    --tasks "$tasks" --configs mtl --backbone shared_bottom,mmoe --seeds 5 --mode prequential --batch-size 256 \
    --hash-buckets 262144 --threads 1 --device cpu --jobs 2 --resume --out "$out" "$@"
}
if [[ ${STEPS:-1} == *1* ]]; then
  grid click,long_view "$OUT/click_long_view" --cadence "$CADENCE"
  grid finish,like "$OUT/finish_like" --cadence "$CADENCE"
  .venv/bin/crossdistil evaluate --from-results "$OUT"/{click_long_view,finish_like}/results.json --out "$HERE" \
    --title "KuaiRand-Pure: the default model served at eight publication cadences"
  .venv/bin/python "$HERE/summarize.py" "$SRC" "$HERE/results.json" --json "$HERE/cadence.json" > "$HERE/cadence.md"
fi
if [[ ${STEPS:-1} == *2* ]]; then
  for n in ${CADENCE//,/ }; do grid click,long_view "$OUT/separate/p$n" --publications "$n"; done
  .venv/bin/python "$HERE/summarize.py" "$SRC" "$HERE/results.json" --against "$OUT/separate" > /dev/null
fi
