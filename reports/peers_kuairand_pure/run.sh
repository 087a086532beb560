#!/usr/bin/env bash
# The peers on KuaiRand-Pure (all 228,329 events, prequential: one pass in time order, every mini-batch of 256
# scored before it is learned; windows `tail` = the last 20 % and `all`), with the settings chosen on the
# validation slice (validation/run.sh). Writes results.json / report.md / auc_curve.png here.
# Run from the repository root: bash reports/peers_kuairand_pure/run.sh  (about 30 minutes, 1 CPU)
set -euo pipefail
PY=${PY:-.venv/bin/python}
OUT=${OUT:-/tmp/peers_full}
HERE=reports/peers_kuairand_pure
COMMON=(--dataset csv --source ../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv
        --mapping mappings/kuairand_pure.toml --hash-buckets 262144 --threads 1 --device cpu --mode prequential)
# The peers at their named settings (NAMED_DEFAULTS of models/vw_baseline.py and models/river_baseline.py).
"$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs vw,vw_q,river_lr --seeds 1 --out "$OUT/peers"
# (The committed results.json has the river_fm rows of the previous run of these two FM commands, commit 02e44ca:
# the FM's code has not changed since, and on the shared machine a rerun was 3x slower; README.md says more.)
"$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs river_fm --seeds 3 --out "$OUT/river_fm"
# The river baselines as they were before issue 18 (one SGD step: 0.1 for the LR, 0.05 for the FM).
"$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs river_lr --seeds 1 --variant sgd-before \
  --model-option river.optimizer=sgd --model-option river.lr=0.1 --model-option river.intercept_lr=0.01 \
  --out "$OUT/river_lr_before"
"$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs river_fm --seeds 1 --variant sgd-before \
  --model-option river.optimizer=sgd --model-option river.lr=0.05 --model-option river.intercept_lr=0.01 \
  --out "$OUT/river_fm_before"
# The product's deep models at their defaults (with the wide part, models/wide.py, per-row AdaGrad embeddings,
# models/optimizers.py, and online counts of user and video, models/counts.py), 5 seeds. (Rerun for each change of
# the defaults: the committed results.json has these two commands' runs from the last one, with online counts, and
# the peers' runs from the run before; no peer's code or features changed in between.)
"$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs mtl,crossdistil --seeds 5 --out "$OUT/mtl"
# The same without the wide part (the deep model alone, with its default per-row AdaGrad embeddings), 5 seeds.
"$PY" -m consumers.cli evaluate "${COMMON[@]}" --configs mtl,crossdistil --seeds 5 --variant deep-only \
  --model-option wide=none --out "$OUT/deep_only"
"$PY" -m consumers.cli evaluate --from-results "$OUT"/*/results.json --title "KuaiRand-Pure: the peers a user would pick" \
  --out "$HERE"
