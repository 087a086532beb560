"""The trainer's dead-letter topic at start, without a broker: made on purpose with the input topics' partition
count and its own retention, left alone when it exists, and a refusal that names the command to run."""

from __future__ import annotations

import pytest
from kafka.errors import KafkaTimeoutError, TopicAuthorizationFailedError

from consumers.runtime.config import ConfigError, load_config
from consumers.trainer import kafka_io
from consumers.trainer.kafka_io import DeadLetterTopicError, check_dead_letter_topic
from streamer.topics import DEAD_LETTER_RETENTION_DAYS, DEFAULT_PARTITIONS, dead_letter_topic_spec

pytestmark = pytest.mark.unit


class Metadata:
    """The consumer's view of which topics exist (partitions_for_topic), as kafka-python answers it."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set:
        return set(range(self.counts.get(topic, 0)))


def kafka(**overrides):
    return load_config(None, env={}, overrides=[f"kafka.{k}={v}" for k, v in overrides.items()]).kafka


@pytest.fixture
def created(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []

    def create(bootstrap, topic, partitions, retention_days, *, client_options=None, timeout_s=10.0) -> bool:
        calls.append((topic, partitions, retention_days))
        return True

    monkeypatch.setattr(kafka_io, "create_dead_letter_topic", create)
    return calls


def test_a_missing_dead_letter_topic_is_made_with_the_input_topics_partitions_and_its_own_retention(
        created: list, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="crossdistil.trainer"):
        check_dead_letter_topic(kafka(dead_letter_retention_days=90), Metadata({"impressions": 6, "feedback": 6}))
    assert created == [("dead-letters", 6, 90.0)]
    assert "created the dead-letter topic dead-letters: 6 partitions (as impressions has), dead letters kept " \
           "90 days" in caplog.text
    spec = dead_letter_topic_spec(6, 90.0)
    assert spec["num_partitions"] == 6 and spec["configs"]["retention.ms"] == str(90 * 86_400_000)


def test_before_the_input_topics_exist_the_dead_letter_topic_gets_the_default_partition_count(created: list) -> None:
    check_dead_letter_topic(kafka(), Metadata({}))
    assert created == [("dead-letters", DEFAULT_PARTITIONS, 30.0)]


def test_an_existing_dead_letter_topic_is_left_as_it_is(created: list) -> None:
    check_dead_letter_topic(kafka(), Metadata({"impressions": 6, "feedback": 6, "dead-letters": 2}))
    assert created == []


@pytest.mark.parametrize(("error", "status"), [(TopicAuthorizationFailedError, 2), (KafkaTimeoutError, 3)])
def test_a_dead_letter_topic_kafka_will_not_make_ends_the_start_naming_the_command_that_makes_it(
        monkeypatch: pytest.MonkeyPatch, error: type, status: int) -> None:
    def refuse(*args, **kwargs) -> bool:
        raise error("no")

    monkeypatch.setattr(kafka_io, "create_dead_letter_topic", refuse)
    with pytest.raises(DeadLetterTopicError) as refused:
        check_dead_letter_topic(kafka(bootstrap="k:9092"), Metadata({"impressions": 3}))
    assert refused.value.status == status
    assert ("'kafka-topics.sh --bootstrap-server k:9092 --create --topic dead-letters --partitions 3 --config "
            "retention.ms=2592000000'") in str(refused.value)


@pytest.mark.parametrize("days", ["0", "-2"])
def test_a_retention_that_is_neither_positive_nor_forever_is_a_configuration_error(days: str) -> None:
    with pytest.raises(ConfigError, match=r"kafka.dead_letter_retention_days: expected days > 0 or -1 \(forever\)"):
        kafka(dead_letter_retention_days=days)
    assert kafka(dead_letter_retention_days=-1).dead_letter_retention_days == -1


def test_the_configured_retention_defaults_to_the_one_the_streamer_makes_dead_letter_topics_with() -> None:
    assert kafka().dead_letter_retention_days == DEAD_LETTER_RETENTION_DAYS
