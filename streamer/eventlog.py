"""Event-log files: the streamed events on disk, so a replay or a backtest knows every event's topic and key.

An event log is a plain stream of concatenated msgpack maps (no header, no framing, no compression), one per
event, in the order they were streamed (non-decreasing event time when written by ``crossdistil stream``)::

    {"topic": "impressions", "key": "4854", "event": {"v": 1, "impression_id": "kr-19942", ...}}
    {"topic": "feedback",    "key": "4854", "event": {"v": 1, "impression_id": "kr-19942", "task": "click", ...}}

``event`` is one contract event (``streamer.events``); ``key`` is the Kafka message key as text (the user id).
A reader needs msgpack alone (see docs/event-log.md)::

    import msgpack
    with open("run.evlog", "rb") as f:
        for record in msgpack.Unpacker(f, raw=False):
            print(record["topic"], record["key"], record["event"]["ts_ms"])
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO, NamedTuple

import msgpack

RECORD_KEYS = frozenset({"topic", "key", "event"})
# A record holds one event (<= 1 MiB by the contract) or, if a third party wrote one, a batch envelope.
MAX_RECORD_BYTES = 16 << 20


class EventLogError(ValueError):
    """An event-log file is missing, truncated, or holds something that is not a {topic, key, event} record."""


class LogRecord(NamedTuple):
    """One record of an event log: the topic and key the event travels with, and the event itself."""

    topic: str
    key: str
    event: dict[str, Any]


def path_from_url(url: str) -> Path:
    """``file://PATH`` (or a bare path) -> Path. ``file:///abs`` and ``file://rel/path`` both work."""
    return Path(url[len("file://"):] if url.startswith("file://") else url)


class EventLogWriter:
    """Appends records to an event-log file; ``bytes_written`` counts what it wrote.

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.evlog")
    >>> with EventLogWriter(path) as log:
    ...     n = log.write("feedback", "u1", {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1})
    >>> [r.key for r in read_event_log(path)]
    ['u1']
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.parent and not self.path.parent.exists():
            raise EventLogError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self._file: BinaryIO = self.path.open("wb")
        self._packer = msgpack.Packer(use_bin_type=True)
        self.bytes_written = 0

    def write(self, topic: str, key: str, event: Mapping[str, Any]) -> int:
        """Write one record; returns its size in bytes."""
        data = self._packer.pack({"topic": topic, "key": key, "event": dict(event)})
        self._file.write(data)
        self.bytes_written += len(data)
        return len(data)

    def close(self) -> None:
        """Flush and close the file."""
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> EventLogWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_event_log(path: str | Path) -> Iterator[LogRecord]:
    """Yield the records of an event log in file order; raise ``EventLogError`` on a malformed record.

    Events are returned as stored (validate them with ``streamer.events.validate`` if the file is untrusted).
    """
    for record, _size in read_event_log_sized(path):
        yield record


def read_event_log_sized(path: str | Path) -> Iterator[tuple[LogRecord, int]]:
    """``read_event_log`` with each record's size in bytes in the file (its event packs into no more than that).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.evlog")
    >>> with EventLogWriter(path) as log:
    ...     n = log.write("feedback", "u1", {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1})
    >>> [(r.topic, size == n) for r, size in read_event_log_sized(path)]
    [('feedback', True)]
    """
    for topic, key, event, size in read_event_log_entries(path):
        yield LogRecord(topic, key, event), size


def read_event_log_entries(path: str | Path) -> Iterator[tuple[str, str, dict[str, Any], int]]:
    """``read_event_log_sized`` as flat ``(topic, key, event, size)`` tuples: the cheapest form, for a replay that
    reads every record of a long log (the same records and the same errors).

    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "x.evlog")
    >>> with EventLogWriter(path) as log:
    ...     n = log.write("feedback", "u1", {"v": 1, "impression_id": "i", "ts_ms": 5, "task": "t", "value": 1})
    >>> [(topic, key, size == n) for topic, key, _event, size in read_event_log_entries(path)]
    [('feedback', 'u1', True)]
    """
    path = Path(path)
    if not path.is_file():
        raise EventLogError(f"event log {path} does not exist")
    with path.open("rb") as handle:
        # strict_map_key=False: a map key that is not a string (e.g. a feature name written as an int) is the
        # event's problem, which its validation names and dead-letters as the trainer does, not the whole log's
        unpacker = msgpack.Unpacker(handle, raw=False, strict_map_key=False, max_buffer_size=MAX_RECORD_BYTES)
        tell = unpacker.tell
        index = 0
        start = 0
        try:
            for record in unpacker:
                end = tell()
                # the common case tested inline (a call per record costs a few per cent of a replay's intake);
                # anything else goes to _check_record, which names the problem
                if not (type(record) is dict and record.keys() == RECORD_KEYS
                        and type(topic := record["topic"]) is str and topic and type(key := record["key"]) is str
                        and type(event := record["event"]) is dict):
                    topic, key, event = _check_record(record, path, index)
                yield topic, key, event, end - start
                start = end
                index += 1
        except (msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError, msgpack.exceptions.StackError,
                msgpack.exceptions.BufferFull, ValueError) as exc:
            if isinstance(exc, EventLogError):
                raise
            why = str(exc) or type(exc).__name__
            raise EventLogError(f"event log {path}: record {index} (at byte {start}) is not valid msgpack ({why})"
                                f"{_NOT_A_LOG if index == 0 else ''}") from None
        # ``start`` (the end of the last whole record), not ``unpacker.tell()``: after a partial last record the
        # unpacker's position may count the bytes it buffered (a log cut 7 bytes short passed that way)
        if start != path.stat().st_size:
            raise EventLogError(f"event log {path} ends in the middle of record {index} (truncated file?)")


_NOT_A_LOG = ": is this an event log? 'crossdistil stream --to file://PATH' writes one (docs/event-log.md)"


def _check_record(record: Any, path: Path, index: int) -> LogRecord:
    if not isinstance(record, dict) or record.keys() != RECORD_KEYS:
        keys = ', '.join(sorted(map(repr, record))) if isinstance(record, dict) else type(record).__name__
        raise EventLogError(f"event log {path}: record {index} must be a map with keys topic, key, event; got {keys}"
                            f"{_NOT_A_LOG if index == 0 else ''}")
    topic, key, event = record["topic"], record["key"], record["event"]
    if not isinstance(topic, str) or not topic or not isinstance(key, str) or not isinstance(event, dict):
        raise EventLogError(f"event log {path}: record {index} needs a non-empty str topic, a str key and a map event")
    return LogRecord(topic, key, event)
