"""One code path: for the same events, the backtest's prequential predictions equal the live trainer's.

The live trainer (a subprocess, as a user runs it) consumes a KuaiRand subset from a real broker and writes a
trained-sample ledger (per impression: labels and the prediction made before the update, 6 decimals). The
backtest replays the same events from an event log, and from the Kafka topics by offsets, on event time.

What could differ, and how the test pins it:
* batch boundaries: live, a partial batch is cut after ``max_batch_delay_s`` of *wall* time; the test sets it
  far beyond the run, so both cut batches by size only, and the end of the stream flushes the rest;
* the join's emission order: both emit closed impressions in ``(ts_ms, impression_id)`` order; a partition
  going idle on the wall clock could let the watermark skip it and make its feedback late, so
  ``idle_timeout_s = 0`` (never idle); windows cover every real delay of the data;
* arithmetic: one torch thread on both sides, same seed, same batches -> bit-identical steps.
The ledger keeps 6 decimals, so per-impression equality is asserted on that rendering (the tightest bound
the live side records), and the order, ids and labels must be equal exactly.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from consumers.ledger import read_ledger
from consumers.local_kafka import ensure_topics

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LIMIT = 3000  # impressions of KuaiRand, in event-time order
TASKS = ("click", "long_view")


@pytest.fixture(scope="module")
def streamed(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same KuaiRand subset in two 2-partition topics and in an event log."""
    from streamer.stream import stream_dataset

    source = REPO.parent / "shared" / "data" / "kuairand"
    if not source.is_dir():
        pytest.skip(f"real data not available: {source} does not exist (it lives outside the repository)")
    tag = uuid.uuid4().hex[:6]
    topics = {"impressions": f"bt-imp-{tag}", "feedback": f"bt-fb-{tag}", "dead_letters": f"bt-dl-{tag}", "model": f"bt-model-{tag}"}
    ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    directory = tmp_path_factory.mktemp("backtest-live")
    log = directory / "kuairand.evlog"
    for to in (f"kafka://{kafka_broker}", f"file://{log}"):
        stream_dataset("kuairand", str(source), to, limit=LIMIT,
                       impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
    config = directory / "trainer.toml"
    config.write_text(f"""
[kafka]
bootstrap = "{kafka_broker}"
group_id = "bt-{tag}"
impressions_topic = "{topics['impressions']}"
feedback_topic = "{topics['feedback']}"
dead_letter_topic = "{topics['dead_letters']}"
model_topic = "{topics['model']}"
client_options = {{session_timeout_ms = 6000, heartbeat_interval_ms = 1000}}

[join]
attribution_window_s = {{click = 30, long_view = 700}}
idle_timeout_s = 0.0

[batching]
batch_size = 128
max_batch_delay_s = 1000000000.0

[model]
tasks = ["click", "long_view"]
device = "cpu"
options = {{embedding_dim = 8, hidden_dims = [32], tower_dims = [16], features = {{categorical = ['user_id', 'item_id', 'hour'], numeric = ['duration_ms'], hash_buckets = 65536}}}}

[checkpoint]
dir = "{directory / 'checkpoints'}"
every_steps = 0
every_s = 0.0

[publish]
enabled = false

[metrics]
port = 0
windows = [500, 1000]
""")
    ledger = directory / "ledger"
    with open(directory / "trainer.log", "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger),
             "--exit-when-idle", "3", "--torch-threads", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=240)
    assert done.returncode == 0, (directory / "trainer.log").read_text()[-3000:]
    return {"log": log, "config": config, "rows": read_ledger(ledger), "bootstrap": kafka_broker, "topics": topics}


def backtest_rows(records, config: Path) -> list[dict]:
    from consumers.backtest import build_configs, run_backtest

    import torch

    torch.set_num_threads(1)
    run = run_backtest(records, build_configs([str(config)], None, []), sample_every=1000).runs["trainer"]
    rows = [{"impression_id": i} for i in run.impression_ids]
    for task in TASKS:
        labels, scores = run.arrays(task)
        for row, y, p in zip(rows, labels, scores):
            row[f"label/{task}"] = int(y)
            row[f"pred/{task}"] = float(f"{float(p):.6f}")  # the ledger's rendering
    return rows


def test_live_trainer_trained_every_impression_once(streamed: dict) -> None:
    ids = [r["impression_id"] for r in streamed["rows"]]
    assert len(ids) == LIMIT and len(set(ids)) == LIMIT


def test_backtest_of_the_event_log_predicts_exactly_what_the_live_trainer_predicted(streamed: dict) -> None:
    from consumers.backtest import log_records

    records, _ = log_records(f"file://{streamed['log']}")
    replayed = backtest_rows(records, streamed["config"])
    assert [r["impression_id"] for r in replayed] == [r["impression_id"] for r in streamed["rows"]]
    assert replayed == streamed["rows"]


def test_backtest_of_the_kafka_offset_range_predicts_exactly_what_the_live_trainer_predicted(streamed: dict) -> None:
    from consumers.backtest import kafka_records

    topics = streamed["topics"]
    records, desc = kafka_records(streamed["bootstrap"], [topics["impressions"], topics["feedback"]], from_offset=0)
    assert desc["records"] > LIMIT
    assert backtest_rows(records, streamed["config"]) == streamed["rows"]
