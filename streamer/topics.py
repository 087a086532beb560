"""The project's Kafka topics: names, layout, and their creation (by the streamer that produces to them, the
local broker's ``crossdistil kafka up``, the demo and the tests).

Impressions, feedback and dead letters are keyed by user id and share a partition count, so a user's events
have the same partition number on every topic; the model topic (``consumers.state.wire``) has one compacted
partition so that publications stay in order and only the newest of each key is kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kafka import KafkaAdminClient
from kafka.errors import TopicAlreadyExistsError

from streamer.events import DEAD_LETTER_TOPIC, FEEDBACK_TOPIC, IMPRESSION_TOPIC, MODEL_TOPIC

DEFAULT_PARTITIONS = 4
MODEL_MAX_MESSAGE_BYTES = 16 * 1024 * 1024


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
    user's impressions and feedback share a partition number across the two topics). The model topic has one
    partition, so checkpoints stay in order, is compacted, and admits messages up to ``model_max_message_bytes``.
    Existing topics are left as they are. Waits until every topic has a leader for every partition.
    ``client_options``: extra kafka-python admin client settings (security_protocol, sasl_*, ssl_*, ...).
    """

    wanted: dict[str, dict[str, Any]] = {
        name: {"num_partitions": partitions, "replication_factor": 1}
        for name in (impression_topic, feedback_topic, dead_letter_topic)
    }
    wanted[model_topic] = {
        "num_partitions": 1,
        "replication_factor": 1,
        "configs": {"cleanup.policy": "compact", "max.message.bytes": str(model_max_message_bytes)},
    }
    timeout_ms = int(timeout_s * 1000)
    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="crossdistil-ensure-topics",
                                 request_timeout_ms=timeout_ms, bootstrap_timeout_ms=timeout_ms,
                                 **{k: v for k, v in (client_options or {}).items()
                                    if k in KafkaAdminClient.DEFAULT_CONFIG})
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
