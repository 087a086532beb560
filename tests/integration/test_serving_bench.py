"""bench/serving_pickup.py and bench/serving_load.py still run and keep their JSON shape (tiny model, few requests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def run_bench(script: str, *args: str, tmp: Path) -> dict:
    """The JSON report of ``bench/SCRIPT ARGS...``. Its work folder (the servers' configurations and logs, which the
    script keeps for a reader) is made in ``tmp``."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=REPO, capture_output=True,
                            text=True, timeout=600, env={**os.environ, "TMPDIR": str(tmp)})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_pickup_bench_reports_median_and_p99_of_each_switch(kafka_broker: str, tmp_path: Path) -> None:
    report = run_bench("serving_pickup.py", "--bootstrap", kafka_broker, "--checkpoints", "3", "--hash-buckets", "4096",
                       tmp=tmp_path)
    pickup = report["pickup_seconds"]
    assert report["checkpoints"] == 3 and report["chunks"] >= 1
    assert 0 <= pickup["min"] <= pickup["median"] <= pickup["p99"] <= pickup["max"] < 30
    assert isinstance(report["meets_target"], bool)


def test_load_bench_reports_throughput_latency_percentiles_and_a_breakdown(kafka_broker: str, tmp_path: Path) -> None:
    report = run_bench("serving_load.py", "--bootstrap", kafka_broker, "--requests", "10", "--warmup", "2",
                       "--hash-buckets", "4096", "--breakdown-repeats", "2", tmp=tmp_path)
    assert report["clients"] == 4 and report["items_per_request"] == 100
    assert report["requests"] == 40 and report["errors"] == 0
    latency = report["latency_ms"]
    assert 0 < latency["p50"] <= latency["p90"] <= latency["p99"] <= latency["max"]
    assert report["throughput"]["items_per_s"] == pytest.approx(report["throughput"]["requests_per_s"] * 100, rel=0.01)
    assert set(report["breakdown_ms"]) == {"json_loads", "validate", "encode", "forward", "json_response"}
