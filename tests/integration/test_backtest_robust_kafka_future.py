"""``join.max_future_s`` in a backtest of a real Kafka range matches the live trainer.

A producer whose clock runs ahead writes some events stamped two hours after the records that carry them (their
CreateTime is the real time of sending). The live trainer reads them within a minute and dead-letters them
(``future``: more than ``join.max_future_s``, one hour, after its wall clock); the backtest of the Kafka range
dead-letters the same events against each record's Kafka timestamp, so it trains exactly the impressions the live
trainer trained, with the same labels and predictions, and counts the same dead letters. The event log of the
same events, which stores no arrival time, takes them all (docs/backtest.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
import zlib
from collections import Counter
from pathlib import Path

import pytest

from consumers.state.ledger import read_ledger
from streamer.topics import ensure_topics
from tests.topic_reader import read_topic
from tests.trainer_config import write_trainer_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
HOUR_MS = 3_600_000
SETTINGS = {
    "join.attribution_window_s": {"click": 60, "like": 120},
    "join.idle_timeout_s": 0.0,  # never idle: the watermark waits for every partition, as the backtest's merge does
    "batching.batch_size": 64,
    "batching.max_batch_delay_s": 1e9,  # batches cut by size only, live as in the backtest
    "model.tasks": ["click", "like"],
    "model.options": {"embedding_dim": 4, "hidden_dims": [16], "tower_dims": [8],
                      "features": {"categorical": ["user_id", "item_id", "item_category"], "numeric": ["duration_s"],
                                   "hash_buckets": 4096}},
    "metrics.windows": [200, 400],
    "checkpoint.every_steps": 0,
    "checkpoint.every_s": 0.0,
    "publish.enabled": False,
}


@pytest.fixture(scope="module")
def produced(kafka_broker: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A synthetic stream, moved to end half an hour ago, in two 2-partition topics (a user's events on one
    partition) and in an event log; every 41st impression has a twin stamped two hours after now."""
    from kafka import KafkaProducer

    from streamer.eventlog import EventLogWriter, read_event_log
    from streamer.events import encode
    from streamer.stream import stream_dataset

    directory = tmp_path_factory.mktemp("future")
    source = directory / "synthetic.evlog"
    stream_dataset("synthetic", None, f"file://{source}", options={
        "n_events": 800, "tasks": "click,like", "n_users": 40, "n_items": 150, "seed": 7,
        "delay_median_s": "2,20", "max_delay_s": 100})
    records = list(read_event_log(source))
    now = int(time.time() * 1000)
    shift = now - HOUR_MS // 2 - records[-1].event["ts_ms"]
    stream, ahead = [], []
    for n, record in enumerate(records):
        event = {**record.event, "ts_ms": record.event["ts_ms"] + shift}
        stream.append((record.topic, record.key, event))
        if record.topic == "impressions" and n % 41 == 0:
            twin = {**event, "impression_id": f"ahead-{event['impression_id']}", "ts_ms": now + 2 * HOUR_MS}
            stream.append((record.topic, record.key, twin))
            ahead.append(twin["impression_id"])
    tag = uuid.uuid4().hex[:6]
    topics = {"impressions": f"fut-imp-{tag}", "feedback": f"fut-fb-{tag}", "dead_letters": f"fut-dl-{tag}",
              "model": f"fut-model-{tag}"}
    ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all", linger_ms=5)
    try:  # no timestamp given: each record's CreateTime is the time it is sent
        for topic, key, event in stream:
            producer.send(topics[topic], value=encode(event), key=key.encode(),
                          partition=zlib.crc32(key.encode()) % 2)
        producer.flush(timeout=60)
    finally:
        producer.close()
    log = directory / "same.evlog"
    with EventLogWriter(log) as writer:
        for topic, key, event in stream:
            writer.write(topics[topic], key, event)
    config = write_trainer_config(directory / "trainer.toml", kafka_broker, topics,
                                  {**SETTINGS, "checkpoint.dir": str(directory / "checkpoints")})
    return {"bootstrap": kafka_broker, "topics": topics, "config": config, "log": log, "ahead": ahead,
            "directory": directory, "impressions": sum(1 for t, _, _ in stream if t == "impressions")}


def backtest_cli(*argv: str) -> int:
    import argparse

    from consumers.tools import backtest

    parser = argparse.ArgumentParser()
    backtest.add_arguments(parser)
    return backtest.run(parser.parse_args(list(argv)))


def backtest_rows(result) -> list[dict]:
    """A backtest's trained samples as the live trainer's ledger renders them (6 decimals)."""
    run_ = result.runs["trainer"]
    rows = [{"impression_id": i} for i in run_.impression_ids]
    for task in ("click", "like"):
        labels, scores = run_.arrays(task)
        for row, y, p in zip(rows, labels, scores):
            row[f"label/{task}"] = int(y)
            row[f"pred/{task}"] = float(f"{float(p):.6f}")
    return rows


