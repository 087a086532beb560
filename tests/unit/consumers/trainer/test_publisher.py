"""``Publisher``: a producer that failed for good is replaced (``renew``); one that failed for a while is not."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest
from kafka.errors import KafkaTimeoutError, MessageSizeTooLargeError

from consumers.trainer.publisher import Publisher

pytestmark = pytest.mark.unit


class Producer:
    """Every send's future done at once: failed with ``error`` if given; ``closed`` once closed."""

    def __init__(self, error: Exception | None = None) -> None:
        self.error, self.closed, self.sent = error, False, []

    def send(self, topic: str, key: bytes, value: bytes, partition: int) -> SimpleNamespace:
        self.sent.append(key)
        return SimpleNamespace(is_done=True, failed=lambda: self.error is not None, exception=self.error)

    def flush(self, timeout: float | None = None) -> None:
        pass

    def close(self, timeout: float | None = None) -> None:
        self.closed = True


def publisher(producer: Producer, made: list) -> Publisher:
    store = SimpleNamespace(write_publication=lambda version, step: None)
    metrics = SimpleNamespace(published=lambda *_: None, mark_published_reference=lambda: None)
    p = Publisher(producer, "model-updates", store, metrics)
    p.renew = lambda: made.append(Producer()) or made[-1]
    return p


def test_a_publication_refused_for_good_replaces_the_producer_and_a_timeout_does_not() -> None:
    made: list[Producer] = []
    away = Producer(KafkaTimeoutError("no metadata"))  # retriable: the same producer retries once Kafka is back
    p = publisher(away, made)
    assert not p.send([(b"manifest", b"1")], 1, 10, 0, time.monotonic())
    assert made == [] and p.producer is away and not away.closed

    refused = Producer(MessageSizeTooLargeError())  # for good: kafka-python's idempotent producer is now useless
    p = publisher(refused, made)
    assert not p.send([(b"manifest", b"2")], 2, 20, 0, time.monotonic())
    assert len(made) == 1 and p.producer is made[0] and refused.closed and p.renewed == 1
    assert p.send([(b"manifest", b"3")], 3, 30, 0, time.monotonic()) and made[0].sent == [b"manifest"]
    p.close_renewed()
    assert made[0].closed  # the one it made is its own to close
