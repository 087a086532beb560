"""The trainer's Kafka side: its consumer and producer, partition assignment, positions, pausing, offsets.

``positions`` are the truth the checkpoint keeps: per (topic, partition), the offset after the last record
whose events went into the join. On assignment every partition is sought to its position (partitions without
one: ``--from-time``'s offset, else the beginning; one assigned later than the start, of a topic made after it, is
paused until its ``--from-time`` offset is looked up after the poll). Offsets committed to Kafka are never read
back: they feed lag dashboards, and re-committing the checkpointed positions every ``FENCE_PROBE_S`` seconds is
how a takeover by another trainer with the same ``group_instance_id`` is noticed (``fenced``; kafka-python only
notices one on a group request).

The rebalance listener stays light (kafka-python runs it inside ``poll``; a blocking listener stalls the
group protocol): a revocation only asks for a checkpoint (``revoked``), which the trainer's loop takes right
after the poll. Before issue 14 the listener wrote the checkpoint itself: 0.2-1.2 s with a healthy broker (the final
checkpoint plus publication in ``bench/results/trainer/benchmarks.json``), but up to ~125 s with the broker
away (two 30 s dead-letter flushes, a 60 s publication flush, a 5 s commit), beyond the 45 s session timeout.
Nothing is lost by waiting: the revoked partitions' positions and events stay in this process until then,
and this trainer is the only member of its group, so nobody else reads them meanwhile.

Event-time alignment (``join.max_skew_s``): partitions more than that far ahead of the join's watermark in
event time are paused until the slowest one catches up (:meth:`KafkaIO.align`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

from kafka import ConsumerRebalanceListener, KafkaConsumer, KafkaProducer, OffsetAndMetadata, TopicPartition
from kafka.errors import (
    AuthorizationError,
    CorruptRecordError,
    FencedInstanceIdError,
    InvalidConfigurationError,
    InvalidPartitionsError,
    InvalidReplicationFactorError,
    KafkaError,
    PolicyViolationError,
    UnsupportedCodecError,
)

from consumers.core.join import AttributionJoin
from consumers.runtime.config import KafkaConfig, kafka_client_options
from consumers.runtime.logs import close_quietly
from consumers.runtime.ranks import owned_partitions
from consumers.state.wire import DEFAULT_MAX_MESSAGE_BYTES, manifest_version
from streamer.kafka_security import preflight
from streamer.topics import (
    DEFAULT_PARTITIONS,
    MODEL_MAX_MESSAGE_BYTES,
    create_dead_letter_topic,
    create_model_topic,
    honour_auto_create,
    retention_ms,
    topic_configs,
)

log = logging.getLogger("crossdistil.trainer")

FENCE_PROBE_S = 10.0  # how often the checkpointed positions are re-committed to notice a takeover (exit 5)
LAG_EXPORT_S = 1.0  # how often the consumer lag gauge is refreshed from the read positions (no network call)
UNASSIGNED_WARN_S = (15.0, 30.0)  # say why no partition is assigned after 15 s, then every 30 s
METADATA_NUDGE_S = 3.0  # without partitions, ask for fresh topic metadata this often (see KafkaIO.stalled)
REJOIN_AFTER_S = 10.0  # without partitions although the topics have some, rejoin the group this often (ditto)
MISSING_TOPIC_METADATA_MS = 1000  # while an input topic is missing, ask for metadata this often (kafka-python: 100 ms)


def client_options(options: Mapping[str, Any], defaults: Mapping[str, Any]) -> dict[str, Any]:
    """The passthrough options a kafka-python client class accepts (it refuses unknown ones)."""
    return {k: v for k, v in options.items() if k in defaults}


def release_drained_records(consumer: Any) -> None:
    """Work around a kafka-python 3.0.12 fetcher bug that stalls resumed partitions for good.

    Records fetched for a paused partition are parked and handed back once it is resumed (KAFKA-7548), but
    only while the fetcher's current record set is ``None``; a drained one (empty, falsy, not ``None``) can stay
    there indefinitely. Then a resumed partition is neither fetched again (it has parked records) nor given its
    parked records: the KuaiRand replay stopped at 33,750 of 41,828 impressions with every other partition
    paused. A drained record set holds nothing, so dropping it changes no record or position. Only the private
    attribute is touched, and only when it is there.
    """
    fetcher = getattr(consumer, "_fetcher", None)
    current = getattr(fetcher, "_next_partition_records", None)
    if current is not None and not current:
        fetcher._next_partition_records = None


def set_metadata_retry_ms(consumer: Any, ms: int) -> int | None:
    """Have ``consumer`` ask for metadata again ``ms`` after an answer that a topic does not exist; the former value
    (None: another client version without these internals, nothing changed).

    kafka-python 3.0.12 asks again after ``retry_backoff_ms`` of its cluster metadata while the broker says that a
    topic does not exist (a retriable error): 10 requests a second, each logged, for as long as the topic is not
    made. That cluster metadata takes no setting from the consumer (the consumer's own ``retry_backoff_ms`` never
    reaches it), so only its private ``config`` is changed, and only when it is there.
    """
    settings = getattr(getattr(consumer, "_cluster", None), "config", None)
    if not isinstance(settings, dict) or "retry_backoff_ms" not in settings:
        return None
    former, settings["retry_backoff_ms"] = settings["retry_backoff_ms"], ms
    return former


MANIFEST_SCAN = 512  # messages read back from the end of the serving topic to find its newest manifest


def newest_published_version(k: KafkaConfig, timeout_s: float = 10.0) -> int:
    """The newest version published on ``k.model_topic`` by any trainer (0 if none, or the topic is missing).

    A publication ends with its manifest, so the newest manifest is the last message on the topic, or a few
    before it when the last publication was cut short: up to ``MANIFEST_SCAN`` messages are read back, one
    at a time. A trainer continues above it, so versions never repeat on a topic, even when it starts from a
    new ``checkpoint.dir`` (serving would otherwise ignore its first versions as stale, or replicas started at
    different times would serve different models under one version).
    """
    options = {k_: v for k_, v in kafka_client_options(k).items() if k_ in KafkaConsumer.DEFAULT_CONFIG}
    # No auto-creation: a model topic created by a metadata request would lack compaction (streamer.topics makes it).
    consumer = honour_auto_create(KafkaConsumer(bootstrap_servers=k.bootstrap, group_id=None, enable_auto_commit=False,
                                                allow_auto_create_topics=False, max_partition_fetch_bytes=32 << 20,
                                                fetch_max_bytes=64 << 20, **options))
    try:
        if not consumer.partitions_for_topic(k.model_topic):
            return 0
        tp = TopicPartition(k.model_topic, 0)
        consumer.assign([tp])
        begin, end = consumer.beginning_offsets([tp])[tp], consumer.end_offsets([tp])[tp]
        deadline = time.monotonic() + timeout_s
        for offset in range(end - 1, max(begin, end - MANIFEST_SCAN) - 1, -1):
            consumer.seek(tp, offset)
            while time.monotonic() < deadline:
                records = consumer.poll(timeout_ms=500, max_records=1).get(tp, [])
                if records:
                    break
            else:
                log.warning("reading the newest version on %s timed out at offset %d", k.model_topic, offset)
                return 0
            version = manifest_version(records[0].key, records[0].value)
            if version is not None:
                return version
        return 0
    finally:
        consumer.close()


class ModelTopicError(RuntimeError):
    """The serving topic cannot take this trainer's publications (exit status 2, before anything is trained)."""


