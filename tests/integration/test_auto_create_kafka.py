"""Kafka clients that must not create topics do not, on a broker that creates them on request (the local one, as
Kafka's default), and the trainer makes a missing serving topic compacted before its first publication. The
trainer never creates its input topics: it waits for them, says so, and trains them once they are made.

kafka-python 3.0.12 ignores ``allow_auto_create_topics`` (``streamer.topics.honour_auto_create``): a serving replica
assigned to a deleted model topic created it again at once, without compaction.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from consumers.runtime.config import KafkaConfig, load_config
from consumers.runtime.processes import die_with_parent
from consumers.serving.daemon import connect as serving_connect
from consumers.state.checkpoints import CheckpointStore
from consumers.state.wire import publication_message_bytes
from consumers.trainer.kafka_io import ModelTopicError, check_model_topic
from streamer.topics import DEFAULT_PARTITIONS, ensure_topics, honour_auto_create, topic_configs
from tests.trainer_config import write_trainer_config

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _polled_after_delete(bootstrap: str, topic: str, consumer: KafkaConsumer) -> bool:
    """Assign ``consumer`` to ``topic``, delete the topic, poll for 6 s with metadata refreshed every second;
    whether the topic exists afterwards."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        admin.create_topics([NewTopic(topic, 1, 1, topic_configs={"cleanup.policy": "compact"})])
        admin.wait_for_topics([topic], timeout_ms=30_000)
        consumer.assign([TopicPartition(topic, 0)])
        consumer.poll(timeout_ms=500)
        admin.delete_topics([topic])
        deadline = time.monotonic() + 6
        while time.monotonic() < deadline:
            consumer.poll(timeout_ms=300)
        return topic in admin.list_topics()
    finally:
        consumer.close()
        admin.close()


def test_a_serving_replica_does_not_create_its_deleted_model_topic_again(kafka_broker: str,
                                                                          unique_topic: Callable[[str], str]) -> None:
    topic = unique_topic("model")
    consumer = serving_connect(kafka_broker, {"bootstrap_servers": kafka_broker, "group_id": None,
                                              "enable_auto_commit": False, "allow_auto_create_topics": False,
                                              "metadata_max_age_ms": 1000})
    assert not _polled_after_delete(kafka_broker, topic, consumer)


def test_a_client_that_asks_for_auto_creation_still_gets_it(kafka_broker: str,
                                                           unique_topic: Callable[[str], str]) -> None:
    """The setting is the client's own, not forced off: a consumer left at kafka-python's default (True) creates the
    topic as before."""
    topic = unique_topic("other")
    consumer = honour_auto_create(KafkaConsumer(bootstrap_servers=kafka_broker, group_id=None,
                                                metadata_max_age_ms=1000))
    assert _polled_after_delete(kafka_broker, topic, consumer)


def test_the_trainer_makes_a_missing_serving_topic_compacted_and_warns_of_one_that_is_not(
        kafka_broker: str, unique_topic: Callable[[str], str], caplog: pytest.LogCaptureFixture) -> None:
    missing = unique_topic("model")
    check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=missing))
    assert topic_configs(kafka_broker, [missing], ("cleanup.policy",))[missing] == {"cleanup.policy": "compact"}
    consumer = KafkaConsumer(bootstrap_servers=kafka_broker, group_id=None)
    try:
        assert consumer.partitions_for_topic(missing) == {0}
    finally:
        consumer.close()

    plain = unique_topic("plain")
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        admin.create_topics([NewTopic(plain, 1, 1)])
        admin.wait_for_topics([plain], timeout_ms=30_000)
    finally:
        admin.close()
    with caplog.at_level(logging.WARNING, logger="crossdistil.trainer"):
        check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=plain))
    warned = [r.getMessage() for r in caplog.records if plain in r.getMessage()]
    assert len(warned) == 1 and "cleanup.policy=delete, not compact" in warned[0], warned
    # only said, never changed behind the operator's back
    assert topic_configs(kafka_broker, [plain], ("cleanup.policy",))[plain] == {"cleanup.policy": "delete"}

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crossdistil.trainer"):
        check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=missing))  # compacted: nothing to say
    assert not [r for r in caplog.records if missing in r.getMessage()]