def test_the_backtest_of_the_kafka_range_dead_letters_what_the_live_trainer_did(produced: dict) -> None:
    import torch

    from consumers.tools.backtest import build_configs, kafka_records, run_backtest

    topics = produced["topics"]
    ledger = produced["directory"] / "ledger"
    with open(produced["directory"] / "trainer.log", "wb") as out:
        done = subprocess.run(
            [sys.executable, "-m", "consumers.cli", "train", "--config", str(produced["config"]), "--ledger",
             str(ledger), "--exit-when-idle", "3", "--torch-threads", "1"],
            cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=240)
    assert done.returncode == 0, (produced["directory"] / "trainer.log").read_text()[-3000:]
    live = read_ledger(ledger)
    live_dead = Counter(dict(r.headers)["dl.reason"].decode() for r in read_topic(produced["bootstrap"],
                                                                                  topics["dead_letters"]))
    assert live_dead == {"future": len(produced["ahead"])} and len(produced["ahead"]) >= 5
    assert len(live) == produced["impressions"] - len(produced["ahead"])

    torch.set_num_threads(1)
    records, _ = kafka_records(produced["bootstrap"], [topics["impressions"], topics["feedback"]])
    result = run_backtest(records, build_configs([str(produced["config"])], None, []), sample_every=1000)
    assert backtest_rows(result) == live  # the same impressions, labels and predictions
    stream = result.runs["trainer"].pipeline.metrics.dead_letters_total.collect()[0].samples
    assert {s.labels["reason"]: int(s.value) for s in stream if s.name.endswith("_total")} == live_dead


def test_the_command_reports_the_future_dead_letters_and_the_log_backtest_takes_them(produced: dict,
                                                                                      tmp_path: Path) -> None:
    common = ("--config", str(produced["config"]), "--quiet", "--no-plots", "--batching", "dense")
    assert backtest_cli("--kafka", produced["bootstrap"], *common, "--out", str(tmp_path / "kafka")) == 0
    kafka = json.loads((tmp_path / "kafka" / "summary.json").read_text())
    trainer = kafka["configurations"]["trainer"]
    assert trainer["dead_letters_by_reason"] == {"future": len(produced["ahead"])}
    assert trainer["trained_samples"] == produced["impressions"] - len(produced["ahead"])
    assert "(future" in kafka["dead_letter_examples"][0]
    assert "after its Kafka record's timestamp is a dead letter" in (tmp_path / "kafka" / "report.md").read_text()
    # the event log of the same events stores no arrival time: its backtest applies no bound and trains them all
    assert backtest_cli("--log", f"file://{produced['log']}", *common, "--out", str(tmp_path / "log")) == 0
    logged = json.loads((tmp_path / "log" / "summary.json").read_text())["configurations"]["trainer"]
    assert logged["dead_letters_by_reason"] == {} and logged["trained_samples"] == produced["impressions"]
    # join.max_future_s = 0: no bound, as in the trainer
    assert backtest_cli("--kafka", produced["bootstrap"], *common, "--set", "join.max_future_s=0",
                        "--out", str(tmp_path / "unbounded")) == 0
    unbounded = json.loads((tmp_path / "unbounded" / "summary.json").read_text())["configurations"]["trainer"]
    assert unbounded["dead_letters_by_reason"] == {} and unbounded["trained_samples"] == produced["impressions"]


def test_one_backtest_of_the_kafka_range_bounds_each_configuration_by_its_own_max_future(produced: dict,
                                                                                          tmp_path: Path) -> None:
    """Two configurations of one command, bounded (one hour) and unbounded (0): each gets the range merged with its
    own bound (the merge once per distinct ``join.max_future_s``), so each trains the labels and predictions a
    backtest of it alone gives, whichever comes first. The unbounded merge lets the events stamped ahead move its
    clock (their partition's windows close early): with one merge for both (the first's bound) the second's labels
    differ from its own backtest's (checked by mutation: 799 of 820 impressions then trained past the watermark)."""
    unbounded = tmp_path / "unbounded.toml"
    unbounded.write_text(produced["config"].read_text().replace("max_future_s = 3600.0", "max_future_s = 0.0"))
    assert "max_future_s = 0.0" in unbounded.read_text()  # the file says the bound: the replacement took
    common = ("--quiet", "--no-plots", "--batching", "dense")

    def configurations(name: str, *paths: Path) -> dict:
        files = [arg for path in paths for arg in ("--config", str(path))]
        assert backtest_cli("--kafka", produced["bootstrap"], *files, *common, "--out", str(tmp_path / name)) == 0
        return json.loads((tmp_path / name / "summary.json").read_text())["configurations"]

    def learnt(run_: dict) -> dict:  # what the replay trained, not how long it took
        return {key: run_[key] for key in ("trained_samples", "dead_letters_by_reason", "prequential_auc", "join",
                                           "steps")}

    alone = {"trainer": configurations("bounded", produced["config"])["trainer"],
             "unbounded": configurations("unbounded", unbounded)["unbounded"]}
    assert alone["trainer"]["dead_letters_by_reason"] == {"future": len(produced["ahead"])}
    assert alone["unbounded"]["dead_letters_by_reason"] == {}
    for order in ((produced["config"], unbounded), (unbounded, produced["config"])):
        together = configurations(f"{order[0].stem}-first", *order)
        for name in ("trainer", "unbounded"):
            assert learnt(together[name]) == learnt(alone[name]), (order[0].stem, name)
