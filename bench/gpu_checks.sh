#!/usr/bin/env bash
# Every check that needs a GPU, in one run; prints one JSON object and leaves logs in OUT_DIR.
#
#   bench/gpu_checks.sh EVENT_LOG OUT_DIR
#
# LIMIT=N in the environment replays only the first N records (a quick try of the script itself).
# EVENT_LOG is a KuaiRand event log (`crossdistil stream --dataset kuairand --to file://PATH`).
# 1. the unit tests (while the backtests of 3. run) with CUDA visible (the pinned-memory test runs instead of being skipped, and
#    device="auto" picks cuda wherever a test leaves it at the default);
# 2. the training-step benchmark on CUDA, fp32 and bf16, alone at the end (bench/gpu_train_step.sh);
# 3. the same backtest (crossdistil rung, the example trainer configuration) on cuda and on cpu, side by
#    side at the same time: per-task prequential AUC must agree within noise, and their wall times are
#    compared as a ratio.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:?usage: bench/gpu_checks.sh EVENT_LOG OUT_DIR}
out=${2:?usage: bench/gpu_checks.sh EVENT_LOG OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}

backtest() {  # device, folder
  "$py" -m consumers.cli backtest --log "file://$log" --config deploy/trainer.example.toml \
    --configs crossdistil --set "model.device=$1" --out "$2" --no-plots --quiet ${LIMIT:+--limit "$LIMIT"}
}
backtest cuda "$out/bt_cuda" >"$out/bt_cuda.log" 2>&1 & cuda_pid=$!
backtest cpu "$out/bt_cpu" >"$out/bt_cpu.log" 2>&1 & cpu_pid=$!
"$py" -m pytest -q -m unit ${PYTEST_ARGS:-} -p no:cacheprovider tests/unit >"$out/pytest.log" 2>&1
pytest_rc=$?
wait $cuda_pid; cuda_rc=$?
wait $cpu_pid; cpu_rc=$?
# alone, so that its timings see an otherwise idle machine
bench/gpu_train_step.sh --steps 10 >"$out/train_step.json" 2>"$out/train_step.err"
step_rc=$?

"$py" - "$out" "$pytest_rc" "$step_rc" "$cuda_rc" "$cpu_rc" <<'EOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
pytest_rc, step_rc, cuda_rc, cpu_rc = map(int, sys.argv[2:6])
result = {
    "torch": torch.__version__,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "unit_tests": {"rc": pytest_rc, "summary": (out / "pytest.log").read_text().strip().splitlines()[-1:]},
}
try:
    result["train_step"] = json.loads((out / "train_step.json").read_text())
except (OSError, ValueError) as error:
    result["train_step"] = {"rc": step_rc, "error": str(error)}
runs = {}
for device, rc in (("cuda", cuda_rc), ("cpu", cpu_rc)):
    try:
        summary = json.loads((out / f"bt_{device}" / "summary.json").read_text())["configurations"]["crossdistil"]
        timing = json.loads((out / f"bt_{device}" / "timing.json").read_text())["configurations"]["crossdistil"]
        runs[device] = {"rc": rc, "seconds": timing["seconds"],
                        "auc": {task: round(m["auc@lifetime"], 4) for task, m in summary["final"].items()},
                        "samples": {task: m["samples"] for task, m in summary["final"].items()}}
    except (OSError, KeyError, ValueError) as error:
        runs[device] = {"rc": rc, "error": repr(error)}
if "auc" in runs.get("cuda", {}) and "auc" in runs.get("cpu", {}):
    runs["auc_difference_cuda_minus_cpu"] = {
        task: round(runs["cuda"]["auc"][task] - runs["cpu"]["auc"][task], 4) for task in runs["cuda"]["auc"]}
    runs["seconds_ratio_cuda_to_cpu"] = round(runs["cuda"]["seconds"] / runs["cpu"]["seconds"], 3)
result["backtest_side_by_side"] = runs
text = json.dumps(result, indent=1)
(out / "gpu_checks.json").write_text(text + "\n")
print(text)
EOF
