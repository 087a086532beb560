"""A producer that is not kafka-python: confluent-kafka (librdkafka), as most production services write.

The event contract from the KuaiRand file, written by confluent-kafka with the codecs production producers use
(impressions zstd, feedback lz4), record headers on every impression, plus a tombstone and an undecodable
keyless record. The trainer (a subprocess, as a user runs it) must train every impression once with exact
labels and send the two bad records to the dead-letter topic (issue 15).
"""

from __future__ import annotations

import uuid
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from consumers.state.ledger import read_ledger
from tests.integration.test_trainer_kafka import TASKS, make_topics, run_trainer, write_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LIMIT = 3000


def kuairand_events(limit: int) -> tuple[list, dict[str, int]]:
    """The first ``limit`` KuaiRand impressions and their feedback as routed events, and the positives per task."""
    from streamer.datasets import open_dataset
    from streamer.stream import merge_events

    source = REPO.parent / "shared" / "data" / "kuairand"
    if not source.is_dir():
        pytest.skip(f"real data not available: {source} does not exist (it lives outside the repository)")
    routed = list(merge_events(open_dataset("kuairand", source).interactions(), limit=limit))
    positives = Counter(e.event["task"] for e in routed if e.topic == "feedback")
    return routed, dict(positives)


def test_a_confluent_kafka_producer_with_zstd_and_lz4_trains_exactly_and_dead_letters_bad_records(
        kafka_broker: str, tmp_path: Path) -> None:
    from confluent_kafka import Producer
    from kafka import KafkaConsumer

    topics = make_topics(kafka_broker, "foreign-" + uuid.uuid4().hex[:6])
    routed, positives = kuairand_events(LIMIT)
    producers = {"impressions": Producer({"bootstrap.servers": kafka_broker, "compression.type": "zstd",
                                          "linger.ms": 20}),
                 "feedback": Producer({"bootstrap.servers": kafka_broker, "compression.type": "lz4",
                                       "linger.ms": 20})}
    for event in routed:
        headers = [("source", b"confluent-kafka"), ("schema", b"v1")] if event.topic == "impressions" else None
        producers[event.topic].produce(topics[event.topic], key=event.key.encode(),
                                       value=msgpack.packb(event.event), headers=headers)
        producers[event.topic].poll(0)
    producers["impressions"].produce(topics["impressions"], key=b"u-tombstone", value=None)  # a tombstone
    producers["feedback"].produce(topics["feedback"], value=b"\xc1 not msgpack")  # keyless, undecodable
    for producer in producers.values():
        assert producer.flush(30) == 0, "confluent-kafka did not deliver every message"

    config = write_config(tmp_path / "trainer.toml", kafka_broker, topics)
    ledger = tmp_path / "ledger"
    run_trainer(config, ledger)

    rows = read_ledger(ledger)
    counts = Counter(r["impression_id"] for r in rows)
    assert len(counts) == LIMIT and max(counts.values()) == 1, "every impression trained exactly once"
    for task in TASKS:
        assert sum(int(r[f"label/{task}"]) for r in rows) == positives.get(task, 0), task
    consumer = KafkaConsumer(topics["dead_letters"], bootstrap_servers=kafka_broker, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000, group_id=None)
    dead = list(consumer)
    consumer.close()
    assert len(dead) == 2, [m.headers for m in dead]
