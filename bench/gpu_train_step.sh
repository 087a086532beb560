#!/usr/bin/env bash
# The training-step benchmark on CUDA: prints one JSON object {"fp32": {...}, "bf16": {...}}.
# Usage: bench/gpu_train_step.sh [extra bench/train_step.py flags, e.g. --steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo '{"error": "CUDA is not available to torch on this machine; run bench/train_step.py for the CPU numbers"}'
  exit 2
fi
sizes=${BATCH_SIZES:-256,4096,32768}  # the issue-17 targets: >= 2M samples/s at 4,096 and >= 5M at 32,768
# --cuda-graphs: plain steps against CUDA-graph replays of the step (models/graphs.py), side by side
fp32=$(python3 bench/train_step.py --device cuda --threads 0 --batch-sizes "$sizes" --cuda-graphs "$@")
bf16=$(python3 bench/train_step.py --device cuda --threads 0 --batch-sizes "$sizes" --bf16 --cuda-graphs "$@")
printf '{"fp32": %s,\n "bf16": %s}\n' "$fp32" "$bf16"
