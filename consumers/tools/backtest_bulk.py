"""A dense backtest of an event log, read in bulk: the same events, in the same order, for less work per record.

``consumers.tools.backtest.run_backtest(..., batching="dense")`` of an event log (``EventLogRecords``) reads it
here, ``BULK_RECORDS`` records at a time (``streamer.eventlog.read_event_log_chunks``: one unpacking call for
the chunk, the records' checks a column at a time) instead of one generator step, one record check and one
``LoggedRecord`` per record; each record's event is then checked by the trainer's validator in place, as
``LoggedRecord.events`` does (``streamer.events.check_events``; a bad event, a batch envelope or a record larger
than one event may be goes through ``LoggedRecord.events`` itself, so bad events are dead-lettered with the
same reasons). Everything else is the trainer's: each record is its own message for the join
(``Pipeline.ingest_each``), the batcher, the learner, the metrics.

Small chunks on purpose: with 8,192 records a chunk the same work took ~1.7x as long as with 64-256 (the
records of a chunk outlive the CPU's caches before they are checked and joined), so a chunk is one
``DENSE_TRAIN_EVERY``.

The numbers are those of the record-by-record replay, bit for bit (``tests/unit/consumers/tools/
test_backtest_bulk.py`` compares the two on logs with bad events, late and early feedback); the event-time mode
always replays record by record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from streamer.eventlog import LogChunk
from streamer.events import DEFAULT_LIMITS, check_events

BULK_RECORDS = 256  # records read and checked at a time

OneByOne = Callable[[str, dict, int], list]  # (topic, event, record size) -> the record's events, checked
Message = tuple[list, tuple[str, int]]  # a record's events and its source, as Pipeline.ingest_each takes them


def bulk_messages(chunks: Iterable[LogChunk], every: int, one_by_one: OneByOne) -> Iterator[tuple[list[Message], int]]:
    """``(messages, bytes)`` of ``every`` records at a time (the last: what is left): each record's events with
    its source ``(topic, 0)``, what ``LoggedRecord.events`` gives (``one_by_one(topic, event, size)`` for a
    record whose event is bad, a batch envelope or larger than one event may be), and their size in the file."""
    messages: list[Message] = []
    sizes: list[int] = []
    for chunk in chunks:
        messages += _checked(chunk, one_by_one)
        sizes += chunk.sizes
        if len(messages) >= every:
            whole = len(messages) - len(messages) % every
            for i in range(0, whole, every):
                yield messages[i:i + every], sum(sizes[i:i + every])
            del messages[:whole], sizes[:whole]
    if messages:
        yield messages, sum(sizes)


def _checked(chunk: LogChunk, one_by_one: OneByOne) -> list[Message]:
    """The chunk's records as ``(events, (topic, 0))``, each checked as ``LoggedRecord.events`` checks it."""
    messages = []
    largest = DEFAULT_LIMITS.max_event_bytes  # an event packs into at most its record's size
    for topic, event, size in zip(chunk.topics, chunk.events, chunk.sizes):
        events = check_events(event) if size <= largest else None
        if events is None or len(events) > 1 or type(events[0]) is not dict:
            events = one_by_one(topic, event, size)  # an error, an envelope, a large record: the reference
        messages.append((events, (topic, 0)))
    return messages