def test_a_serving_topic_too_small_for_a_publication_is_refused_at_start_with_the_command_that_fixes_it(
        kafka_broker: str, unique_topic: Callable[[str], str], tmp_path: Path) -> None:
    """A serving topic whose max.message.bytes is below a publication's largest message: the broker would refuse
    every publication for good (and kafka-python's idempotent producer would then fail every later send), so the
    trainer says so before it trains anything and exits 2; a topic at the broker's default 1 MiB is fine."""
    small, default = unique_topic("model-small"), unique_topic("model-default")
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    try:
        admin.create_topics([NewTopic(small, 1, 1, topic_configs={"cleanup.policy": "compact",
                                                                  "max.message.bytes": "500000"}),
                             NewTopic(default, 1, 1, topic_configs={"cleanup.policy": "compact",
                                                                    "max.message.bytes": "1048588"})])
        admin.wait_for_topics([small, default], timeout_ms=30_000)
    finally:
        admin.close()
    needed = publication_message_bytes(900_000)  # publish.chunk_bytes' default
    with pytest.raises(ModelTopicError, match=rf"{small} takes messages of at most 500,000 bytes .* may be "
                                              rf"1,000,000 .*--entity-name {small} --add-config max.message.bytes="):
        check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=small), needed)
    check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=default), needed)
    with pytest.raises(ModelTopicError, match="at most 1,048,588 bytes"):  # chunks of 4 MB need a larger limit
        check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=default), publication_message_bytes(4 << 20))

    topics = {name: unique_topic(name) for name in ("impressions", "feedback", "dead_letters")}
    ensure_topics(kafka_broker, 2, impression_topic=topics["impressions"], feedback_topic=topics["feedback"],
                  dead_letter_topic=topics["dead_letters"], model_topic=small)
    config = write_trainer_config(tmp_path / "crossdistil.toml", kafka_broker, {**topics, "model": small},
                                  {"checkpoint.dir": str(tmp_path / "checkpoints")})
    done = subprocess.run([sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--exit-when-idle",
                           "3", "--torch-threads", "1"], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"the serving topic {small} takes messages of at most 500,000 bytes" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "checkpoints").exists()  # nothing trained, the folder it made removed


def _wait_for(condition: Callable[[], bool], timeout_s: float, what: str, log: Path) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        tail = log.read_text(errors="replace")[-4000:]
        assert time.monotonic() < deadline, f"{what} within {timeout_s:.0f} s:\n{tail}"
        time.sleep(0.5)


def test_the_trainer_never_creates_its_missing_input_topics_and_trains_them_once_they_are_made(
        kafka_broker: str, unique_topic: Callable[[str], str], tmp_path: Path) -> None:
    """A trainer started before its topics exist (a typo, or before the streamer) leaves them missing, where its
    consumer would have had the broker make them with the broker's default partition count; it names them in its
    log, and trains them from the assignment after they are made, with a partition count of their own."""
    from streamer.stream import stream_dataset

    topics = {name: unique_topic(name) for name in ("impressions", "feedback", "dead_letters", "model")}
    partitions = DEFAULT_PARTITIONS - 1  # not the broker's num.partitions, which an auto-created topic would get
    config = write_trainer_config(tmp_path / "crossdistil.toml", kafka_broker, topics, {
        "join.attribution_window_s": {"click": 3, "like": 10},
        "batching.batch_size": 64,
        "batching.max_batch_delay_s": 1.0,
        "model.tasks": ["click", "like"],
        "model.options": {"embedding_dim": 4, "hidden_dims": [8], "tower_dims": [4],
                          "features": {"categorical": ["user_id", "item_id"], "hash_buckets": 1024}},
        "checkpoint.dir": str(tmp_path / "checkpoints"),
        "checkpoint.every_steps": 0,
        "checkpoint.every_s": 0.0,
    })
    log = tmp_path / "trainer.log"
    admin = KafkaAdminClient(bootstrap_servers=kafka_broker)
    trainer = subprocess.Popen(
        [sys.executable, "-m", "consumers.cli", "train", "--config", str(config), "--exit-when-idle", "10",
         "--torch-threads", "1"], cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, preexec_fn=die_with_parent)
    try:
        said = f"topic(s) {topics['impressions']}, {topics['feedback']} do not exist on {kafka_broker}"
        _wait_for(lambda: said in log.read_text(errors="replace"), 120, "the missing topics were not named", log)
        time.sleep(3)  # the consumer keeps asking for their metadata meanwhile (once a second)
        assert not {topics["impressions"], topics["feedback"]} & set(admin.list_topics())
        assert trainer.poll() is None, "the trainer did not wait for its topics"

        ensure_topics(kafka_broker, partitions, impression_topic=topics["impressions"],
                      feedback_topic=topics["feedback"], dead_letter_topic=topics["dead_letters"],
                      model_topic=topics["model"])
        summary = stream_dataset("synthetic", None, f"kafka://{kafka_broker}", options={
            "n_events": 600, "tasks": "click,like", "n_users": 50, "n_items": 100, "seed": 5, "max_delay_s": 5},
            impression_topic=topics["impressions"], feedback_topic=topics["feedback"])
        assert trainer.wait(timeout=240) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()
        admin.close()
    checkpoint = CheckpointStore(load_config(config, env={}).checkpoint.dir).latest(with_tensors=False)
    positions = {(topic, partition): offset for topic, partition, offset in checkpoint.metadata["positions"]}
    read = {topic: {p for (t, p) in positions if t == topic} for topic in (topics["impressions"], topics["feedback"])}
    assert read == {topic: set(range(partitions)) for topic in read}, positions
    assert sum(o for (t, _), o in positions.items() if t == topics["impressions"]) == summary["impressions"]
    assert checkpoint.metadata["trained_samples"] > 0
