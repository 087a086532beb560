#!/usr/bin/env bash
# The training-step benchmark on CUDA: prints one JSON object {"fp32": {...}, "bf16": {...}}.
# Usage: bench/gpu_train_step.sh [extra bench/train_step.py flags, e.g. --steps 10]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! python3 -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo '{"error": "CUDA is not available to torch on this machine; run bench/train_step.py for the CPU numbers"}'
  exit 2
fi
fp32=$(python3 bench/train_step.py --device cuda --threads 0 "$@")
bf16=$(python3 bench/train_step.py --device cuda --threads 0 --bf16 "$@")
printf '{"fp32": %s,\n "bf16": %s}\n' "$fp32" "$bf16"
