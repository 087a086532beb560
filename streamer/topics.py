"""The project's Kafka topics: names, layout, and their creation (by the streamer that produces to them, the
local broker's ``crossdistil kafka up``, the demo and the tests).

Impressions, feedback and dead letters are keyed by user id and share a partition count, so a user's events
have the same partition number on every topic; the model topic (``consumers.state.wire``) has one compacted
partition so that publications stay in order and only the newest of each key is kept. Dead letters are kept for
``DEAD_LETTER_RETENTION_DAYS`` (the trainer's ``kafka.dead_letter_retention_days``), not the broker's default
``retention.ms`` (7 days), so that bad events do not expire before someone looks at them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from kafka import KafkaAdminClient
from kafka.admin import ConfigResource, ConfigResourceType
from kafka.errors import TopicAlreadyExistsError

from streamer.events import DEAD_LETTER_TOPIC, FEEDBACK_TOPIC, IMPRESSION_TOPIC, MODEL_TOPIC

DEFAULT_PARTITIONS = 4
MODEL_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
DEAD_LETTER_RETENTION_DAYS = 30.0  # the default of kafka.dead_letter_retention_days (-1: kept forever)


class TopicError(RuntimeError):
    """Kafka is not reachable, or the topics cannot be created there."""


def ensure_topics(
    bootstrap: str,
    partitions: int = DEFAULT_PARTITIONS,
    *,
    impression_topic: str = IMPRESSION_TOPIC,
    feedback_topic: str = FEEDBACK_TOPIC,
    dead_letter_topic: str = DEAD_LETTER_TOPIC,
    model_topic: str = MODEL_TOPIC,
    model_max_message_bytes: int = MODEL_MAX_MESSAGE_BYTES,
    timeout_s: float = 30.0,
    client_options: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """Create the default topics if they do not exist yet; return ``{topic: "created" | "exists"}``.

    Impressions, feedback and dead letters get ``partitions`` partitions (events are keyed by user id, so a
    user's impressions and feedback share a partition number across the two topics); dead letters are kept for
    ``DEAD_LETTER_RETENTION_DAYS`` (``dead_letter_topic_spec``). The model topic has one
    partition, so checkpoints stay in order, is compacted, and admits messages up to ``model_max_message_bytes``.
    Existing topics are left as they are. Waits until every topic has a leader for every partition.
    ``client_options``: extra kafka-python admin client settings (security_protocol, sasl_*, ssl_*, ...).
    """

    wanted: dict[str, dict[str, Any]] = {
        name: {"num_partitions": partitions, "replication_factor": 1} for name in (impression_topic, feedback_topic)
    }
    wanted[dead_letter_topic] = {**dead_letter_topic_spec(partitions), "replication_factor": 1}
    wanted[model_topic] = model_topic_spec(model_max_message_bytes)
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = _admin(bootstrap, "crossdistil-ensure-topics", timeout_ms, client_options)
    except Exception as exc:
        raise TopicError(
            f"Kafka at {bootstrap} is not reachable ({type(exc).__name__}); "
            f"start one with 'crossdistil kafka up' or set --bootstrap"
        ) from exc
    try:
        existing = set(admin.list_topics())
        result = {name: "exists" for name in wanted if name in existing}
        missing = {name: spec for name, spec in wanted.items() if name not in existing}
        if missing:
            try:
                admin.create_topics(missing, timeout_ms=timeout_ms)
            except TopicAlreadyExistsError:
                pass  # another process created one between list_topics and here: that is fine
            result.update({name: "created" for name in missing})
        admin.wait_for_topics(list(wanted), timeout_ms=timeout_ms)
        return {name: result[name] for name in wanted}
    finally:
        admin.close()


def model_topic_spec(max_message_bytes: int = MODEL_MAX_MESSAGE_BYTES) -> dict[str, Any]:
    """How the model topic is made: one partition (publications stay in order), compacted (the newest message of
    each key stays, however old), messages up to ``max_message_bytes``."""
    return {"num_partitions": 1, "replication_factor": 1,
            "configs": {"cleanup.policy": "compact", "max.message.bytes": str(max_message_bytes)}}


def create_model_topic(bootstrap: str, topic: str, *, client_options: Mapping[str, Any] | None = None,
                       max_message_bytes: int = MODEL_MAX_MESSAGE_BYTES, timeout_s: float = 10.0) -> bool:
    """Create the model topic ``topic`` as ``model_topic_spec`` says; False when it exists already. Raises
    ``kafka.errors.KafkaError`` when Kafka refuses (e.g. the client may not create topics)."""
    return _create_topic(bootstrap, topic, model_topic_spec(max_message_bytes), "crossdistil-model-topic",
                         client_options, timeout_s)


def retention_ms(days: float) -> int:
    """Kafka's ``retention.ms`` for ``days`` (-1: kept forever, as Kafka's -1).

    >>> retention_ms(30), retention_ms(0.5), retention_ms(-1)
    (2592000000, 43200000, -1)
    """
    return -1 if days == -1 else round(days * 86_400_000)


def dead_letter_topic_spec(partitions: int, retention_days: float = DEAD_LETTER_RETENTION_DAYS) -> dict[str, Any]:
    """How a dead-letter topic is made: ``partitions`` partitions (those of the input topics: a dead letter has its
    source message's key, so it lands on the same partition number), the broker's default replication factor
    (``default.replication.factor``), and dead letters kept for ``retention_days`` (-1: forever)."""
    return {"num_partitions": partitions, "replication_factor": -1,
            "configs": {"cleanup.policy": "delete", "retention.ms": str(retention_ms(retention_days))}}


def create_dead_letter_topic(bootstrap: str, topic: str, partitions: int, retention_days: float, *,
                             client_options: Mapping[str, Any] | None = None, timeout_s: float = 10.0) -> bool:
    """Create the dead-letter topic ``topic`` as ``dead_letter_topic_spec`` says; False when it exists already.
    Raises ``kafka.errors.KafkaError`` when Kafka refuses (e.g. TopicAuthorizationFailedError: the client may not
    create topics)."""
    return _create_topic(bootstrap, topic, dead_letter_topic_spec(partitions, retention_days),
                         "crossdistil-dead-letter-topic", client_options, timeout_s)


def _create_topic(bootstrap: str, topic: str, spec: Mapping[str, Any], client_id: str,
                  client_options: Mapping[str, Any] | None, timeout_s: float) -> bool:
    """Create ``topic`` as ``spec`` says and wait for its leaders; False when it exists already."""
    timeout_ms = int(timeout_s * 1000)
    admin = _admin(bootstrap, client_id, timeout_ms, client_options)
    try:
        admin.create_topics({topic: spec}, timeout_ms=timeout_ms)
        admin.wait_for_topics([topic], timeout_ms=timeout_ms)
        return True
    except TopicAlreadyExistsError:
        return False
    finally:
        admin.close()


def _admin(bootstrap: str, client_id: str, timeout_ms: int, client_options: Mapping[str, Any] | None) -> Any:
    """An admin client; ``client_options`` (security, the daemons' ``bootstrap_timeout_ms``) win over the timeouts."""
    options = {"request_timeout_ms": timeout_ms, "bootstrap_timeout_ms": timeout_ms,
               **{k: v for k, v in (client_options or {}).items() if k in KafkaAdminClient.DEFAULT_CONFIG}}
    return KafkaAdminClient(bootstrap_servers=bootstrap, client_id=client_id, **options)


def honour_auto_create(client: Any) -> Any:
    """``client`` (a kafka-python consumer or producer), made to keep its own ``allow_auto_create_topics``.

    kafka-python 3.0.12 never hands that setting to the cluster metadata its requests are built from, so every
    client asks the broker to create the topics it reads: on a broker with ``auto.create.topics.enable=true``
    (Kafka's default, and ``crossdistil kafka up``'s) a consumer subscribed to a topic not made yet, or assigned to
    one that is deleted, creates it with the broker's defaults, e.g. a model topic without compaction. Should a
    later kafka-python keep its metadata elsewhere this does nothing (``tests/integration/test_auto_create_kafka.py``
    then fails).
    """
    cluster = getattr(client, "_cluster", None) or getattr(client, "_metadata", None)
    settings = getattr(cluster, "config", None)
    if isinstance(settings, dict) and "allow_auto_create_topics" in settings:
        settings["allow_auto_create_topics"] = bool(client.config.get("allow_auto_create_topics", True))
    return client


def topic_configs(bootstrap: str, topics: Sequence[str], keys: Sequence[str], *,
                  client_options: Mapping[str, Any] | None = None,
                  timeout_s: float = 10.0) -> dict[str, dict[str, str]]:
    """The effective values of ``keys`` (the topic's own, else the broker's default) of each of ``topics`` that
    exists, in one request. Raises ``kafka.errors.KafkaError`` when Kafka cannot say (unreachable, not authorised)."""
    admin = _admin(bootstrap, "crossdistil-topic-config", int(timeout_s * 1000), client_options)
    try:
        found = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic, dict.fromkeys(keys))
                                        for topic in topics], config_filter="all")
    finally:
        admin.close()
    described = found.get("topic", {})
    return {topic: {key: str(entries[key]["value"]) for key in keys if key in entries}
            for topic in topics if (entries := described.get(topic))}
