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

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from consumers.state.ledger import read_ledger
from streamer.topics import ensure_topics
from tests.trainer_config import write_trainer_config

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
    topics = {"impressions": f"bt-imp-{tag}", "feedback": f"bt-fb-{tag}", "dead_letters": f"bt-dl-{tag}",
              "model": f"bt-model-{tag}"}
    ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    directory = tmp_path_factory.mktemp("backtest-live")
    log = directory / "kuairand.evlog"
    for to in (f"kafka://{kafka_broker}", f"file://{log}"):
        stream_dataset("kuairand", str(source), to, limit=LIMIT,
                       impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
    config = directory / "trainer.toml"
    write_trainer_config(config, kafka_broker, topics, {
        "join.attribution_window_s": {"click": 30, "long_view": 700},
        "join.idle_timeout_s": 0.0,
        "batching.batch_size": 128,
        "batching.max_batch_delay_s": 1e9,
        "model.tasks": list(TASKS),
        "model.options": {"embedding_dim": 8, "hidden_dims": [32], "tower_dims": [16],
                          "features": {"categorical": ["user_id", "item_id", "hour"], "numeric": ["duration_ms"],
                                       "hash_buckets": 65536}},
        "checkpoint.dir": str(directory / "checkpoints"),
        "checkpoint.every_steps": 0,
        "checkpoint.every_s": 0.0,
        "publish.enabled": False,
        "metrics.windows": [500, 1000],
    })
    ledger = directory / "ledger"
    with open(directory / "trainer.log", "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger),
             "--exit-when-idle", "3", "--torch-threads", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=240)
    assert done.returncode == 0, (directory / "trainer.log").read_text()[-3000:]
    return {"log": log, "config": config, "rows": read_ledger(ledger), "bootstrap": kafka_broker, "topics": topics}


def backtest_rows(records, config: Path) -> list[dict]:
    import torch

    from consumers.tools.backtest import build_configs, run_backtest

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
    from consumers.tools.backtest import log_records

    records, _ = log_records(f"file://{streamed['log']}")
    replayed = backtest_rows(records, streamed["config"])
    assert [r["impression_id"] for r in replayed] == [r["impression_id"] for r in streamed["rows"]]
    assert replayed == streamed["rows"]


def test_backtest_of_the_kafka_offset_range_predicts_exactly_what_the_live_trainer_predicted(streamed: dict) -> None:
    from consumers.tools.backtest import kafka_records

    topics = streamed["topics"]
    records, desc = kafka_records(streamed["bootstrap"], [topics["impressions"], topics["feedback"]], from_offset=0)
    assert desc["records"] > LIMIT
    assert backtest_rows(records, streamed["config"]) == streamed["rows"]


# ------------------------------------------------------------------------------ Kafka ranges by time and offset
#
# A small synthetic stream produced with record timestamps the test chooses, so it knows which records a range
# must select. Two topic pairs (2 partitions each, a user's events on one partition):
# * "event": record timestamp = the event's ts_ms shifted to two hours ago (recent, so retention keeps them;
#   ties and irregular gaps as in the data; non-decreasing per partition, checked);
# * "lockstep": record timestamp = BASE + offset * 1 s on every partition, so a time range and an offset range
#   can select exactly the same records.

RANGE_SETTINGS = {
    "join.attribution_window_s": {"click": 60, "like": 120},
    "batching.batch_size": 64,
    "batching.max_batch_delay_s": 30.0,
    "model.tasks": ["click", "like"],
    "model.options": {"embedding_dim": 4, "hidden_dims": [16], "tower_dims": [8],
                      "features": {"categorical": ["user_id", "item_id", "item_category"], "numeric": ["duration_s"],
                                   "hash_buckets": 4096}},
    "metrics.windows": [200, 400],
}


@dataclass(frozen=True)
class Produced:
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    event: dict


@pytest.fixture(scope="module")
def stamped(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The synthetic stream in an event log and in the two topic pairs; what was produced where, with which stamp."""
    import zlib

    from kafka import KafkaProducer

    from streamer.eventlog import read_event_log
    from streamer.events import encode
    from streamer.stream import stream_dataset

    directory = tmp_path_factory.mktemp("backtest-ranges")
    log = directory / "synthetic.evlog"
    stream_dataset("synthetic", None, f"file://{log}", options={
        "n_events": 600, "tasks": "click,like", "n_users": 60, "n_items": 200, "seed": 5,
        "delay_median_s": "2,20", "max_delay_s": 100})
    records = list(read_event_log(log))
    first_ts = records[0].event["ts_ms"]
    base = (int(time.time()) - 7200) * 1000
    tag = uuid.uuid4().hex[:6]
    pairs: dict[str, dict] = {}
    producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all", linger_ms=5)
    try:
        for pair in ("event", "lockstep"):
            topics = {"impressions": f"btr-{pair}-imp-{tag}", "feedback": f"btr-{pair}-fb-{tag}"}
            ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                          dead_letter_topic=f"btr-{pair}-dl-{tag}", model_topic=f"btr-{pair}-model-{tag}")
            next_offset: dict[tuple[str, int], int] = {}
            sent = []
            for record in records:
                topic = topics[record.topic]
                partition = zlib.crc32(record.key.encode()) % 2
                offset = next_offset.get((topic, partition), 0)
                next_offset[(topic, partition)] = offset + 1
                stamp = base + (record.event["ts_ms"] - first_ts if pair == "event" else offset * 1000)
                future = producer.send(topic, value=encode(record.event), key=record.key.encode(),
                                       partition=partition, timestamp_ms=stamp)
                sent.append((future, record.event, stamp))
            producer.flush(timeout=60)
            produced = []
            for future, event, stamp in sent:
                meta = future.get(timeout=60)
                assert meta.timestamp == stamp, "the broker must keep the producer's timestamps (CreateTime)"
                produced.append(Produced(meta.topic, meta.partition, meta.offset, stamp, event))
            for tp in {(p.topic, p.partition) for p in produced}:
                stamps = [p.timestamp_ms for p in sorted(produced, key=lambda p: p.offset)
                          if (p.topic, p.partition) == tp]
                assert stamps == sorted(stamps), f"{tp}: record timestamps must not decrease within a partition"
            config = directory / f"{pair}.toml"
            write_trainer_config(config, kafka_broker, topics, RANGE_SETTINGS)
            pairs[pair] = {"topics": [topics["impressions"], topics["feedback"]], "produced": produced,
                           "config": config}
    finally:
        producer.close()
    return {"bootstrap": kafka_broker, "log": log, "shift_ms": base - first_ts, "base_ms": base, **pairs}


def events_of(records) -> list[str]:
    """The replayed events as a sorted list of canonical texts (a multiset: which events, not their order)."""
    import msgpack

    return sorted(json.dumps(msgpack.unpackb(r.value, raw=False), sort_keys=True) for r in records)


def expected(produced: list[Produced], lo: int | None, hi: int | None) -> list[str]:
    return sorted(json.dumps(p.event, sort_keys=True) for p in produced
                  if (lo is None or p.timestamp_ms >= lo) and (hi is None or p.timestamp_ms < hi))


def stamps_at_quarters(produced: list[Produced]) -> tuple[int, int]:
    """Two record timestamps (each carried by at least one record) a quarter and half way through the stream."""
    stamps = sorted(p.timestamp_ms for p in produced)
    return stamps[len(stamps) // 4], stamps[len(stamps) // 2]


def cli(*argv: str) -> int:
    from consumers.tools import backtest

    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


def test_time_range_replays_exactly_the_records_stamped_in_from_inclusive_to_exclusive(stamped: dict) -> None:
    from consumers.tools.backtest import kafka_records

    produced = stamped["event"]["produced"]
    lo, hi = stamps_at_quarters(produced)
    records, desc = kafka_records(stamped["bootstrap"], stamped["event"]["topics"], from_ms=lo, to_ms=hi)
    want = expected(produced, lo, hi)
    assert any(p.timestamp_ms == lo for p in produced) and any(p.timestamp_ms == hi for p in produced)
    assert 0 < len(want) < len(produced)
    assert events_of(records) == want
    assert desc["records"] == len(want)  # the progress total, known from the offsets before reading


def test_from_time_alone_reads_to_the_end_and_to_time_alone_from_the_beginning(stamped: dict) -> None:
    from consumers.tools.backtest import kafka_records

    produced = stamped["event"]["produced"]
    lo, hi = stamps_at_quarters(produced)
    records, _ = kafka_records(stamped["bootstrap"], stamped["event"]["topics"], from_ms=lo)
    assert events_of(records) == expected(produced, lo, None)
    records, _ = kafka_records(stamped["bootstrap"], stamped["event"]["topics"], to_ms=hi)
    assert events_of(records) == expected(produced, None, hi)


def test_record_times_equal_to_event_times_select_what_the_event_log_time_filter_selects(stamped: dict) -> None:
    from consumers.tools.backtest import kafka_records, log_records

    lo, hi = stamps_at_quarters(stamped["event"]["produced"])
    from_kafka, _ = kafka_records(stamped["bootstrap"], stamped["event"]["topics"], from_ms=lo, to_ms=hi)
    shift = stamped["shift_ms"]
    from_log, _ = log_records(f"file://{stamped['log']}", from_ms=lo - shift, to_ms=hi - shift)
    assert events_of(from_kafka) == events_of(from_log)


def test_an_empty_time_range_is_an_error_that_says_so(stamped: dict, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    produced = stamped["event"]["produced"]
    lo, _ = stamps_at_quarters(produced)
    after_last = max(p.timestamp_ms for p in produced) + 1
    common = ("--kafka", stamped["bootstrap"], "--config", str(stamped["event"]["config"]), "--quiet", "--no-plots")
    assert cli(*common, "--from-time", str(lo), "--to-time", str(lo), "--out", str(tmp_path / "a")) == 2
    assert "is not before --to-time" in capsys.readouterr().err
    assert cli(*common, "--from-time", str(after_last), "--out", str(tmp_path / "b")) == 2
    assert "selects no records" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_time_range_and_the_offset_range_it_maps_to_give_identical_numbers(stamped: dict, tmp_path: Path) -> None:
    base, config = stamped["base_ms"], str(stamped["lockstep"]["config"])
    common = ("--kafka", stamped["bootstrap"], "--config", config, "--sample-every", "100", "--quiet", "--no-plots")
    # offset 40 carries BASE + 40 s; a from-time half a second earlier still maps to it (first record at or after)
    assert cli(*common, "--from-time", str(base + 40_000 - 500), "--to-time", str(base + 240_000),
               "--out", str(tmp_path / "by_time")) == 0
    assert cli(*common, "--from-offset", "40", "--to-offset", "240", "--out", str(tmp_path / "by_offset")) == 0
    by_time = json.loads((tmp_path / "by_time" / "summary.json").read_text())
    by_offset = json.loads((tmp_path / "by_offset" / "summary.json").read_text())
    assert by_time["input"]["ranges"] == by_offset["input"]["ranges"]
    sizes = {f"{p.topic}-{p.partition}" for p in stamped["lockstep"]["produced"] if p.offset >= 240}
    assert len(sizes) == 4, "every partition must reach past offset 240 for the ranges to be [40, 240)"
    assert by_time["input"]["ranges"] == {tp: [40, 240] for tp in sizes}
    assert by_time["records"] == by_offset["records"] > 0
    assert by_time["configurations"] == by_offset["configurations"]
    assert by_time["configurations"]["lockstep"]["trained_samples"] > 0
    assert ((tmp_path / "by_time" / "series_lockstep.csv").read_bytes()
            == (tmp_path / "by_offset" / "series_lockstep.csv").read_bytes())


def test_a_kafka_range_replays_bit_for_bit_whatever_the_read_ahead_and_holds_only_the_read_ahead(stamped: dict) -> None:
    import torch

    from consumers.tools.backtest import build_configs, kafka_records, run_backtest

    torch.set_num_threads(1)
    configs = lambda: build_configs([str(stamped["event"]["config"])], None, [])  # noqa: E731 - fresh models per run
    runs = []
    for read_ahead in (2000, 2000, 7):
        records, _ = kafka_records(stamped["bootstrap"], stamped["event"]["topics"], from_offset=0,
                                   read_ahead=read_ahead)
        runs.append(run_backtest(records, configs(), sample_every=100).runs["event"])
        if read_ahead == 7:
            assert 0 < records.peak_buffered <= 7 * 4  # 4 partitions, at most read_ahead each
    first = runs[0]
    assert first.pipeline.trained_samples == 600
    for other in runs[1:]:
        assert other.impression_ids == first.impression_ids
        assert other.series == first.series
        for task in ("click", "like"):
            assert ((other.arrays(task)[1] == first.arrays(task)[1]).all()
                    and (other.arrays(task)[0] == first.arrays(task)[0]).all())


def test_limit_replays_the_first_records_of_the_merged_range(stamped: dict) -> None:
    from consumers.tools.backtest import kafka_records

    everything, _ = kafka_records(stamped["bootstrap"], stamped["event"]["topics"])
    first, desc = kafka_records(stamped["bootstrap"], stamped["event"]["topics"], limit=50)
    assert desc["records"] == 50
    assert list(first) == list(everything)[:50]


def test_progress_bar_counts_kafka_records_against_the_total_from_offsets(stamped: dict, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture) -> None:
    produced = stamped["event"]["produced"]
    assert cli("--kafka", stamped["bootstrap"], "--config", str(stamped["event"]["config"]), "--from-offset", "0",
               "--no-plots", "--out", str(tmp_path)) == 0
    n = len(produced)
    assert f"{n}/{n} records" in capsys.readouterr().err
    assert json.loads((tmp_path / "summary.json").read_text())["records"] == n


# ------------------------------------------------------------------------------ live: train --from-time


def test_train_from_time_starts_a_new_trainer_at_the_first_record_stamped_at_or_after_it(stamped: dict,
                                                                                         tmp_path: Path) -> None:
    """`crossdistil train --from-time T` without a checkpoint trains exactly the impressions whose records are
    stamped at or after T (the same records a backtest --from-time T replays), and a restart without the flag
    resumes from its checkpoint instead of going back to the beginning."""
    pair = stamped["event"]
    produced, (_, half) = pair["produced"], stamps_at_quarters(stamped["event"]["produced"])
    imp_topic, fb_topic = pair["topics"]
    config = write_trainer_config(tmp_path / "trainer.toml", stamped["bootstrap"],
                                  {"impressions": imp_topic, "feedback": fb_topic, "dead_letters": f"{imp_topic}-dl"},
                                  {**RANGE_SETTINGS, "checkpoint.dir": str(tmp_path / "checkpoints"),
                                   "checkpoint.every_steps": 0, "checkpoint.every_s": 0.0, "publish.enabled": False})
    ledger = tmp_path / "ledger"

    def train(*extra: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--ledger", str(ledger),
             "--exit-when-idle", "3", "--torch-threads", "1", *extra],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=240)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        return done.stdout + done.stderr

    train("--from-time", str(half))
    trained = [row["impression_id"] for row in read_ledger(ledger)]
    wanted = sorted(p.event["impression_id"] for p in produced if p.topic == imp_topic and p.timestamp_ms >= half)
    assert 0 < len(wanted) < sum(1 for p in produced if p.topic == imp_topic)  # the time really cuts the stream
    assert sorted(trained) == wanted  # every impression at or after T once, none before it

    output = train()  # no flag: the checkpoint's positions (the --from-time start included) decide
    assert sorted(row["impression_id"] for row in read_ledger(ledger)) == wanted, output[-2000:]