def check_model_topic(k: KafkaConfig, max_message_bytes: int = 0) -> None:
    """Before the first publication: make ``k.model_topic`` if it is missing (one partition, compacted:
    ``streamer.topics.model_topic_spec``), and warn when it exists without compaction. A missing topic would
    otherwise be made by the producer's first send with the broker's defaults (on a broker that creates topics):
    publications kept only for ``retention.ms``, so the newest one too once the trainer has been stopped that long.
    Kafka refusing to say or to create it is a warning: publication goes on as before.

    ``ModelTopicError`` when the topic's ``max.message.bytes`` is below ``max_message_bytes`` (the largest message a
    publication may have, ``consumers.state.wire.publication_message_bytes``): the broker would refuse publications
    for good, and kafka-python's idempotent producer then fails every later send (see ``KafkaClients``)."""
    options = kafka_client_options(k)
    try:
        found = topic_configs(k.bootstrap, [k.model_topic], ("cleanup.policy", "max.message.bytes"),
                              client_options=options).get(k.model_topic)
        limit = int(found.get("max.message.bytes", max_message_bytes)) if found is not None else max_message_bytes
        if limit < max_message_bytes:
            raise ModelTopicError(
                f"the serving topic {k.model_topic} takes messages of at most {limit:,} bytes (its max.message.bytes) "
                f"and a publication's may be {max_message_bytes:,} (publish.chunk_bytes plus framing, at least "
                f"{DEFAULT_MAX_MESSAGE_BYTES:,}): Kafka would refuse them. Raise it (kafka-configs.sh "
                f"--bootstrap-server {k.bootstrap} --alter --entity-type topics --entity-name {k.model_topic} "
                f"--add-config max.message.bytes={MODEL_MAX_MESSAGE_BYTES}) or lower publish.chunk_bytes")
        policy = None if found is None else found.get("cleanup.policy", "")
        if policy is None:
            if create_model_topic(k.bootstrap, k.model_topic, client_options=options):
                log.info("created the serving topic %s (one partition, compacted)", k.model_topic)
            return
    except KafkaError as exc:
        log.warning("could not check or create the serving topic %s (%s: %s); publications fail until it exists (the "
                    "trainer never has it made on request, which would lack compaction): create it with "
                    "'kafka-topics.sh --bootstrap-server %s --create --topic %s --partitions 1 --config "
                    "cleanup.policy=compact'", k.model_topic, type(exc).__name__, exc, k.bootstrap, k.model_topic)
        return
    if "compact" not in policy.split(","):
        log.warning("the serving topic %s has cleanup.policy=%s, not compact: every publication is kept until "
                    "retention.ms deletes it, the newest too once the trainer has been stopped that long (new serving "
                    "replicas then find no model). Make it compacted: kafka-configs.sh --bootstrap-server %s --alter "
                    "--entity-type topics --entity-name %s --add-config cleanup.policy=compact", k.model_topic,
                    policy, k.bootstrap, k.model_topic)


