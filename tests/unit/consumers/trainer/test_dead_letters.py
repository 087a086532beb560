"""The dead-letter queue: what is produced, and nothing is dropped while the broker is away."""

from __future__ import annotations

from types import SimpleNamespace

import msgpack
import pytest

from consumers.trainer.dead_letters import DeadLetterQueue
from streamer.events import EventError
from tests.unit.consumers.trainer.fakes import FlakyProducer

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("refuse", [True, False], ids=["send-refused", "send-failed"])
def test_dead_letters_of_a_broker_outage_are_retried_and_never_dropped(refuse: bool) -> None:
    queue = DeadLetterQueue(producer := FlakyProducer(refuse), "dead-letters")
    record = SimpleNamespace(key=b"u1", value=b"\xc1", offset=7)
    queue.add(EventError("not msgpack", reason="not_msgpack"), record, "impressions", 0)
    assert not queue.flush(timeout_s=0.1)  # not acknowledged: the checkpoint must wait
    assert not queue.flush(timeout_s=0.1)  # ... and keeps waiting, without losing it
    assert queue.pending == 1
    producer.healthy = True
    assert queue.flush(timeout_s=0.1)  # retried once the broker is back
    assert queue.pending == 0 and producer.sent[-1] == ("dead-letters", b"\xc1")


def test_a_bad_event_inside_an_envelope_is_dead_lettered_alone_with_its_index() -> None:
    sent = []
    producer = SimpleNamespace(send=lambda topic, **message: sent.append((topic, message)) or SimpleNamespace(
        is_done=True, failed=lambda: False), flush=lambda timeout=None: None)
    queue = DeadLetterQueue(producer, "dl")
    bad = {"v": 1, "impression_id": "i2"}
    record = SimpleNamespace(key=b"u1", value=b"<the whole envelope>", offset=41)
    queue.add(EventError("missing user_id", reason="missing_field", field="user_id", index=2, event=bad),
              record, "impressions", 3)
    (topic, message), = sent
    headers = dict(message["headers"])
    assert topic == "dl" and message["key"] == b"u1" and msgpack.unpackb(message["value"]) == bad
    assert headers["dl.reason"] == b"missing_field" and headers["dl.index"] == b"2"
    assert (headers["dl.source.topic"], headers["dl.source.partition"], headers["dl.source.offset"]) == (
        b"impressions", b"3", b"41")
    assert queue.flush()


def test_without_the_topics_metadata_a_burst_of_dead_letters_waits_once_not_once_each() -> None:
    """Each send without metadata blocks for ``max_block_ms`` (10 s): after one, the next dead letters wait in the
    queue, unsent, until a flush tries again (once), and none is lost."""
    producer = FlakyProducer(refuse=True)
    attempts = []
    real_send = producer.send
    producer.send = lambda topic, **message: attempts.append(message["value"]) or real_send(topic, **message)
    queue = DeadLetterQueue(producer, "dead-letters")
    for offset in range(5):
        queue.add(EventError("not msgpack", reason="not_msgpack"), SimpleNamespace(
            key=b"u", value=bytes([0xc1, offset]), offset=offset), "impressions", 0)
    assert len(attempts) == 1 and queue.pending == 5  # one wait for the five
    assert not queue.flush(timeout_s=0.1) and len(attempts) == 2 and queue.pending == 5  # one more wait per flush
    producer.healthy = True
    assert queue.flush(timeout_s=0.1) and queue.pending == 0
    assert [value for _, value in producer.sent] == [bytes([0xc1, offset]) for offset in range(5)]  # in order


def test_a_dead_letter_refused_for_its_size_is_sent_again_cut_short_and_checkpoints_go_on() -> None:
    """The broker refuses a message over the topic's max.message.bytes for good: the queue sends it again cut to
    TRUNCATED_BYTES (header dl.truncated: the full length), then without its value, instead of waiting for ever."""
    from kafka.errors import MessageSizeTooLargeError

    from consumers.trainer.dead_letters import TRUNCATED_BYTES

    limit, sent = 3_000, []

    def send(topic: str, **message) -> SimpleNamespace:  # the broker's answer, already there (flush is a no-op)
        size = len(message["value"]) + sum(len(v) for _, v in message["headers"])
        sent.append(message)
        return SimpleNamespace(is_done=True, failed=lambda: size > limit,
                               exception=MessageSizeTooLargeError() if size > limit else None)

    queue = DeadLetterQueue(SimpleNamespace(send=send, flush=lambda timeout=None: None), "dl")
    error = EventError("not msgpack: " + "x" * 1000, reason="not_msgpack")
    queue.add(error, SimpleNamespace(key=b"u", value=b"\xc1" * 100_000, offset=3), "impressions", 0)
    assert not queue.flush() and len(sent[-1]["value"]) == TRUNCATED_BYTES  # cut to 64 KiB: still too large
    assert queue.flush() and sent[-1]["value"] == b"" and queue.pending == 0  # without its value: delivered
    headers = dict(sent[-1]["headers"])
    assert headers["dl.truncated"] == b"100000" and len(headers["dl.error"]) == 256
    assert headers["dl.source.offset"] == b"3"
