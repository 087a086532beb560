"""The trainer's Kafka topics made on purpose, on a real broker: a missing dead-letter topic is created at start with
the input topics' partition count and a retention of its own (never by the producer's first send, with the broker's
defaults), and ``--from-time`` applies to input topics made after the trainer started."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import ConfigResource, ConfigResourceType, NewTopic

from consumers.runtime.config import load_config
from consumers.runtime.processes import die_with_parent
from consumers.state.ledger import read_ledger
from consumers.trainer.dead_letters import TRUNCATED_BYTES, DeadLetterQueue
from consumers.trainer.exits import EXIT_CHECKPOINT_FAILED
from consumers.trainer.kafka_io import connect, new_producer
from streamer.events import EventError
from tests.trainer_config import write_trainer_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SETTINGS = {
    "join.attribution_window_s": {"click": 3, "like": 10},
    "batching.batch_size": 64,
    "batching.max_batch_delay_s": 1.0,
    "model.tasks": ["click", "like"],
    "model.options": {"embedding_dim": 4, "hidden_dims": [8], "tower_dims": [4],
                      "features": {"categorical": ["user_id", "item_id"], "hash_buckets": 1024}},
    "checkpoint.every_steps": 0,
    "checkpoint.every_s": 0.0,
    "publish.enabled": False,
}
SYNTHETIC = {"n_events": 400, "tasks": "click,like", "n_users": 40, "n_items": 100, "seed": 11, "max_delay_s": 5}


def _create(bootstrap: str, topics: list[str], partitions: int) -> None:
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, partitions, 1) for topic in topics])
        admin.wait_for_topics(topics, timeout_ms=30_000)
    finally:
        admin.close()


def _train(config: Path, *extra: str) -> subprocess.Popen:
    log = open(config.with_suffix(".log"), "wb")
    return subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--exit-when-idle", "3",
         "--torch-threads", "1", *extra], cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)


def _finished(trainer: subprocess.Popen, config: Path, timeout_s: float = 240, expected: int = 0) -> str:
    try:
        status = trainer.wait(timeout=timeout_s)
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
    output = config.with_suffix(".log").read_text(errors="replace")
    assert status == expected, output[-4000:]
    return output


def _records(bootstrap: str, topic: str) -> list:
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    try:
        consumer.assign([TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)])
        return list(consumer)
    finally:
        consumer.close()


def test_a_trainer_makes_its_missing_dead_letter_topic_as_its_input_topics_and_a_bad_event_lands_there(
        kafka_broker: str, unique_topic: Callable[[str], str], tmp_path: Path) -> None:
    from streamer.stream import stream_dataset

    topics = {name: unique_topic(name) for name in ("impressions", "feedback", "dead_letters")}
    _create(kafka_broker, [topics["impressions"], topics["feedback"]], partitions=3)  # not the default 4
    stream_dataset("synthetic", None, f"kafka://{kafka_broker}", options=SYNTHETIC,
                   impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
    producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all")
    try:
        bad = producer.send(topics["impressions"], key=b"user-bad", value=b"\xc1").get(timeout=30)  # not msgpack
    finally:
        producer.close()
    config = write_trainer_config(tmp_path / "trainer.toml", kafka_broker, topics, {
        **SETTINGS, "checkpoint.dir": str(tmp_path / "checkpoints"), "kafka.dead_letter_retention_days": 45})

    output = _finished(_train(config), config)

    assert f"created the dead-letter topic {topics['dead_letters']}: 3 partitions (as {topics['impressions']} " \
           "has), dead letters kept 45 days" in output, output[-4000:]
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topics["dead_letters"],
                                                       {"retention.ms": None})], config_filter="all")
        partitions = admin.describe_topics([topics["dead_letters"]])[0]["partitions"]
    finally:
        admin.close()
    assert found["topic"][topics["dead_letters"]]["retention.ms"]["value"] == str(45 * 86_400_000)
    assert len(partitions) == 3
    (letter,) = _records(kafka_broker, topics["dead_letters"])
    headers = dict(letter.headers)
    assert letter.key == b"user-bad" and letter.value == b"\xc1" and headers["dl.reason"] == b"not_msgpack"
    assert (headers["dl.source.partition"], headers["dl.source.offset"]) == (str(bad.partition).encode(),
                                                                             str(bad.offset).encode())
    assert letter.partition == bad.partition  # keyed like its source, on as many partitions: the same number
    assert "1 dead letters" in output


def test_from_time_applies_to_input_topics_made_after_the_trainer_started(
        kafka_broker: str, unique_topic: Callable[[str], str], tmp_path: Path) -> None:
    from streamer.eventlog import read_event_log
    from streamer.events import encode
    from streamer.stream import stream_dataset

    topics = {name: unique_topic(name) for name in ("impressions", "feedback", "dead_letters")}
    log = tmp_path / "synthetic.evlog"
    stream_dataset("synthetic", None, f"file://{log}", options=SYNTHETIC)
    records = list(read_event_log(log))
    base = (int(time.time()) - 7200) * 1000
    start_ms = base + len(records) // 2 * 1000  # the record stamps step by a second: the time cuts the stream in two
    ledger = tmp_path / "ledger"
    config = write_trainer_config(tmp_path / "trainer.toml", kafka_broker, topics,
                                  {**SETTINGS, "checkpoint.dir": str(tmp_path / "checkpoints")})
    trainer = _train(config, "--from-time", str(start_ms), "--ledger", str(ledger))
    trainer_log = config.with_suffix(".log")
    deadline = time.monotonic() + 120
    while "do not exist yet; once made, their partitions start at the time too" not in trainer_log.read_text(
            errors="replace"):
        assert trainer.poll() is None and time.monotonic() < deadline, trainer_log.read_text(errors="replace")[-4000:]
        time.sleep(0.5)

    # The trainer is held while the topics are made and filled: assigned a partition still empty, it would find
    # no record at or after the time and start at its end offset, 0, as --from-time does at start.
    os.kill(trainer.pid, signal.SIGSTOP)
    try:
        _create(kafka_broker, [topics["impressions"], topics["feedback"]], partitions=2)
        producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all", linger_ms=5)
        try:
            for i, record in enumerate(records):
                producer.send(topics[record.topic], key=record.key.encode(), value=encode(record.event),
                              timestamp_ms=base + i * 1000)
            producer.flush(timeout=60)
        finally:
            producer.close()
    finally:
        os.kill(trainer.pid, signal.SIGCONT)
    output = _finished(trainer, config)

    wanted = sorted(r.event["impression_id"] for i, r in enumerate(records)
                    if r.topic == "impressions" and base + i * 1000 >= start_ms)
    assert 0 < len(wanted) < sum(1 for r in records if r.topic == "impressions")
    assert sorted(row["impression_id"] for row in read_ledger(ledger)) == wanted, output[-4000:]
    assert "partitions assigned after the start begin at" in output


def test_a_dead_letter_that_cannot_be_delivered_holds_back_the_checkpoint_and_is_delivered_after_a_restart(
        kafka_broker: str, unique_topic: Callable[[str], str], tmp_path: Path) -> None:
    """The dead-letter topic deleted while the trainer runs is not made again with the broker's defaults by the
    trainer's producer; the bad event's checkpoint is never written (nor its offset committed to Kafka), so the
    next start, once the topic is back, reads it again and dead-letters it: never dropped."""
    from consumers.state.checkpoints import CheckpointStore
    from streamer.stream import stream_dataset

    topics = {name: unique_topic(name) for name in ("impressions", "feedback", "dead_letters")}
    _create(kafka_broker, [topics["impressions"], topics["feedback"]], partitions=2)
    config = write_trainer_config(tmp_path / "trainer.toml", kafka_broker, topics,
                                  {**SETTINGS, "checkpoint.dir": str(tmp_path / "checkpoints")})
    trainer = _train(config)
    trainer_log = config.with_suffix(".log")
    deadline = time.monotonic() + 120
    while f"created the dead-letter topic {topics['dead_letters']}" not in trainer_log.read_text(errors="replace"):
        assert trainer.poll() is None and time.monotonic() < deadline, trainer_log.read_text(errors="replace")[-4000:]
        time.sleep(0.5)
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        admin.delete_topics([topics["dead_letters"]])
        while topics["dead_letters"] in admin.list_topics():
            assert time.monotonic() < deadline, "the dead-letter topic was not deleted"
            time.sleep(0.2)
        stream_dataset("synthetic", None, f"kafka://{kafka_broker}", options=SYNTHETIC,
                       impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
        producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all")
        try:
            bad = producer.send(topics["impressions"], key=b"user-bad", value=b"\xc1").get(timeout=30)
        finally:
            producer.close()
        # the stop's last checkpoint cannot be written: exit 9, saying why (a supervisor can tell)
        output = _finished(trainer, config, expected=EXIT_CHECKPOINT_FAILED)

        assert "checkpoint (end of stream) skipped: dead letters not yet acknowledged by Kafka" in output, \
            output[-4000:]
        assert (f"the last checkpoint could not be written in {tmp_path / 'checkpoints'} (1 dead letters not "
                f"acknowledged by Kafka, which a checkpoint waits for; check that topic {topics['dead_letters']!r} "
                "exists and takes writes)") in output, output[-4000:]
        assert topics["dead_letters"] not in admin.list_topics()  # not made again with the broker's defaults
        # at most the untrained model's step 0 (checkpointed at the first assignment), from before the bad event
        latest = CheckpointStore(tmp_path / "checkpoints").latest(with_tensors=False)
        assert latest is None or latest.step == 0, latest
        group = load_config(config, env={}).kafka.group_id
        committed = KafkaConsumer(bootstrap_servers=kafka_broker, group_id=group, enable_auto_commit=False)
        try:  # nothing committed past the bad event either
            offset = committed.committed(TopicPartition(topics["impressions"], bad.partition))
            assert offset is None or offset <= bad.offset, (offset, bad.offset)
        finally:
            committed.close(autocommit=False)
    finally:
        admin.close()

    output = _finished(_train(config), config)  # the topic is made again at start, the bad event read again

    (letter,) = _records(kafka_broker, topics["dead_letters"])
    assert letter.key == b"user-bad" and dict(letter.headers)["dl.source.offset"] == str(bad.offset).encode()
    assert "1 dead letters" in output


def test_a_dead_letter_too_large_for_its_topic_is_sent_again_cut_short_instead_of_holding_back_every_checkpoint(
        kafka_broker: str, unique_topic: Callable[[str], str]) -> None:
    """A dead-letter topic whose max.message.bytes is below what a bad message needs: the broker refuses the dead
    letter for good, and a queue that only retried it would hold back every checkpoint for ever. It is sent again
    cut to 64 KiB, then without its value; its headers still name the source message."""
    small, tiny = unique_topic("dl-small"), unique_topic("dl-tiny")
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        admin.create_topics([NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "70000"}),
                             NewTopic(tiny, 1, 1, topic_configs={"max.message.bytes": "2000"})])
        admin.wait_for_topics([small, tiny], timeout_ms=30_000)
    finally:
        admin.close()
    # the trainer's own clients (connect): a dead letter refused for its size must not poison the producer of
    # the publications, nor the dead letters' own (kafka-python's idempotent producer fails every later send)
    cfg = load_config(None, env={}, overrides=[f"kafka.bootstrap={kafka_broker}", f"kafka.dead_letter_topic={small}"])
    clients = connect(cfg.kafka)
    try:
        for topic, size, kept in [(small, 100_000, TRUNCATED_BYTES), (small, 69_900, TRUNCATED_BYTES),
                                  (tiny, 10_000, 0), (small, 1_000, 1_000)]:
            queue = DeadLetterQueue(clients.dead_letter_producer, topic)
            value = b"\xc1" + random.Random(size).randbytes(size - 1)  # not msgpack, and lz4 cannot shrink it
            record = SimpleNamespace(key=b"user-big", value=value, offset=size)
            queue.add(EventError("not msgpack " + "x" * 3000, reason="not_msgpack"), record, "impressions", 0)
            assert queue.flush(timeout_s=30), (topic, size)  # delivered, so checkpoints go on
            letter = [r for r in _records(kafka_broker, topic) if dict(r.headers)["dl.source.offset"] ==
                      str(size).encode()]
            assert len(letter) == 1 and letter[0].value == value[:kept], (topic, size, len(letter))
            headers = dict(letter[0].headers)
            assert headers.get("dl.truncated") == (str(size).encode() if kept < size else None), headers
            assert headers["dl.source.topic"] == b"impressions" and headers["dl.reason"] == b"not_msgpack"
        clients.producer.send(small, key=b"manifest", value=b"a publication").get(timeout=30)  # still works
    finally:
        clients.close()


def test_a_publication_refused_for_good_makes_a_new_producer_and_the_retry_lands_once_the_topic_takes_it(
        kafka_broker: str, unique_topic: Callable[[str], str]) -> None:
    """The serving topic's max.message.bytes lowered while the trainer runs: the publication is refused for good,
    which kafka-python's idempotent producer turns into a fatal error (every later send fails). The publisher makes
    a new producer (``Publisher.renew``), so once the limit is raised again the next retry lands, no restart."""
    from consumers.trainer.publisher import Publisher

    topic = unique_topic("model")
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)

    def limit(value: int) -> None:
        admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, {"max.message.bytes": str(value)})])
        time.sleep(1.0)  # the partition leader applies the new setting

    cfg = load_config(None, env={}, overrides=[f"kafka.bootstrap={kafka_broker}", f"kafka.model_topic={topic}"])
    recorded = []
    store = SimpleNamespace(write_publication=lambda version, step: recorded.append(version))
    metrics = SimpleNamespace(published=lambda *_: None, mark_published_reference=lambda: None)
    publisher = Publisher(new_producer(cfg.kafka), topic, store, metrics)
    publisher.renew = lambda: new_producer(cfg.kafka)
    value = random.Random(1).randbytes(20_000)  # lz4 cannot shrink it under the lowered limit
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        admin.wait_for_topics([topic], timeout_ms=30_000)
        assert publisher.send([(b"chunk/0", value), (b"manifest", b"1")], 1, 10, 1, time.monotonic())
        limit(5_000)
        first = publisher.producer
        assert not publisher.send([(b"chunk/0", value), (b"manifest", b"2")], 2, 20, 1, time.monotonic())
        assert publisher.renewed == 1 and publisher.producer is not first  # the poisoned one closed, a new one made
        limit(1 << 20)
        assert publisher.send([(b"chunk/0", value), (b"manifest", b"3")], 3, 30, 1, time.monotonic())
        assert recorded == [1, 3] and publisher.last_published_step == 30
    finally:
        publisher.close_renewed(timeout_s=5)
        admin.close()


def test_kafka_python_still_makes_a_refused_batch_fatal_for_an_idempotent_producer(
        kafka_broker: str, unique_topic: Callable[[str], str]) -> None:
    """Why ``KafkaClients`` has a dead-letter producer of its own and ``Publisher.renew`` exists: with kafka-python
    3.0.12, after one batch the broker refuses for good, an idempotent producer fails every later send, to any
    topic; a non-idempotent one does not. If a kafka-python release changes this, this test says so (the
    workarounds would then be harmless, and could go)."""
    small, healthy = unique_topic("small"), unique_topic("healthy")
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        admin.create_topics([NewTopic(small, 1, 1, topic_configs={"max.message.bytes": "2000"}),
                             NewTopic(healthy, 1, 1)])
        admin.wait_for_topics([small, healthy], timeout_ms=30_000)
    finally:
        admin.close()
    after = {}
    for idempotent in (True, False):
        producer = KafkaProducer(bootstrap_servers=kafka_broker, acks="all", enable_idempotence=idempotent,
                                 max_request_size=16 << 20)
        try:
            refused = producer.send(small, random.Random(0).randbytes(10_000))
            producer.flush(timeout=30)
            assert refused.failed() and type(refused.exception).__name__ == "MessageSizeTooLargeError"
            later = producer.send(healthy, b"a small message")
            producer.flush(timeout=30)
            after[idempotent] = later.succeeded()
        finally:
            producer.close(timeout=5)
    assert after == {True: False, False: True}, after
