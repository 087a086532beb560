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
# 5. with KUAIRAND_PURE_CSV set (../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv, carried), issue
#    17's evaluate: `crossdistil evaluate` of the default crossdistil over all of KuaiRand-Pure (228k events, one
#    backbone, one seed, prequential) on cuda at batch 4,096 and 256, each plain and with --cuda-graphs (the step
#    replayed as one CUDA graph, models/graphs.py), then on cpu at 4,096 (one torch thread), one after the other:
#    seconds (of the steps), wall seconds (of the command) and tail AUC of each.
# 6. graphs: the same backtest on cuda with dense batching (full batches of batching.batch_size) over the first
#    GRAPHS_LIMIT records (default 200000), plain and with model.cuda_graphs (the trainer's step replayed as one CUDA
#    graph), one after the other: seconds ratio and AUC difference.
# GPU_CHECKS=tests,train_step,backtest,separate,evaluate,graphs (the default: all) picks sections.
set -uo pipefail
cd "$(dirname "$0")/.."
log=${1:?usage: bench/gpu_checks.sh EVENT_LOG OUT_DIR}
out=${2:?usage: bench/gpu_checks.sh EVENT_LOG OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}

checks=",${GPU_CHECKS:-tests,train_step,backtest,separate,evaluate,graphs},"
wanted() { [[ $checks == *",$1,"* ]]; }
backtest() {  # device, folder, extra flags...
  local device=$1 folder=$2
  shift 2
  "$py" -m consumers.cli backtest --log "file://$log" --config deploy/trainer.example.toml \
    --configs crossdistil --set "model.device=$device" --out "$folder" --no-plots --quiet "$@"
}
pytest_rc=-1 step_rc=-1 cuda_rc=-1 cpu_rc=-1 inproc_rc=-1 sep_rc=-1 plain_rc=-1 graphs_rc=-1
limit=()
[[ -n ${LIMIT:-} ]] && limit=(--limit "$LIMIT")
if wanted backtest; then
  backtest cuda "$out/bt_cuda" "${limit[@]}" >"$out/bt_cuda.log" 2>&1 & cuda_pid=$!
  backtest cpu "$out/bt_cpu" "${limit[@]}" >"$out/bt_cpu.log" 2>&1 & cpu_pid=$!
fi
if wanted tests; then
  pytest_args=(${PYTEST_ARGS:-})
  [[ -n ${PYTEST_K:-} ]] && pytest_args+=(-k "$PYTEST_K")  # e.g. PYTEST_K="gpu or cuda": the CUDA-only tests alone
  # one process on the one GPU; pyproject's addopts asks for pytest-xdist's workers (-n 2), which an image without
  # pytest-xdist would refuse as an unknown option
  if "$py" -c "import xdist" 2>/dev/null; then pytest_args+=(-n 0); else pytest_args+=(-o "addopts=-ra --strict-markers"); fi
  "$py" -m pytest -q -m unit "${pytest_args[@]}" -p no:cacheprovider tests/unit >"$out/pytest.log" 2>&1
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
if wanted graphs; then
  backtest cuda "$out/bt_plain" --limit "${GRAPHS_LIMIT:-200000}" --batching dense >"$out/bt_plain.log" 2>&1
  plain_rc=$?
  backtest cuda "$out/bt_graphs" --limit "${GRAPHS_LIMIT:-200000}" --batching dense --set model.cuda_graphs=true \
    >"$out/bt_graphs.log" 2>&1
  graphs_rc=$?
fi
evaluate_runs=()
if wanted evaluate && [[ -n ${KUAIRAND_PURE_CSV:-} ]]; then
  for run in cuda:4096 cudagraphs:4096 cuda:256 cudagraphs:256 cpu:4096; do
    device=${run%%:*} size=${run##*:} graphs=()
    [[ $device == cudagraphs ]] && graphs=(--cuda-graphs)
    started=$(date +%s%N)
    "$py" -m consumers.cli evaluate --dataset csv --source "$KUAIRAND_PURE_CSV" --mapping mappings/kuairand_pure.toml \
      --configs crossdistil --seeds 1 --mode prequential --batch-size "$size" --threads 1 \
      --device "${device/cudagraphs/cuda}" "${graphs[@]}" \
      --out "$out/evaluate_${device}_$size" >"$out/evaluate_${device}_$size.log" 2>&1
    rc=$?
    evaluate_runs+=("$device:$size:$rc:$(( ($(date +%s%N) - started) / 1000000 ))")  # wall ms
  done
fi
if wanted train_step; then
  bench/gpu_train_step.sh --steps 10 >"$out/train_step.json" 2>"$out/train_step.err"
  step_rc=$?
fi

"$py" - "$out" "$pytest_rc" "$step_rc" "$cuda_rc" "$cpu_rc" "$inproc_rc" "$sep_rc" "$plain_rc" "$graphs_rc" \
  "${evaluate_runs[*]:-}" <<'EOF'
import json, sys
from pathlib import Path

import torch

out = Path(sys.argv[1])
pytest_rc, step_rc, cuda_rc, cpu_rc, inproc_rc, sep_rc, plain_rc, graphs_rc = map(int, sys.argv[2:10])
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
evaluations = {}
for run in sys.argv[10].split():
    device, size, rc, wall = run.split(":")
    try:
        grid = json.loads((out / f"evaluate_{device}_{size}" / "results.json").read_text())
        (one,) = grid["runs"]
        evaluations[f"{device}_batch_{size}"] = {  # seconds: the run's steps; wall_s: the command, start to end
            "rc": int(rc), "seconds": round(one["seconds"], 2), "wall_s": round(int(wall) / 1000, 2),
            "events": one["train_events"],
            "tail_auc": {task: round(m["auc"], 4) for task, m in one["metrics"]["tail"].items()}}
    except (OSError, KeyError, ValueError) as error:
        evaluations[f"{device}_batch_{size}"] = {"rc": int(rc), "error": repr(error)}
if evaluations:
    result["evaluate_kuairand_pure"] = evaluations
if sep_rc != -1:
    result["backtest_learner_process_on_cuda"] = compare((("separate", sep_rc), ("inproc", inproc_rc)),
                                                         "separate", "inproc")
if graphs_rc != -1:
    result["backtest_cuda_graphs"] = compare((("graphs", graphs_rc), ("plain", plain_rc)), "graphs", "plain")
text = json.dumps(result, indent=1)
(out / "gpu_checks.json").write_text(text + "\n")
print(text)
EOF