class DeadLetterTopicError(RuntimeError):
    """The dead-letter topic is missing and could not be made at start: ``status`` 2 when Kafka refused (a restart
    would be refused too), 3 when it could not answer."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


# Kafka's answers to a topic creation that a retry would get again (not authorised, a policy, a setting it rejects).
CREATION_REFUSED = (AuthorizationError, PolicyViolationError, InvalidConfigurationError, InvalidPartitionsError,
                    InvalidReplicationFactorError)


def check_dead_letter_topic(k: KafkaConfig, consumer: Any) -> None:
    """At start: make ``k.dead_letter_topic`` if it is missing, as ``streamer.topics.dead_letter_topic_spec`` says,
    with the input topics' partition count (a dead letter has its source message's key) and
    ``k.dead_letter_retention_days``. The producer never has it made on request (``connect``), which would give it the
    broker's defaults (7 days' retention: bad events silently expire) or, on a broker that does not create topics,
    fail only at the first bad event. Raises ``DeadLetterTopicError`` naming the command that creates it."""
    found = consumer.partitions_for_topic(k.dead_letter_topic)  # the consumer never asks for auto-creation
    if found:
        log.info("dead letters go to %s (%d partitions; an existing topic is left as it is)", k.dead_letter_topic,
                 len(found))
        return
    counts = {topic: len(consumer.partitions_for_topic(topic) or ()) for topic in (k.impressions_topic,
                                                                                    k.feedback_topic)}
    like = next((topic for topic, n in counts.items() if n), None)
    partitions = counts[like] if like else DEFAULT_PARTITIONS
    days = k.dead_letter_retention_days
    command = (f"'kafka-topics.sh --bootstrap-server {k.bootstrap} --create --topic {k.dead_letter_topic} --partitions "
               f"{partitions} --config retention.ms={retention_ms(days)}'")
    try:
        created = create_dead_letter_topic(k.bootstrap, k.dead_letter_topic, partitions, days,
                                           client_options=kafka_client_options(k))
    except CREATION_REFUSED as exc:
        raise DeadLetterTopicError(
            f"the dead-letter topic {k.dead_letter_topic} does not exist on {k.bootstrap} and Kafka refused to create "
            f"it ({type(exc).__name__}: {exc}); create it with {command}, or point kafka.dead_letter_topic at an "
            "existing topic", status=2) from exc
    except KafkaError as exc:
        raise DeadLetterTopicError(
            f"could not check or create the dead-letter topic {k.dead_letter_topic} on {k.bootstrap} "
            f"({type(exc).__name__}: {exc}); start again once Kafka answers, or create it with {command}",
            status=3) from exc
    if created:
        kept = "forever" if days == -1 else f"{days:g} days"
        source = f"as {like} has" if like else "the input topics do not exist yet: streamer.topics.DEFAULT_PARTITIONS"
        log.info("created the dead-letter topic %s: %d partitions (%s), dead letters kept %s "
                 "(kafka.dead_letter_retention_days)", k.dead_letter_topic, partitions, source, kept)


class KafkaClients(NamedTuple):
    """A trainer's clients: the consumer, the publications' idempotent producer and the dead letters' producer.

    The dead letters have their own producer, not idempotent: kafka-python (3.0.12) turns any batch an idempotent
    producer's broker refuses for good (a message over the topic's ``max.message.bytes``) into a fatal error of the
    producer, which then fails every later send, publications included, until the process ends; and a restart
    reads the same bad message again. Dead letters are at least once anyway (their headers name the source)."""

    consumer: KafkaConsumer
    producer: KafkaProducer
    dead_letter_producer: KafkaProducer

    def close(self, timeout_s: float = 10.0) -> None:
        """Close all three; a failure to close one is logged, never raised, and the others are still closed."""
        close_quietly("consumer", lambda: self.consumer.close(autocommit=False), log)
        close_quietly("producer", lambda: self.producer.close(timeout=timeout_s), log)
        close_quietly("dead-letter producer", lambda: self.dead_letter_producer.close(timeout=timeout_s), log)


def connect(k: KafkaConfig, *, group_member: bool = True) -> KafkaClients:
    """The trainer's consumer (group ``k.group_id``, static membership unless disabled, no auto-commit), its
    idempotent producer (publications) and its dead-letter producer (``KafkaClients``; record batches compressed
    with ``k.compression``); the dead-letter topic exists when it returns (``check_dead_letter_topic``). Raises
    ``kafka.errors.KafkaError`` when Kafka is away, ``DeadLetterTopicError`` when the dead-letter topic is missing
    and cannot be made.

    ``group_member=False`` (a rank of several, ``KafkaIO.assign_static``): the consumer never joins the group (no
    group_instance_id); it only commits its own partitions' offsets there, for lag dashboards."""
    options = kafka_client_options(k)  # raises ConfigError when a security setting is missing
    preflight(k.bootstrap, options)  # a wrong listener or a refused SASL login at once (kafka-python: 10 s)
    # Reconnect within seconds after a broker restart (kafka-python's default backs off up to 30 s).
    options.setdefault("reconnect_backoff_max_ms", 2000)
    # kafka-python rejoins the group when its metadata of the subscribed topics changes, but refreshes that metadata
    # only every metadata_max_age_ms (5 min by default): a group joined before the metadata arrived kept an empty
    # assignment for minutes (seen under load: no partition for 300 s, then exit 4). See also KafkaIO.stalled.
    options.setdefault("metadata_max_age_ms", 30_000)
    instance_id = f"{k.group_id}-trainer" if k.group_instance_id == "auto" else (k.group_instance_id or None)
    if instance_id is not None and group_member:
        options.setdefault("group_instance_id", instance_id)
    # Never create an input topic: one made by a metadata request (a typo'd name, a trainer started before the
    # streamer) gets the broker's default partition count, which can break co-partitioning and never shrinks.
    # A missing topic is waited for instead (KafkaIO.stalled says which, and how to create it).
    consumer = honour_auto_create(KafkaConsumer(
        bootstrap_servers=k.bootstrap, group_id=k.group_id, enable_auto_commit=False,
        auto_offset_reset="earliest", max_poll_records=k.max_poll_records,
        max_poll_interval_ms=k.max_poll_interval_ms,
        **{**client_options(options, KafkaConsumer.DEFAULT_CONFIG), "allow_auto_create_topics": False},
    ))
    # Nor any topic it produces to: the dead-letter and serving topics are made as they should be at start
    # (check_dead_letter_topic, check_model_topic); one made on request would get the broker's defaults.
    producers: list[KafkaProducer] = []
    try:
        for idempotent in (True, False):
            producers.append(new_producer(k, idempotent=idempotent))
        check_dead_letter_topic(k, consumer)
    except BaseException:
        consumer.close(autocommit=False)
        for producer in producers:
            producer.close(timeout=1)
        raise
    return KafkaClients(consumer, *producers)


