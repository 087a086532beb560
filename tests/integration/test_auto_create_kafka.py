"""Kafka clients that must not create topics do not, on a broker that creates them on request (the local one, as
Kafka's default), and the trainer makes a missing serving topic compacted before its first publication.

kafka-python 3.0.12 ignores ``allow_auto_create_topics`` (``streamer.topics.honour_auto_create``): a serving replica
assigned to a deleted model topic created it again at once, without compaction.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import pytest
from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import NewTopic

from consumers.runtime.config import KafkaConfig
from consumers.serving.daemon import connect as serving_connect
from consumers.trainer.kafka_io import check_model_topic
from streamer.topics import cleanup_policy, honour_auto_create

pytestmark = pytest.mark.integration


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
    """The setting is the client's own, not forced off: a consumer left at kafka-python's default (True), like the
    trainer's group consumer, creates the topic as before."""
    topic = unique_topic("other")
    consumer = honour_auto_create(KafkaConsumer(bootstrap_servers=kafka_broker, group_id=None,
                                                metadata_max_age_ms=1000))
    assert _polled_after_delete(kafka_broker, topic, consumer)


def test_the_trainer_makes_a_missing_serving_topic_compacted_and_warns_of_one_that_is_not(
        kafka_broker: str, unique_topic: Callable[[str], str], caplog: pytest.LogCaptureFixture) -> None:
    missing = unique_topic("model")
    check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=missing))
    assert cleanup_policy(kafka_broker, missing) == "compact"
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
    assert cleanup_policy(kafka_broker, plain) == "delete"  # only said, never changed behind the operator's back

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="crossdistil.trainer"):
        check_model_topic(KafkaConfig(bootstrap=kafka_broker, model_topic=missing))  # compacted: nothing to say
    assert not [r for r in caplog.records if missing in r.getMessage()]
