"""A producer that is not kafka-python: confluent-kafka (librdkafka), as most production services write.

The event contract from the whole KuaiRand file (41,828 impressions), written by confluent-kafka into five
partitions, one per compression codec (none, gzip, snappy, lz4, zstd), with record headers on every impression,
plus a tombstone and an undecodable keyless record. The trainer (a subprocess, as a user runs it; its own
producer compresses the publication with lz4) must train every impression once with exact labels, whatever
the codec of its partition, send the two bad records to the dead-letter topic, and publish a model that
serving's loader verifies and scores with (issue 15).
"""

from __future__ import annotations

import uuid
import zlib
from collections import Counter
from pathlib import Path

import msgpack
import pytest

from consumers.state.ledger import read_ledger
from streamer.topics import ensure_topics
from tests.integration.test_trainer_kafka import IMPRESSIONS, POSITIVES, TASKS, run_trainer, write_config
from tests.topic_reader import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CODECS = ("none", "gzip", "snappy", "lz4", "zstd")  # partition p of both topics is written with CODECS[p]


def kuairand_events() -> list:
    """Every KuaiRand impression and its feedback as routed events (key = the user id), in stream order."""
    from streamer.datasets import open_dataset
    from streamer.stream import merge_events

    source = REPO.parent / "shared" / "data" / "kuairand"
    if not source.is_dir():
        pytest.skip(f"real data not available: {source} does not exist (it lives outside the repository)")
    return list(merge_events(open_dataset("kuairand", source).interactions()))


def partition_of(user: str) -> int:
    return zlib.crc32(user.encode()) % len(CODECS)


def test_a_confluent_kafka_producer_with_every_codec_trains_exactly_and_dead_letters_bad_records(
        kafka_broker: str, tmp_path: Path) -> None:
    from confluent_kafka import Producer

    tag = "foreign-" + uuid.uuid4().hex[:6]
    topics = {"impressions": f"imp-{tag}", "feedback": f"fb-{tag}", "dead_letters": f"dl-{tag}",
              "model": f"model-{tag}"}
    ensure_topics(kafka_broker, len(CODECS), impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=topics["model"])
    routed = kuairand_events()
    producers = [Producer({"bootstrap.servers": kafka_broker, "compression.type": codec, "linger.ms": 20})
                 for codec in CODECS]
    written = Counter()
    for event in routed:
        p = partition_of(event.key)
        headers = None
        if event.topic == "impressions":
            headers = [("source", b"confluent-kafka"), ("codec", CODECS[p].encode())]
        producers[p].produce(topics[event.topic], key=event.key.encode(), value=msgpack.packb(event.event),
                             partition=p, headers=headers)
        producers[p].poll(0)
        written[p] += event.topic == "impressions"
    producers[4].produce(topics["impressions"], key=b"u-tombstone", value=None, partition=4)  # a tombstone
    producers[3].produce(topics["feedback"], value=b"\xc1 not msgpack", partition=3)  # keyless, undecodable
    for producer in producers:
        assert producer.flush(60) == 0, "confluent-kafka did not deliver every message"
    assert all(written[p] > 1000 for p in range(len(CODECS))), written

    config = write_config(tmp_path / "trainer.toml", kafka_broker, topics)
    text = config.read_text()  # the trainer's own producer compresses its publications and dead letters with lz4
    assert "client_options = {" in text
    config.write_text(text.replace("client_options = {", 'client_options = {compression_type = "lz4", ', 1))
    ledger = tmp_path / "ledger"
    run_trainer(config, ledger)

    rows = read_ledger(ledger)
    counts = Counter(r["impression_id"] for r in rows)
    assert len(counts) == IMPRESSIONS and max(counts.values()) == 1, "every impression trained exactly once"
    for task in TASKS:
        assert sum(int(r[f"label/{task}"]) for r in rows) == POSITIVES[task], task
    users = {e.event["impression_id"]: e.key for e in routed if e.topic == "impressions"}
    per_codec = Counter(CODECS[partition_of(users[i])] for i in counts)
    assert per_codec == {CODECS[p]: n for p, n in written.items()}, per_codec

    dead = read_topic(kafka_broker, topics["dead_letters"])
    assert len(dead) == 2, [m.headers for m in dead]
    assert_serving_loads_the_compressed_publication(kafka_broker, topics["model"])


def assert_serving_loads_the_compressed_publication(bootstrap: str, topic: str) -> None:
    """The serving topic, written with lz4 by the trainer, read back and loaded by serving's own loader."""
    from consumers.serving.follower import load_checkpoint
    from consumers.state.wire import Reassembler

    messages = [(m.key, m.value) for m in read_topic(bootstrap, topic, max_partition_fetch_bytes=32 << 20)]
    checkpoints = list(Reassembler().checkpoints(messages))
    assert checkpoints, "no verified publication on the serving topic"
    served = load_checkpoint(checkpoints[-1])
    scores = served.model.score_rows([{"user_id": "u1", "item_id": "i1", "features": {}}])
    assert set(scores) == set(TASKS)
