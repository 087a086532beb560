"""The dead-letter queue: every event ``streamer.events.decode_events`` refuses goes to ``kafka.dead_letter_topic``.

Each dead letter is produced with the same key as its source message and:

* value: the raw bytes of the source message when the message is bad as a whole (``not_msgpack``,
  ``too_large``, a malformed envelope, ...), or the bad inner event re-packed with msgpack when only one event
  of a batch envelope is bad (so the good events of the envelope are not dead-lettered twice);
* headers (UTF-8 values): ``dl.reason`` (the reason code of ``EventError``, e.g. ``missing_field``),
  ``dl.error`` (the human sentence), ``dl.field`` (dotted field path or empty), ``dl.source.topic``,
  ``dl.source.partition``, ``dl.source.offset`` (decimal), ``dl.index`` (position inside the envelope, or
  empty for a whole message).

A dead letter stays pending until Kafka acknowledges it. The trainer flushes the queue before every checkpoint
and skips the checkpoint while any is unacknowledged, so none is lost: after a crash the replayed range may
dead-letter some messages again (at least once; (source topic, partition, offset, index) identifies them).
While the producer cannot get the topic's metadata (the broker away, the topic deleted), one send waits for it
(``max_block_ms``) and the dead letters after it wait in the queue, unsent, until the next flush: a burst of bad
events costs one wait, not one per event.

A dead letter Kafka refuses for its size (the dead-letter topic's ``max.message.bytes`` below the input topic's,
or the headers taking a message at the limit over it) would hold back every checkpoint for good; it is sent again
cut to its first ``TRUNCATED_BYTES`` bytes with the header ``dl.truncated`` (the value's full length), then, if
still refused, with an empty value and ``dl.error`` cut short. Its ``dl.source.*`` headers still name the
message, which stays in the input topic for its retention.

>>> from streamer.events import EventError
>>> error = EventError("missing field 'user_id'", reason="missing_field", field="user_id")
>>> [name for name, _ in dead_letter_headers(error, "impressions", 3, 41)][:3]
['dl.reason', 'dl.error', 'dl.field']
"""

from __future__ import annotations

import logging
from typing import Any

import msgpack
from kafka.errors import KafkaError, KafkaTimeoutError, MessageSizeTooLargeError, RecordListTooLargeError

from streamer.events import EventError

log = logging.getLogger("crossdistil.trainer")

TRUNCATED_BYTES = 64 * 1024  # what is kept of a dead letter's value that Kafka refused for its size
SIZE_ERRORS = (MessageSizeTooLargeError, RecordListTooLargeError)


def dead_letter_headers(error: EventError, topic: str, partition: int, offset: int) -> list[tuple[str, bytes]]:
    """The headers of one dead letter (documented in the module docstring)."""
    return [
        ("dl.reason", str(error.reason or "invalid").encode()),
        ("dl.error", str(error).encode("utf-8", "replace")[:4096]),
        ("dl.field", (error.field or "").encode("utf-8", "replace")),
        ("dl.source.topic", topic.encode()),
        ("dl.source.partition", str(partition).encode()),
        ("dl.source.offset", str(offset).encode()),
        ("dl.index", b"" if error.index is None else str(error.index).encode()),
    ]