def new_producer(k: KafkaConfig, *, idempotent: bool = True) -> KafkaProducer:
    """A trainer's producer (``connect`` makes both; ``Publisher.renew`` makes the publications' again after a
    fatal error): ``acks=all``, batches compressed with ``k.compression``, never a topic made on request (the
    dead-letter and serving topics are made as they should be at start: ``check_dead_letter_topic``,
    ``check_model_topic``; one made on request would get the broker's defaults)."""
    options = kafka_client_options(k)
    options.setdefault("reconnect_backoff_max_ms", 2000)  # reconnect within seconds after a broker restart
    # A send waits at most this long for metadata while the broker is away (kafka-python's default: 60 s),
    # so a checkpoint's publication, and a shutdown, are not held up for minutes.
    options = {"max_block_ms": 10_000, **options}
    if k.compression != "none":  # kafka.client_options' compression_type, where given, wins
        options.setdefault("compression_type", k.compression)
    return honour_auto_create(KafkaProducer(
        bootstrap_servers=k.bootstrap, acks="all", enable_idempotence=idempotent, linger_ms=5,
        max_request_size=16 * 1024 * 1024,
        **{**client_options(options, KafkaProducer.DEFAULT_CONFIG), "allow_auto_create_topics": False}))


class _Listener(ConsumerRebalanceListener):
    """Hands kafka-python's rebalance callbacks (called inside ``poll``, between records) to :class:`KafkaIO`."""

    def __init__(self, io: KafkaIO) -> None:
        self.io = io

    def on_partitions_revoked(self, revoked: list) -> None:
        self.io.on_revoked(list(revoked))

    def on_partitions_assigned(self, assigned: list) -> None:
        self.io.on_assigned(list(assigned))


