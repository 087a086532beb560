#!/usr/bin/env bash
# The CPU checks that need more than two free cores, in one run (the device tool's machine has 16): prints one JSON
# object and leaves the benches' own JSON and logs in OUT_DIR.
#
#   bench/many_cores.sh KUAIRAND_PURE_CSV OUT_DIR
#
# KUAIRAND_PURE_CSV is ../shared/data/kuairand_pure/kuairand_pure_20220425_20220508.csv (49 MB: on the device machine,
# carry it through a link in an ignored folder of the checkout). Its event log is written to $TMPDIR first.
# 1. issue 22: a dense backtest's samples/s next to `evaluate`'s prequential pass (bench/backtest_throughput.py,
#    SPEED_ROUNDS rounds, default 2; variants evaluate, backtest_one, backtest_two, evaluate_pair). On a 2-vCPU
#    machine the two busy processes of a cold replay slow each other; here each has a core of its own.
# 2. issue 16: N trainer ranks against one (bench/scaling.py --parts compute, SCALING_RANKS default 1,2,4,8,
#    SCALING_MODES default sync, SCALING_SEEDS default 1: the quality side was shown on two cores already).
# MANY_CORES_CHECKS=speed,scaling (the default: both) picks sections.
set -uo pipefail
cd "$(dirname "$0")/.."
csv=${1:?usage: bench/many_cores.sh KUAIRAND_PURE_CSV OUT_DIR}
out=${2:?usage: bench/many_cores.sh KUAIRAND_PURE_CSV OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
checks=",${MANY_CORES_CHECKS:-speed,scaling},"
wanted() { [[ $checks == *",$1,"* ]]; }
log="${TMPDIR:-/tmp}/kuairand_pure.$$.evlog"
trap 'rm -f "$log"' EXIT

started=$(date +%s)
"$py" -m consumers.cli stream --dataset csv --source "$csv" --mapping mappings/kuairand_pure.toml \
  --to "file://$log" >"$out/stream.log" 2>&1
stream_rc=$? speed_rc=-1 scaling_rc=-1
stream_s=$(( $(date +%s) - started ))
if [[ $stream_rc == 0 ]] && wanted speed; then
  "$py" bench/backtest_throughput.py --impressions 0 --source "$csv" --log "$log" --rounds "${SPEED_ROUNDS:-2}" \
    --variants evaluate,backtest_one,backtest_two,evaluate_pair >"$out/backtest_throughput.json" \
    2>"$out/backtest_throughput.err"
  speed_rc=$?
fi
if [[ $stream_rc == 0 ]] && wanted scaling; then
  "$py" bench/scaling.py --log "file://$log" --parts compute --ranks "${SCALING_RANKS:-1,2,4,8}" \
    --modes "${SCALING_MODES:-sync}" --seeds "${SCALING_SEEDS:-1}" --out "$out/scaling.json" \
    >"$out/scaling.stdout" 2>"$out/scaling.err"
  scaling_rc=$?
fi

"$py" - "$out" "$stream_rc" "$stream_s" "$speed_rc" "$scaling_rc" <<'PY'
import json, os, platform, sys
from pathlib import Path

out = Path(sys.argv[1])
stream_rc, stream_s, speed_rc, scaling_rc = map(int, sys.argv[2:6])
result = {"machine": platform.machine(), "cpu_cores": os.cpu_count(), "stream": {"rc": stream_rc, "seconds": stream_s}}
if speed_rc != -1:
    try:
        speed = json.loads((out / "backtest_throughput.json").read_text())
        result["backtest_speed"] = {"rc": speed_rc, "ratios": speed["ratios"],
                                    "rounds_seconds": {v: r["rounds_seconds"] for v, r in speed["variants"].items()}}
    except (OSError, KeyError, ValueError) as error:
        result["backtest_speed"] = {"rc": speed_rc, "error": repr(error)}
if scaling_rc != -1:
    try:
        result["scaling"] = {"rc": scaling_rc, **json.loads((out / "scaling.json").read_text())}
    except (OSError, ValueError) as error:
        result["scaling"] = {"rc": scaling_rc, "error": repr(error)}
text = json.dumps(result, indent=1)
(out / "many_cores.json").write_text(text + "\n")
print(text)
PY