class DeadLetterQueue:
    """Dead letters handed to ``producer`` for ``topic``, each kept until Kafka acknowledges it.

    ``add(error, record, topic, partition)`` sends one; ``flush()`` is True once every one so far is
    acknowledged; ``pending`` counts the others.
    """

    def __init__(self, producer: Any, topic: str) -> None:
        self.producer = producer
        self.topic = topic
        self._pending: list[list[Any]] = []  # [future or None, message]
        self._blocked = False  # a send found no metadata since the last flush: the next ones wait for a flush

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, error: EventError, record: Any, topic: str, partition: int) -> None:
        """Dead-letter ``error``, one bad event of ``record`` (a kafka-python ``ConsumerRecord``) of
        ``topic``/``partition``."""
        value = record.value if isinstance(record.value, bytes) else b""
        if error.index is not None and error.event is not None:
            try:
                value = msgpack.packb(error.event, use_bin_type=True)
            except (TypeError, ValueError, OverflowError):
                pass  # keep the whole message: the bad event cannot be re-packed on its own
        message = {"key": record.key, "value": value,
                   "headers": dead_letter_headers(error, topic, partition, record.offset)}
        self._pending.append([None if self._blocked else self._send(message), message])

    def _send(self, message: dict) -> Any:
        """Hand one dead letter to the producer; its future, or None when the producer refused it (broker away:
        no metadata within ``max_block_ms``). Either way it stays pending until Kafka acknowledges it; after no
        metadata, the next ones are not handed over before the next flush (each would wait as long)."""
        try:
            return self.producer.send(self.topic, **message)
        except SIZE_ERRORS as exc:  # over the producer's max_request_size
            if _shrink(message, exc):
                return self._send(message)
            log.warning("dead letter refused for its size even cut short (%s); it is retried before the next "
                        "checkpoint", exc)
            return None
        except KafkaTimeoutError as exc:
            self._blocked = True
            log.warning("dead letter not handed to Kafka yet (%s); it and the next ones wait in the queue and are "
                        "retried before the next checkpoint", exc)
            return None
        except KafkaError as exc:
            log.warning("dead letter not handed to Kafka yet (%s); it is retried before the next checkpoint", exc)
            return None

    def flush(self, timeout_s: float = 30.0) -> bool:
        """True once Kafka acknowledged every dead letter so far. Refused or failed ones are sent again (once per
        call), so a broker outage delays checkpoints instead of disabling them; until then a crash replays their
        records and dead-letters them again (at least once, never lost)."""
        if not self._pending:
            return True
        for attempt in range(2):
            if attempt:
                self._blocked = False
                for entry in self._pending:  # after a send without metadata, the rest wait for the next flush
                    refused = entry[0] is not None and entry[0].is_done and entry[0].failed()
                    if refused and isinstance(entry[0].exception, SIZE_ERRORS):  # by the broker, for its size
                        _shrink(entry[1], entry[0].exception)
                    entry[0] = None if self._blocked else self._send(entry[1])
            try:
                self.producer.flush(timeout=timeout_s)
            except KafkaError as exc:
                log.warning("flushing dead letters: %s", exc)
            self._pending = [entry for entry in self._pending
                             if entry[0] is None or not entry[0].is_done or entry[0].failed()]
            if not self._pending:
                return True
        log.warning("%d dead letters not acknowledged by Kafka yet; they are retried before the next checkpoint",
                    len(self._pending))
        return False


def _shrink(message: dict, error: Exception) -> bool:
    """Cut a dead letter refused for its size, in place: first its value to ``TRUNCATED_BYTES`` (the header
    ``dl.truncated`` keeps the full length), then to nothing with ``dl.error`` cut to 256 bytes. False when it is
    as small as it gets.

    >>> message = {"key": b"u", "value": bytes(100_000), "headers": [("dl.error", b"x" * 1000)]}
    >>> _shrink(message, MessageSizeTooLargeError()), len(message["value"]), message["headers"][-1]
    (True, 65536, ('dl.truncated', b'100000'))
    >>> _shrink(message, MessageSizeTooLargeError()), len(message["value"]), len(message["headers"][0][1])
    (True, 0, 256)
    >>> _shrink(message, MessageSizeTooLargeError())
    False
    """
    headers = message["headers"]
    if not any(name == "dl.truncated" for name, _ in headers):
        headers.append(("dl.truncated", str(len(message["value"])).encode()))
        if len(message["value"]) > TRUNCATED_BYTES:
            message["value"] = message["value"][:TRUNCATED_BYTES]
            log.warning("dead letter refused for its size (%s): sent again cut to %d bytes (header dl.truncated)",
                        error, TRUNCATED_BYTES)
            return True
    elif not message["value"] and all(name != "dl.error" or len(value) <= 256 for name, value in headers):
        return False
    message["value"] = b""
    message["headers"] = [(name, value[:256] if name == "dl.error" else value) for name, value in headers]
    log.warning("dead letter refused for its size (%s): sent again without its value (header dl.truncated)", error)
    return True