class KafkaIO:
    """Positions, assignment, pausing and offsets of one trainer's consumer over ``topics``.

    ``join`` is the pipeline's join (told which partitions are assigned, read for event-time alignment);
    ``metrics`` receives consumer lag (None: a reader without metrics). ``max_skew_ms`` None disables pausing.
    """

    def __init__(self, consumer: Any, k: KafkaConfig, join: AttributionJoin, metrics: Any, *,
                 max_skew_ms: int | None = None, lateness_ms: int = 0) -> None:
        self.consumer = consumer
        self.k = k
        self.topics = [k.impressions_topic, k.feedback_topic]
        self.join = join
        self.metrics = metrics
        self.max_skew_ms = max_skew_ms
        self.lateness_ms = lateness_ms
        self.positions: dict[tuple[str, int], int] = {}  # next offset to process, per (topic, partition)
        self.checkpointed: dict[tuple[str, int], int] = {}  # the positions of the last checkpoint
        self.start_offsets: dict[tuple[str, int], int] = {}  # --from-time, for partitions without a position
        self.start_ms: int | None = None  # --from-time, for partitions assigned later (a topic made after the start)
        self.awaiting_start: set = set()  # such partitions, paused until their --from-time offset is looked up
        self.paused: set = set()
        self.partition_pauses = 0  # partitions paused so far (a partition paused twice counts twice)
        self.fenced = False  # another trainer with our group_instance_id took over (exit 5)
        self.revoked = False  # partitions were revoked: the loop checkpoints after this poll
        self.unreadable: str | None = None  # a record batch the client cannot decode (exit 7), said where
        self.first_assigned_at: float | None = None
        self.assigned_at: float | None = None  # the last assignment (the loop's idle clock restarts there)
        self.unassigned_since: float | None = None
        self._unassigned_warned_at: float | None = None
        self._fence_probed_at = time.monotonic()
        self._lag_exported_at = float("-inf")
        self._nudged_at = float("-inf")
        self._rejoined_at = float("-inf")
        self._subscribed_ms = float("-inf")
        self._metadata_backoff_ms: int | None = None  # the client's own pace, while a missing topic slows it down

    # ----------------------------------------------------------------------------------------- polling

    def subscribe(self, start_ms: int | None = None) -> None:
        """Subscribe to the topics; with ``start_ms`` (``--from-time``), partitions without a position start at
        the first record stamped at or after it."""
        self.start_ms = start_ms
        if start_ms is not None:
            self.start_offsets = self.offsets_at(start_ms)
        self._subscribed_ms = time.monotonic() * 1000  # metadata older than this may not list the topics yet
        self.consumer.subscribe(self.topics, listener=_Listener(self))

    def assign_static(self, rank: int, world_size: int, start_ms: int | None = None) -> list[tuple[str, int]]:
        """A rank's own partitions, assigned by hand (no group rebalances): p mod ``world_size`` == ``rank`` on both
        topics, which must have as many partitions as each other and at least ``world_size``. Seeks them like an
        assignment does (``start_ms``: ``--from-time``); returns them. Raises ``ValueError`` saying what to change."""
        counts = {}
        for topic in self.topics:
            found = self.consumer.partitions_for_topic(topic)
            if not found:
                raise ValueError(f"topic {topic} does not exist on {self.k.bootstrap} (create it with as many "
                                 "partitions as the other topic, e.g. 'crossdistil kafka up --partitions N')")
            counts[topic] = len(found)
        impressions, feedback = (counts[t] for t in self.topics)
        if impressions != feedback:
            raise ValueError(f"{self.topics[0]} has {impressions} partitions and {self.topics[1]} {feedback}: several "
                             "ranks need co-partitioned topics (the same partition count, keyed by user) so that each "
                             "rank's join sees an impression's feedback; repartition one of them")
        if impressions < world_size:
            raise ValueError(f"{world_size} ranks need at least {world_size} partitions per topic, "
                             f"{self.topics[0]} has {impressions}: add partitions (kafka-topics --alter --partitions) "
                             "or run fewer ranks")
        self.start_ms = start_ms
        if start_ms is not None:
            self.start_offsets = self.offsets_at(start_ms)
        owned = owned_partitions(impressions, rank, world_size)
        partitions = [TopicPartition(topic, p) for topic in self.topics for p in owned]
        self.consumer.assign(partitions)
        self.on_assigned(partitions)
        return [(tp.topic, tp.partition) for tp in partitions]

    def poll(self, timeout_ms: int) -> dict:
        """One poll (``{TopicPartition: [records]}``); every ``FENCE_PROBE_S`` the checkpointed positions are
        re-committed so a takeover is noticed (``fenced``). Partitions assigned during it that wait for their
        ``--from-time`` offset (``awaiting_start``) are sought there and resumed after it."""
        started = time.monotonic()
        try:
            polled = self.consumer.poll(timeout_ms=timeout_ms, max_records=self.k.max_poll_records)
        except FencedInstanceIdError:
            self.fenced, polled = True, {}
        except (UnsupportedCodecError, CorruptRecordError) as exc:
            self.unreadable, polled = self._unreadable(exc), {}
        if self.awaiting_start:
            self.start_late_partitions()
        if started - self._fence_probed_at >= FENCE_PROBE_S and self.checkpointed:
            self._fence_probed_at = started
            self.commit(self.checkpointed)
        if started - self._lag_exported_at >= LAG_EXPORT_S:
            self._lag_exported_at = started
            self.export_lag()
        return polled

    def export_lag(self) -> None:
        """Set the consumer lag gauge: per assigned partition, its high watermark (as the last fetch saw it: no
        network call) minus the next offset to read. Live, unlike the group's committed offsets, which move only
        when a checkpoint is durable; a partition not fetched yet is left out. Nothing without ``metrics``."""
        if self.metrics is None:
            return
        lag = {}
        for tp in self.consumer.assignment():
            high = self.consumer.highwater(tp)
            if high is not None:
                lag[(tp.topic, tp.partition)] = max(0, high - self.positions.get((tp.topic, tp.partition), 0))
        self.metrics.consumer_lag(lag)

    def _unreadable(self, error: Exception) -> str:
        """Where the batch the client could not decode is (topic, partition, offset), and what to do about it.

        Not dead-lettered: the client hands out no bytes of a batch it cannot decompress or whose checksum
        fails, so there is nothing to dead-letter, and skipping it would lose every event in it without a trace.
        """
        parsing = getattr(getattr(self.consumer, "_fetcher", None), "_next_partition_records", None)
        tp = getattr(parsing, "topic_partition", None)
        if tp is not None:
            offset = getattr(parsing, "next_fetch_offset", self.positions.get((tp.topic, tp.partition), 0))
            where = f"{tp.topic}-{tp.partition} at offset {offset}"
        else:
            behind = [f"{t}-{p} (from offset {o})" for (t, p), o in sorted(self.positions.items())
                      if self._may_fetch_more(TopicPartition(t, p))]
            where = "one of " + ", ".join(behind) if behind else "an assigned partition"
        if isinstance(error, UnsupportedCodecError):
            fix = ("install the codec libraries (zstandard, lz4, python-snappy: 'pip install crossdistil' brings "
                   "them) and restart")
        else:
            fix = ("the batch is damaged on the broker or in transit: restart to fetch it again; if it fails again, "
                   "inspect it (kafka-dump-log) and move the group past it only once its events are recovered")
        return f"cannot read the record batch of {where}: {error}. {fix}"

    def caught_up(self) -> bool:
        """Every assigned partition is at its last known high watermark (no network call)."""
        assigned = self.consumer.assignment()
        return bool(assigned) and not any(self._may_fetch_more(tp) for tp in assigned)

    def at_end(self) -> bool:
        """Every assigned partition is read to its end offset, as the broker says now (False when it cannot)."""
        assigned = self.consumer.assignment()
        if not assigned:
            return False
        try:
            end = self.consumer.end_offsets(list(assigned), timeout_ms=5000)
        except Exception as exc:  # broker away: certainly not "finished"
            log.info("end offsets unavailable (%s); not treating the stream as finished", exc)
            return False
        return all(self.positions.get((tp.topic, tp.partition), 0) >= end[tp] for tp in assigned)

    def _may_fetch_more(self, tp: Any) -> bool:
        """The partition is not known to be read to its end (its high watermark is unknown before a fetch)."""
        high = self.consumer.highwater(tp)
        return high is None or self.positions.get((tp.topic, tp.partition), 0) < high

    # --------------------------------------------------------------------------------------- alignment

    def align(self) -> None:
        """Pause the partitions more than ``max_skew_ms`` of event time ahead of the slowest one; resume them once
        it catches up.

        Kafka hands out bytes per partition, not event time: on a backlog, the feedback topic (small events)
        runs far ahead of the impressions, and the join holds every early feedback until its impression comes
        (190k-223k of them over a 1M-event replay in bench/trainer_throughput.py without this). Never waits on
        itself: when no partition that is not ahead has anything left to fetch, every partition is resumed.
        """
        if self.max_skew_ms is None:
            return
        release_drained_records(self.consumer)
        assigned = self.consumer.assignment()
        watermark = self.join.watermark_ms
        ahead: set = set()
        if watermark is not None and assigned:
            limit = watermark + self.lateness_ms + self.max_skew_ms
            for tp in assigned:
                newest = self.join.source_max_ts((tp.topic, tp.partition))
                if newest is not None and newest > limit:
                    ahead.add(tp)
            if not any(self._may_fetch_more(tp) for tp in assigned if tp not in ahead):
                ahead = set()
        if ahead != self.paused:
            if self.paused - ahead:
                self.consumer.resume(*(self.paused - ahead))
            if ahead - self.paused:
                self.consumer.pause(*(ahead - self.paused))
                self.partition_pauses += len(ahead - self.paused)
            log.debug("paused (ahead in event time): %s", sorted(f"{tp.topic}-{tp.partition}" for tp in ahead))
            self.paused = ahead

    # --------------------------------------------------------------------------------------- rebalance

    def on_assigned(self, partitions: list) -> None:
        """Seek every newly assigned partition to its position (else ``--from-time``'s offset, else its beginning).

        A partition unknown when the trainer started with ``--from-time`` (its topic was made later, or partitions
        were added) has no offset for the time yet: it is paused (``awaiting_start``) and sought there after the poll
        (``start_late_partitions``), not here: kafka-python calls this inside ``poll``, where a blocking lookup would
        stall the group protocol."""
        now = time.monotonic()
        self.paused = {tp for tp in self.paused if tp in self.consumer.assignment() and tp not in partitions}
        if self.first_assigned_at is None:
            self.first_assigned_at = now
        self.assigned_at = now
        for tp in partitions:
            key = (tp.topic, tp.partition)
            position = self.positions.get(key)
            if position is None and key in self.start_offsets:
                # Recorded as the partition's position: the next checkpoint keeps the --from-time start, so a
                # restart (with or without the flag) never goes back to the beginning.
                position = self.positions[key] = self.start_offsets[key]
            if position is None and self.start_ms is not None:
                self.awaiting_start.add(tp)
            elif position is None:
                self.consumer.seek_to_beginning(tp)
            else:
                self.consumer.seek(tp, position)
        self.awaiting_start &= self.consumer.assignment()
        if self.awaiting_start:
            self.consumer.pause(*self.awaiting_start)  # no record of theirs is fetched before the seek
        self.join.assign([(tp.topic, tp.partition) for tp in self.consumer.assignment()], now)
        log.info("assigned %s", sorted(f"{tp.topic}-{tp.partition}" for tp in partitions))

    def on_revoked(self, partitions: list) -> None:
        """Ask for a checkpoint before going on (taken by the loop, not here: see the module docstring)."""
        if partitions:
            self.revoked = True

    def stalled(self, now: float) -> bool:
        """True once no partition has been assigned for ``kafka.stall_exit_s`` (0 disables the check).

        While it waits it says why every 30 s, from 15 s on, or at once when the broker said that a topic does not
        exist (the trainer never creates one: ``connect``; it reads a topic from the assignment after it is made).
        """
        if self.consumer.assignment():
            self.unassigned_since = self._unassigned_warned_at = None
            self._pace_metadata(missing=False)
            return False
        if self.unassigned_since is None:
            self.unassigned_since = now
        self._pace_metadata(missing=self._metadata_since_subscribing() and bool(self.missing_topics_hint()))
        waited = now - self.unassigned_since
        if waited >= METADATA_NUDGE_S and now - self._nudged_at >= METADATA_NUDGE_S:
            # The usual reason for no assignment is a group joined before the topics' metadata was known: fresh
            # metadata makes kafka-python rejoin with the partitions (the client's cached view, no blocking call).
            self._nudged_at = now
            cluster = getattr(self.consumer, "_cluster", None)
            if cluster is not None and hasattr(cluster, "request_update"):
                cluster.request_update()
        if waited >= REJOIN_AFTER_S and now - self._rejoined_at >= REJOIN_AFTER_S:
            self._rejoin_if_topics_have_partitions(now, waited)
        warned = self._unassigned_warned_at
        first, every = UNASSIGNED_WARN_S
        if warned is None or now - warned >= every:
            hint = self.missing_topics_hint() if waited >= first or self._metadata_since_subscribing() else ""
            if waited >= first or hint:
                self._unassigned_warned_at = now
                log.warning("no partition assigned after %.0f s%s", waited, hint)
        limit = self.k.stall_exit_s
        return bool(limit) and waited >= limit

    def _rejoin_if_topics_have_partitions(self, now: float, waited: float) -> None:
        """Ask kafka-python to rejoin the group when its metadata lists partitions of every subscribed topic.

        Fresh metadata is not always enough: kafka-python 3.0.12 rejoins only when the metadata differs from the
        snapshot it took when the leader assigned, and a leader that assigned before the topics' partitions were
        in its metadata (its log says "No partition metadata for topic ...") can hold the same snapshot, so it kept
        an empty assignment until ``kafka.stall_exit_s`` (seen in CI: 225 s, then the test's timeout). A rejoin
        makes the leader assign again with the partitions it now knows. A trainer's group has one member (a second
        trainer takes over, exit 5), so an empty assignment while the topics have partitions is never meant."""
        cluster = getattr(self.consumer, "_cluster", None)
        coordinator = getattr(self.consumer, "_coordinator", None)
        if cluster is None or not hasattr(coordinator, "request_rejoin"):
            return  # another client version without these internals
        try:
            known = all(cluster.partitions_for_topic(topic) for topic in self.topics)
        except Exception:  # no metadata yet
            return
        if known:
            log.warning("no partition assigned after %.0f s although %s have partitions: rejoining the group",
                        waited, " and ".join(self.topics))
            self._rejoined_at = now
            coordinator.request_rejoin()

    def _pace_metadata(self, missing: bool) -> None:
        """Metadata every ``MISSING_TOPIC_METADATA_MS`` while an input topic is missing (``set_metadata_retry_ms``),
        at the client's own pace again once none is."""
        if missing and self._metadata_backoff_ms is None:
            self._metadata_backoff_ms = set_metadata_retry_ms(self.consumer, MISSING_TOPIC_METADATA_MS)
        elif not missing and self._metadata_backoff_ms is not None:
            set_metadata_retry_ms(self.consumer, self._metadata_backoff_ms)
            self._metadata_backoff_ms = None

    def _metadata_since_subscribing(self) -> bool:
        """Whether the client's metadata was refreshed after the subscription, so that it would list the topics.

        Before (the bootstrap's answer lists no topic, seen at every start) a topic is not known to be missing.
        kafka-python 3 keeps the refresh time without a public accessor; without it, False (the 15 s rule)."""
        refreshed = getattr(getattr(self.consumer, "_cluster", None), "_last_successful_refresh_ms", None)
        return isinstance(refreshed, (int, float)) and refreshed > self._subscribed_ms

    def missing_topics_hint(self) -> str:
        """``"; topic(s) ... do not exist ..."`` (naming them and how to create them) when the broker's metadata
        lacks subscribed topics, else ``""`` (also before any metadata came: nothing is known then)."""
        # The client's cached metadata, not consumer.topics(): that one waits for the broker without a timeout.
        cluster = getattr(self.consumer, "_cluster", None)
        try:
            if cluster is not None and not cluster.brokers():
                return ""  # no metadata yet: every topic would look missing
            existing = cluster.topics() if cluster is not None else self.consumer.topics()
        except Exception:  # no metadata yet: nothing to add
            return ""
        missing = [t for t in self.topics if t not in existing]
        if not missing:
            return ""
        present = [t for t in self.topics if t not in missing]
        found = cluster.partitions_for_topic(present[0]) if present and cluster is not None else None
        n, like = (str(len(found)), f" (as {present[0]} has)") if found else ("N", "")
        return (f"; topic(s) {', '.join(missing)} do not exist on {self.k.bootstrap}. The trainer never creates its "
                "input topics (one made on request would get the broker's default partition count, which may break "
                "co-partitioning and can never shrink) and reads them as soon as they exist: create them with "
                f"{n} partitions{like}, e.g. 'kafka-topics.sh --bootstrap-server {self.k.bootstrap} --create --topic "
                f"{missing[0]} --partitions {n}' ('crossdistil stream' and 'crossdistil kafka up --partitions {n}' "
                "create the topics they use), or point kafka.impressions_topic / kafka.feedback_topic at existing "
                "ones")

    # ----------------------------------------------------------------------------------------- offsets

    def offsets_at(self, start_ms: int) -> dict[tuple[str, int], int]:
        """``--from-time``: per partition without a position, the first offset stamped at or after ``start_ms``
        (the end offset when no record is that recent)."""
        known = {topic: sorted(self.consumer.partitions_for_topic(topic) or ()) for topic in self.topics}
        if not all(known.values()):
            log.info("--from-time: topic(s) %s do not exist yet; once made, their partitions start at the time too",
                     ", ".join(t for t, found in known.items() if not found))
        wanted = [TopicPartition(topic, p) for topic, found in known.items() for p in found
                  if (topic, p) not in self.positions]
        if not wanted:
            log.info("--from-time: every known partition resumes from the checkpoint; the time is not used")
            return {}
        offsets = self._offsets_for_time(wanted, start_ms)
        log.info("--from-time %d: partitions without a checkpointed position start at %s", start_ms,
                 {f"{t}-{p}": o for (t, p), o in sorted(offsets.items())})
        return offsets

    def _offsets_for_time(self, partitions: list, start_ms: int) -> dict[tuple[str, int], int]:
        """Per partition, the first offset stamped at or after ``start_ms`` (the end offset when none is)."""
        found = self.consumer.offsets_for_times({tp: start_ms for tp in partitions})
        missing = [tp for tp in partitions if found.get(tp) is None]
        ends = self.consumer.end_offsets(missing) if missing else {}
        return {(tp.topic, tp.partition): (found[tp].offset if found.get(tp) is not None else ends[tp])
                for tp in partitions}

    def start_late_partitions(self) -> None:
        """Seek the partitions that wait for their ``--from-time`` offset (``on_assigned``) there, and resume them;
        recorded as their positions, as at the start. When Kafka cannot say now, they stay paused until the next
        poll asks again."""
        waiting = sorted(self.awaiting_start & self.consumer.assignment())
        self.awaiting_start = set(waiting)
        if not waiting:
            return
        try:
            offsets = self._offsets_for_time(waiting, self.start_ms)
        except KafkaError as exc:
            log.warning("--from-time: the offsets of %s could not be looked up (%s); asked again after the next poll",
                        ", ".join(f"{tp.topic}-{tp.partition}" for tp in waiting), exc)
            return
        for tp in waiting:
            self.positions[(tp.topic, tp.partition)] = offsets[(tp.topic, tp.partition)]
            self.consumer.seek(tp, offsets[(tp.topic, tp.partition)])
        self.consumer.resume(*waiting)
        self.awaiting_start = set()
        log.info("--from-time %d: partitions assigned after the start begin at %s", self.start_ms,
                 {f"{t}-{p}": o for (t, p), o in sorted(offsets.items())})

    def commit(self, positions: Mapping[tuple[str, int], int] | None = None) -> None:
        """Commit ``positions`` (default: the current ones, just checkpointed) for lag dashboards
        (``kafka-consumer-groups.sh --describe``), and export the consumer lag (``export_lag``).

        A commit refused with FencedInstanceIdError means another trainer with this ``group_instance_id`` took
        the partitions over (kafka-python only disables its heartbeat then): ``fenced`` is set, and the loop
        exits with status 5 before writing anything else.
        """
        positions = self.positions if positions is None else positions
        assigned = self.consumer.assignment()
        offsets = {TopicPartition(t, p): OffsetAndMetadata(o, "", -1) for (t, p), o in positions.items()
                   if TopicPartition(t, p) in assigned}
        self.export_lag()
        if not offsets:
            return
        try:
            self.consumer.commit(offsets, timeout_ms=5000)  # bounded: a broker away must not hold up a shutdown
        except FencedInstanceIdError:
            self.fenced = True
        except Exception as exc:  # only for lag dashboards: the checkpoint already holds the truth
            log.warning("committing offsets to Kafka failed (lag metrics only, training unaffected): %s", exc)
