#!/usr/bin/env bash
# The device tool's machine (one H200, 16 cores, Python 3.12 with torch; nothing can be fetched there) in two steps:
#
#   bash bench/device.sh prepare               # here, once: .device/ with what the machine lacks (git ignores it)
#   bash bench/device.sh gpu OUT_DIR           # there: issue 17's GPU checks (bench/gpu_checks.sh), ~6 min
#   bash bench/device.sh many-cores OUT_DIR    # there: issues 22 and 16 (bench/many_cores.sh)
#
# The `run` call carries `.device` and its command is the second line with OUT_DIR under $OUT, e.g.
# `bash bench/device.sh gpu $OUT/gpu` with timeout_s ~540 (docs/performance.md, "Running the GPU checks ...").
# prepare: the wheels of the product's dependencies that the machine's image lacks (the device library's KINDS.md
# lists what it has: pytest, pytest-xdist, hypothesis, onnxruntime, pyarrow, scipy, anyio, click, h11, ... are there),
# for CPython 3.12 on manylinux, and KuaiRand-Pure gzipped (9 MB: the CSV itself, 49 MB, would not fit the 64 MiB a
# call carries); a transient copy for the call, the data stays in ../shared.
set -uo pipefail
cd "$(dirname "$0")/.."
usage="usage: bench/device.sh prepare | gpu OUT_DIR | many-cores OUT_DIR"
mode=${1:?$usage}
WHEELS=(kafka-python river orjson uvicorn httptools starlette)
csv=../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv

case $mode in
prepare)
  set -e
  exclude=$(git rev-parse --git-path info/exclude)  # a worktree's too
  mkdir -p "$(dirname "$exclude")"
  grep -qx '/.device/' "$exclude" 2>/dev/null || echo /.device/ >> "$exclude"
  mkdir -p .device/whl
  gzip -c "$csv" > .device/kuairand_pure.csv.gz
  "${PYTHON:-python3}" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any -d .device/whl "${WHEELS[@]}"
  du -sh .device
  ;;
gpu | many-cores)
  out=${2:?$usage}
  [[ -f .device/kuairand_pure.csv.gz ]] || { echo "device.sh: no .device/ here: run 'bash bench/device.sh prepare' where pip works, and carry .device" >&2; exit 2; }
  mkdir -p "$out"
  # the wheels into a folder of their own, as the device library's README advises (the image's environment stays as
  # it is); DEVICE_SKIP_INSTALL=1 (with PYTHON=.venv/bin/python) tries this script where they are all installed
  if [[ ${DEVICE_SKIP_INSTALL:-0} != 1 ]]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
      .device/whl/*.whl || exit 3
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  data=${TMPDIR:-/tmp}/kuairand_pure.csv
  gunzip -c .device/kuairand_pure.csv.gz > "$data" || exit 4
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
  export PYTHONUNBUFFERED=1
  if [[ $mode == gpu ]]; then
    # the CUDA-only unit tests (steps under sync_debug_mode("error"), CUDA-graph replays), the step benchmark
    # (fp32 and bf16, plain and replayed), evaluate over all of KuaiRand-Pure on cuda and cpu, and the trainer's
    # code path (a dense backtest of its event log) on cuda plain and with model.cuda_graphs
    log=${TMPDIR:-/tmp}/kuairand_pure.log
    "${PYTHON:-python3}" -m consumers.cli stream --dataset csv --source "$data" --mapping mappings/kuairand_pure.toml \
      --to "file://$log" > "$out/stream.log" 2>&1 || log=/dev/null
    KUAIRAND_PURE_CSV=$data GPU_CHECKS=${GPU_CHECKS:-tests,train_step,evaluate,graphs} \
      PYTEST_K=${PYTEST_K:-gpu or cuda or graphs} bash bench/gpu_checks.sh "$log" "$out"
  else
    bash bench/many_cores.sh "$data" "$out"
  fi
  ;;
*)
  echo "$usage" >&2
  exit 2
  ;;
esac
