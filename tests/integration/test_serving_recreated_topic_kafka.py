"""A running replica whose serving topic an operator deletes and creates again, then a trainer on a new
checkpoint.dir publishes from version 1: the replica serves the new topic's publication without a restart, and
versions must grow again from there."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

from streamer.topics import model_topic_spec
from tests.integration.test_serving_kafka import (
    Publisher,
    RunningServing,
    checkpoint_messages,
    make_learner,
    start_serving,  # noqa: F401 (fixture)
    topic,  # noqa: F401 (fixture)
    train,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def admin(kafka_broker: str) -> Iterator[KafkaAdminClient]:
    client = KafkaAdminClient(bootstrap_servers=kafka_broker)
    yield client
    client.close()


def topic_id(admin: KafkaAdminClient, name: str) -> object:
    (described,) = admin.describe_topics([name])
    return described.get("topic_id")


def delete_and_create_again(admin: KafkaAdminClient, name: str, timeout_s: float = 60.0) -> None:
    """Delete ``name`` and create it again as the operator would (compacted, large messages): a new topic, with a
    new id. (The replica's consumer never creates it: ``streamer.topics.honour_auto_create``.)"""
    old = topic_id(admin, name)
    admin.delete_topics([name])
    deadline = time.monotonic() + timeout_s
    while True:
        assert time.monotonic() < deadline, f"{name} was not created again within {timeout_s} s"
        try:
            admin.create_topics([NewTopic(name, 1, 1, topic_configs=model_topic_spec()["configs"])])
            return
        except TopicAlreadyExistsError:  # still being deleted
            try:
                if topic_id(admin, name) not in (None, old):
                    return
            except Exception:  # between deletion and creation: the topic is unknown for a moment
                pass
            time.sleep(0.2)


def test_a_replica_serves_a_recreated_topics_publication_without_a_restart(
        kafka_broker: str, topic: str, admin, start_serving) -> None:  # noqa: F811
    old_trainer = make_learner(seed=0)
    publisher = Publisher(kafka_broker, topic)
    try:
        for version in (1, 2, 3):
            train(old_trainer, 1)
            publisher.send(checkpoint_messages(old_trainer, version))
    finally:
        publisher.close()
    serving: RunningServing = start_serving()
    serving.wait_version(3)
    assert serving.daemon.holder.current.step == 3

    delete_and_create_again(admin, topic)
    new_trainer = make_learner(seed=1)
    train(new_trainer, 5)  # step 5: the new lineage's model, told apart from the old one's step 3
    publisher = Publisher(kafka_broker, topic)
    try:
        publisher.send(checkpoint_messages(new_trainer, 1))  # a trainer on a new checkpoint.dir: version 1
        deadline = time.monotonic() + 60
        while serving.daemon.holder.current.step != 5:
            assert time.monotonic() < deadline, (
                f"the replica kept version {serving.daemon.holder.current.version} (step "
                f"{serving.daemon.holder.current.step}); rejections: {list(serving.daemon.follower.stats.rejections)}")
            time.sleep(0.05)
        assert serving.daemon.holder.current.version == 1
        assert serving.daemon.follower.stats.topic_recreations == 1

        train(new_trainer, 1)
        publisher.send(checkpoint_messages(new_trainer, 2))
        serving.wait_version(2)
        assert serving.daemon.holder.current.step == 6
        publisher.send(checkpoint_messages(new_trainer, 1))  # within the new topic's life: stale, refused
        assert serving.wait_rejections(1)[-1] == (1, "stale_version")
        assert serving.daemon.holder.current.version == 2 and serving.daemon.follower.stats.topic_recreations == 1
    finally:
        publisher.close()
