"""Where streamed events go: a Kafka cluster or an event-log file. Both take ``(topic, key, event)``.

``open_sink("kafka://HOST:PORT" | "file://PATH", envelope=N)`` picks one. A sink validates every event
against the contract (``streamer.events``) before it leaves, so a bad adapter fails at the first bad event.

Kafka: one message per event keyed by the user id (UTF-8); with ``envelope`` N > 1, up to N events of one
(topic, partition) travel in one ``{"v": 1, "batch": [...]}`` message sent to that partition with no key (an
envelope mixes users; each event's partition is still the one its user id hashes to, with Kafka's default
murmur2 partitioner, so a user's events stay on one partition number across topics). An envelope larger than
its topic's ``max.message.bytes`` (read at start; Kafka's default is 1 MiB) is sent as two halves, as often as it
takes: the broker would refuse it for good, and kafka-python's idempotent producer then fails every later send.
Event logs: always one record per event, whatever ``envelope`` says (the record keeps the event's key). The log
is written to ``PATH.<pid>.partial`` beside PATH and renamed to PATH only by ``close()``; ``abort()`` removes it. So
PATH holds a whole log or what it held before, never the first part of a stream that failed or was stopped.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from streamer import events
from streamer.eventlog import EventLogError, EventLogWriter, path_from_url
from streamer.kafka_security import PreflightError, connection_failure, diagnose_connection, preflight
from streamer.topics import ensure_topics, topic_configs

BOOTSTRAP_TIMEOUT_MS = 10_000
MAX_REQUEST_BYTES = 16 << 20  # a batch envelope may be up to 16 MiB (streamer.events.Limits.max_batch_bytes)
ENVELOPE_MAX_WAIT_S = 1.0  # a part-filled envelope waits at most this long (matters at real-time speed)
RECORD_OVERHEAD_BYTES = 1024  # a record batch's header and one record's framing, within max.message.bytes


class SinkError(RuntimeError):
    """A sink cannot take events: an unreachable broker, a failed delivery, an unwritable file."""


class Sink(Protocol):
    """Takes events with their topic and key; ``close()`` delivers everything or raises ``SinkError``; ``abort()``
    ends a stream that failed.

    ``checks_each_event``: True when ``write`` raises ``EventError`` for the very event it is given (False when
    events wait in an envelope that is checked when it is sent, so an error names ``batch[i]`` of it instead).
    """

    bytes_written: int
    messages: int
    checks_each_event: bool

    def write(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        """Queue or write one event."""
        ...

    def idle(self) -> None:
        """Called while the streamer waits (real-time speed): deliver anything that should not wait longer."""
        ...

    def close(self) -> None:
        """Deliver everything still queued, surface any delivery error, release resources."""
        ...

    def abort(self) -> None:
        """The stream failed or was stopped: keep nothing that would pass for a whole stream. Never raises."""
        ...


def not_reachable(bootstrap: str) -> str:
    """The message for a broker that does not answer."""
    return f"Kafka at {bootstrap} is not reachable; start one with 'crossdistil kafka up' or check --to"


class KafkaSink:
    """Produces events with kafka-python (acks=all, idempotent, lingering batches); errors are raised, not lost."""

    def __init__(self, bootstrap: str, topics: tuple[str, ...], envelope: int = 1,
                 producer_config: Mapping[str, Any] | None = None) -> None:
        from kafka import KafkaProducer
        from kafka.errors import KafkaError

        self.bootstrap = bootstrap
        self.envelope = max(1, int(envelope))
        self.bytes_written = 0
        self.messages = 0
        self._errors: list[BaseException] = []
        self._buffers: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._buffer_since: dict[tuple[str, int], float] = {}
        self._partitions: dict[str, int] = {}
        config = {
            "bootstrap_servers": bootstrap,
            "acks": "all",
            "enable_idempotence": True,  # retries keep order and never duplicate
            "linger_ms": 20,
            "batch_size": 512 * 1024,
            "max_request_size": MAX_REQUEST_BYTES,
            "bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS,
            "client_id": "crossdistil-stream",
            **(producer_config or {}),
        }
        self.split_envelopes = 0  # envelopes sent as halves to fit their topic's max.message.bytes
        try:
            preflight(bootstrap, config)  # a wrong listener or a refused SASL login at once (kafka-python: 10 s)
            self._producer = KafkaProducer(**config)
            self._ensure_topics(topics, dict(producer_config or {}))
            self._max_bytes = self._message_limits(topics, dict(producer_config or {}))
            if self._max_bytes and min(self._max_bytes.values()) < config["batch_size"]:
                # a record batch (several messages of one partition) must fit the limit too: a producer of
                # smaller batches, made before anything was sent
                self._producer.close(timeout=1)
                self._producer = KafkaProducer(**{**config, "batch_size": max(1, min(self._max_bytes.values()))})
        except PreflightError as exc:
            raise SinkError(connection_failure(bootstrap, config, exc)) from exc
        except KafkaError as exc:
            diagnosis = diagnose_connection(bootstrap, config)  # one probe of the broker, for either message
            if not config.get("security_protocol") and diagnosis.startswith("nothing"):
                raise SinkError(f"{not_reachable(bootstrap)} ({type(exc).__name__})") from exc
            raise SinkError(connection_failure(bootstrap, config, exc, diagnosis, hint="check --to")) from exc

    @property
    def checks_each_event(self) -> bool:
        """Single events are checked as they are written; an envelope's events when it is sent."""
        return self.envelope == 1

    def _ensure_topics(self, topics: tuple[str, ...], client_options: dict[str, Any]) -> None:
        impressions, feedback = topics
        try:
            ensure_topics(self.bootstrap, impression_topic=impressions, feedback_topic=feedback,
                          client_options=client_options)
        except Exception as exc:
            self._producer.close(timeout=1)
            raise SinkError(f"could not create topics {', '.join(topics)} on Kafka at {self.bootstrap}: {exc}") from exc

    def _message_limits(self, topics: tuple[str, ...], client_options: dict[str, Any]) -> dict[str, int]:
        """Each topic's ``max.message.bytes`` less a record's framing; a topic whose setting Kafka does not say is
        left out (its envelopes are sent whole)."""
        from kafka.errors import KafkaError

        try:
            found = topic_configs(self.bootstrap, topics, ("max.message.bytes",), client_options=client_options)
        except KafkaError:  # not authorised to describe them: the envelope size is the user's to choose
            return {}
        return {topic: int(configs["max.message.bytes"]) - RECORD_OVERHEAD_BYTES
                for topic, configs in found.items() if "max.message.bytes" in configs}

    def _partition_of(self, topic: str, key: bytes) -> int:
        from kafka.partitioner.default import murmur2

        if topic not in self._partitions:
            deadline = time.monotonic() + 30
            while not (parts := self._producer.partitions_for(topic)):
                if time.monotonic() > deadline:
                    raise SinkError(f"no partition metadata for topic {topic} on Kafka at {self.bootstrap}")
                time.sleep(0.1)
            self._partitions[topic] = len(parts)
        # Kafka's default partitioner for keyed messages (kafka-python's DefaultPartitioner, the Java client's too)
        return (murmur2(key) & 0x7FFFFFFF) % self._partitions[topic]

    def _on_error(self, exc: BaseException) -> None:
        self._errors.append(exc)

    def _raise_delivery_errors(self) -> None:
        if self._errors:
            first = self._errors[0]
            raise SinkError(f"{len(self._errors)} event(s) were not delivered to Kafka at {self.bootstrap}; "
                            f"first error: {type(first).__name__}: {first}")

    def _send(self, topic: str, value: bytes, key: bytes | None, partition: int | None = None) -> None:
        self._raise_delivery_errors()
        limit = self._max_bytes.get(topic)
        if limit is not None and len(value) > limit:  # one event: refused for good, and the producer with it
            raise SinkError(f"an event of {len(value):,} bytes is over topic {topic}'s max.message.bytes "
                            f"({limit + RECORD_OVERHEAD_BYTES:,}, less {RECORD_OVERHEAD_BYTES} bytes of framing): "
                            "raise it, or make the events smaller")
        future = self._producer.send(topic, value=value, key=key, partition=partition)
        future.add_errback(self._on_error)
        self.bytes_written += len(value) + (len(key) if key else 0)
        self.messages += 1

    def write(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        """Send one event (or add it to its partition's envelope)."""
        key_bytes = key.encode("utf-8")
        if self.envelope == 1:
            self._send(topic, events.encode(event), key_bytes)
            return
        # encode_batch validates every event when the envelope is sent (its errors name batch[i])
        slot = (topic, self._partition_of(topic, key_bytes))
        buffer = self._buffers.setdefault(slot, [])
        if not buffer:
            self._buffer_since[slot] = time.monotonic()
        buffer.append(dict(event))
        if len(buffer) >= self.envelope:
            self._flush_envelope(slot)

    def _flush_envelope(self, slot: tuple[str, int]) -> None:
        batch = self._buffers.pop(slot, None)
        if batch:
            self._send_envelope(slot, batch)

    def _send_envelope(self, slot: tuple[str, int], batch: list[dict[str, Any]]) -> None:
        """One envelope of ``batch``, or its two halves (in order) when it is over its topic's message limit."""
        value = events.encode_batch(batch)
        if len(batch) > 1 and len(value) > self._max_bytes.get(slot[0], len(value)):
            self.split_envelopes += 1
            half = len(batch) // 2
            self._send_envelope(slot, batch[:half])
            self._send_envelope(slot, batch[half:])
            return
        self._send(slot[0], value, None, partition=slot[1])

    def idle(self) -> None:
        """Send part-filled envelopes that have waited longer than ``ENVELOPE_MAX_WAIT_S``."""
        now = time.monotonic()
        for slot in [s for s in self._buffers if now - self._buffer_since[s] > ENVELOPE_MAX_WAIT_S]:
            self._flush_envelope(slot)

    def close(self) -> None:
        """Send the remaining envelopes, flush, and raise ``SinkError`` if any delivery failed."""
        try:
            for slot in list(self._buffers):
                self._flush_envelope(slot)
            self._producer.flush()
            self._raise_delivery_errors()
        finally:
            self._producer.close()

    def abort(self) -> None:
        """Nothing to undo: what was sent stays in its topics, and the producer still delivers what it queued
        (kafka-python flushes it when the process exits)."""


class FileSink:
    """Writes an event log (``streamer.eventlog``): one validated {topic, key, event} record per event.

    Records go to ``PATH.<pid>.partial`` in PATH's folder; ``close()`` renames it to PATH (replacing a file there
    at once), ``abort()`` removes it. A FIFO or device at PATH (``/dev/stdout``) is written directly.
    """

    checks_each_event = True

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise EventLogError(f"{self.path} is a folder")
        if not self.path.parent.is_dir():
            raise EventLogError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        direct = self.path.exists() and not self.path.is_file()  # nothing to rename into a FIFO or a device
        self._partial = None if direct else self.path.with_name(f"{self.path.name}.{os.getpid()}.partial")
        self._log = EventLogWriter(self._partial or self.path)
        self.messages = 0

    @property
    def bytes_written(self) -> int:
        """Bytes written to the file so far."""
        return self._log.bytes_written

    def write(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        """Validate and append one record."""
        self._log.write(topic, key, events.validate(event))
        self.messages += 1

    def idle(self) -> None:
        """Nothing waits in a file sink."""

    def close(self) -> None:
        """Close the file and move it to PATH."""
        self._log.close()
        if self._partial is not None:
            os.replace(self._partial, self.path)

    def abort(self) -> None:
        """Close and remove the partial file; PATH keeps what it held before."""
        try:
            self._log.close()
        except OSError:
            pass  # a failed flush (a full disk): the file goes anyway
        if self._partial is not None:
            self._partial.unlink(missing_ok=True)


def open_sink(to: str, topics: tuple[str, str], envelope: int = 1,
              producer_config: Mapping[str, Any] | None = None) -> Sink:
    """``kafka://HOST:PORT`` -> ``KafkaSink`` (``producer_config``: extra kafka-python producer settings, e.g.
    security, ``compression_type``); ``file://PATH`` -> ``FileSink`` (envelopes are a Kafka matter)."""
    if to.startswith("kafka://"):
        bootstrap = to[len("kafka://"):].rstrip("/")
        if not bootstrap:
            raise SinkError("--to kafka://HOST:PORT needs a host and port")
        return KafkaSink(bootstrap, topics, envelope=envelope, producer_config=producer_config)
    if to.startswith("file://"):
        try:
            return FileSink(str(path_from_url(to)))
        except (OSError, ValueError) as exc:
            raise SinkError(f"cannot write the event log {to}: {exc}") from exc
    raise SinkError(f"--to {to!r} must be kafka://HOST:PORT or file://PATH")
