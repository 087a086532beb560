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
#    compared as a ratio;
# 4. the backtest on cuda with the learner in process and in a learner process of its own
#    (model.separate_process), one after the other, over the first SEPARATE_LIMIT records (default 40000).
# GPU_CHECKS=tests,train_step,backtest,separate (the default: all) picks sections.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:?usage: bench/gpu_checks.sh EVENT_LOG OUT_DIR}
out=${2:?usage: bench/gpu_checks.sh EVENT_LOG OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}

checks=",${GPU_CHECKS:-tests,train_step,backtest,separate},"
wanted() { [[ $checks == *",$1,"* ]]; }
backtest() {  # device, folder, extra flags...
  local device=$1 folder=$2
  shift 2
  "$py" -m consumers.cli backtest --log "file://$log" --config deploy/trainer.example.toml \
    --configs crossdistil --set "model.device=$device" --out "$folder" --no-plots --quiet "$@"
}
pytest_rc=-1 step_rc=-1 cuda_rc=-1 cpu_rc=-1 inproc_rc=-1 sep_rc=-1
limit=()
[[ -n ${LIMIT:-} ]] && limit=(--limit "$LIMIT")
if wanted backtest; then
  backtest cuda "$out/bt_cuda" "${limit[@]}" >"$out/bt_cuda.log" 2>&1 & cuda_pid=$!
  backtest cpu "$out/bt_cpu" "${limit[@]}" >"$out/bt_cpu.log" 2>&1 & cpu_pid=$!
fi
if wanted tests; then
  "$py" -m pytest -q -m unit ${PYTEST_ARGS:-} -p no:cacheprovider tests/unit >"$out/pytest.log" 2>&1
  pytest_rc=$?
fi
if wanted backtest; then
  wait $cuda_pid; cuda_rc=$?
  wait $cpu_pid; cpu_rc=$?
fi
# alone, so that their timings see an otherwise idle machine
if wanted separate; then
  backtest cuda "$out/bt_inproc" --limit "${SEPARATE_LIMIT:-40000}" >"$out/bt_inproc.log" 2>&1; inproc_rc=$?
  backtest cuda "$out/bt_separate" --limit "${SEPARATE_LIMIT:-40000}" --set model.separate_process=true \
    >"$out/bt_separate.log" 2>&1; sep_rc=$?
fi
if wanted train_step; then
  bench/gpu_train_step.sh --steps 10 >"$out/train_step.json" 2>"$out/train_step.err"
  step_rc=$?
fi

"$py" - "$out" "$pytest_rc" "$step_rc" "$cuda_rc" "$cpu_rc" "$inproc_rc" "$sep_rc" <<'EOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
pytest_rc, step_rc, cuda_rc, cpu_rc, inproc_rc, sep_rc = map(int, sys.argv[2:8])
result = {
    "torch": torch.__version__,
    "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
}
if pytest_rc != -1:
    result["unit_tests"] = {"rc": pytest_rc, "summary": (out / "pytest.log").read_text().strip().splitlines()[-1:]}
if step_rc != -1:
    try:
        result["train_step"] = json.loads((out / "train_step.json").read_text())
    except (OSError, ValueError) as error:
        result["train_step"] = {"rc": step_rc, "error": str(error)}


def compare(pairs, a, b):
    runs = {}
    for name, rc in pairs:
        try:
            summary = json.loads((out / f"bt_{name}" / "summary.json").read_text())["configurations"]["crossdistil"]
            timing = json.loads((out / f"bt_{name}" / "timing.json").read_text())["configurations"]["crossdistil"]
            runs[name] = {"rc": rc, "seconds": timing["seconds"],
                          "auc": {task: round(m["auc@lifetime"], 4) for task, m in summary["final"].items()},
                          "samples": {task: m["samples"] for task, m in summary["final"].items()}}
        except (OSError, KeyError, ValueError) as error:
            runs[name] = {"rc": rc, "error": repr(error)}
    if "auc" in runs.get(a, {}) and "auc" in runs.get(b, {}):
        runs[f"auc_difference_{a}_minus_{b}"] = {
            task: round(runs[a]["auc"][task] - runs[b]["auc"][task], 4) for task in runs[a]["auc"]}
        runs[f"seconds_ratio_{a}_to_{b}"] = round(runs[a]["seconds"] / runs[b]["seconds"], 3)
    return runs


if cuda_rc != -1:
    result["backtest_side_by_side"] = compare((("cuda", cuda_rc), ("cpu", cpu_rc)), "cuda", "cpu")
if sep_rc != -1:
    result["backtest_learner_process_on_cuda"] = compare((("separate", sep_rc), ("inproc", inproc_rc)),
                                                         "separate", "inproc")
text = json.dumps(result, indent=1)
(out / "gpu_checks.json").write_text(text + "\n")
print(text)
EOF
